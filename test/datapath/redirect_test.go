package datapath_test

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

const (
	appPort      = 8080
	excludedIn   = 9090 // excluded inbound on the server pod
	excludedOut  = 9091 // excluded outbound on the client pod
	includedPort = 9092
)

// topology: client pod A and server pod B meshed with one profile, pod C
// not meshed (a "remote" service), pod E an address excluded from A's
// outbound redirect.
type topology struct {
	n               *node
	prof            mesh.Profile
	a, b, c, e      *testenv.Pod
	sidecarA, sideB string
	passthrough4    netip.Addr
	passthrough6    netip.Addr
}

func newTopology(t *testing.T, prof mesh.Profile, sockmap bool) *topology {
	n := newNode(t, sockmap)
	tp := &topology{n: n, prof: prof, a: n.pod("a"), b: n.pod("b"), c: n.pod("c"), e: n.pod("e"),
		passthrough4: netip.MustParseAddr("127.0.0.6"), passthrough6: netip.MustParseAddr("::6")}
	var annA, annB map[string]string
	switch prof.Name {
	case mesh.Istio.Name:
		annA = map[string]string{
			"traffic.sidecar.istio.io/excludeOutboundPorts":    fmt.Sprint(excludedOut),
			"traffic.sidecar.istio.io/excludeOutboundIPRanges": tp.e.IPv4.String() + "/32," + tp.e.IPv6.String() + "/128",
		}
		annB = map[string]string{"traffic.sidecar.istio.io/excludeInboundPorts": fmt.Sprint(excludedIn)}
	case mesh.Linkerd.Name:
		annA = map[string]string{
			"config.linkerd.io/skip-outbound-ports": fmt.Sprint(excludedOut),
			"config.linkerd.io/skip-subnets":        tp.e.IPv4.String() + "/32," + tp.e.IPv6.String() + "/128",
		}
		annB = map[string]string{"config.linkerd.io/skip-inbound-ports": fmt.Sprint(excludedIn)}
	}
	n.mesh(tp.a, prof, annA)
	n.mesh(tp.b, prof, annB)
	tp.sidecarA = n.sidecar(tp.a, prof)
	tp.sideB = n.sidecar(tp.b, prof)
	n.server(tp.b, "b", appPort, excludedIn)
	n.server(tp.c, "c", appPort, excludedOut)
	n.server(tp.e, "e", appPort)
	return tp
}

func families(p *testenv.Pod) map[string]netip.Addr {
	return map[string]netip.Addr{"v4": p.IPv4, "v6": p.IPv6}
}

// TestRedirect checks every decision of the connect hooks, with the
// original destination the sidecars read, for both meshes and families.
func TestRedirect(t *testing.T) {
	for _, prof := range []mesh.Profile{mesh.Istio, mesh.Linkerd} {
		t.Run(prof.Name, func(t *testing.T) {
			tp := newTopology(t, prof, false)
			for fam := range families(tp.a) {
				t.Run(fam, func(t *testing.T) { tp.checkAll(t, fam) })
			}
		})
	}
}

func (tp *topology) gateway(fam string) netip.Addr {
	if fam == "v6" {
		return tp.n.br.Gateway6
	}
	return tp.n.br.Gateway4
}

func (tp *topology) addr(p *testenv.Pod, fam string) netip.Addr { return families(p)[fam] }

func (tp *topology) checkAll(t *testing.T, fam string) {
	n := tp.n
	bIP, cIP, eIP, aIP := tp.addr(tp.b, fam), tp.addr(tp.c, fam), tp.addr(tp.e, fam), tp.addr(tp.a, fam)

	t.Run("outbound app to remote goes through own sidecar", func(t *testing.T) {
		seenA := len(sidecarEvents(t, tp.sidecarA))
		r := parseReply(t, n.client(app(tp.a), hostPort(cIP, appPort))[0].Reply)
		ev := newEvents(t, tp.sidecarA, seenA)
		if len(ev) != 1 || ev[0].Listener != wire.ListenerOutbound || ev[0].OrigDst != hostPort(cIP, appPort) {
			t.Fatalf("sidecar A events %+v, want one outbound with origDst %s", ev, hostPort(cIP, appPort))
		}
		if r.Name != "c" || r.Remote.Addr() != aIP {
			t.Fatalf("server saw %+v, want c reached from A's pod IP %s (the sidecar's upstream)", r, aIP)
		}
	})

	t.Run("same-node app to meshed pod goes through both sidecars", func(t *testing.T) {
		seenA, seenB := len(sidecarEvents(t, tp.sidecarA)), len(sidecarEvents(t, tp.sideB))
		r := parseReply(t, n.client(app(tp.a), hostPort(bIP, appPort))[0].Reply)
		evA, evB := newEvents(t, tp.sidecarA, seenA), newEvents(t, tp.sideB, seenB)
		want := hostPort(bIP, appPort)
		if len(evA) != 1 || evA[0].Listener != wire.ListenerOutbound || evA[0].OrigDst != want {
			t.Fatalf("sidecar A events %+v, want one outbound with origDst %s", evA, want)
		}
		if len(evB) != 1 || evB[0].Listener != wire.ListenerInbound || evB[0].OrigDst != want {
			t.Fatalf("sidecar B events %+v, want one inbound with origDst %s", evB, want)
		}
		// B's sidecar reached the app through the inbound passthrough, not
		// redirected again: the server sees 127.0.0.6 (::6).
		pt := tp.passthrough4
		if fam == "v6" {
			pt = tp.passthrough6
		}
		if r.Name != "b" || r.Remote.Addr() != pt {
			t.Fatalf("server saw %+v, want b reached from the passthrough address %s", r, pt)
		}
	})

	t.Run("host process to meshed pod goes to its inbound listener", func(t *testing.T) {
		seenB := len(sidecarEvents(t, tp.sideB))
		r := parseReply(t, n.client(host(), hostPort(bIP, appPort))[0].Reply)
		evB := newEvents(t, tp.sideB, seenB)
		if len(evB) != 1 || evB[0].Listener != wire.ListenerInbound || evB[0].OrigDst != hostPort(bIP, appPort) {
			t.Fatalf("sidecar B events %+v, want one inbound with origDst %s", evB, hostPort(bIP, appPort))
		}
		if r.Name != "b" {
			t.Fatalf("reply %+v", r)
		}
	})

	t.Run("non-meshed pod to meshed pod goes to its inbound listener", func(t *testing.T) {
		seenB := len(sidecarEvents(t, tp.sideB))
		n.client(app(tp.c), hostPort(bIP, appPort))
		if evB := newEvents(t, tp.sideB, seenB); len(evB) != 1 || evB[0].OrigDst != hostPort(bIP, appPort) {
			t.Fatalf("sidecar B events %+v", evB)
		}
	})

	if fam == "v4" {
		// A dual-stack (AF_INET6) socket connecting to an IPv4-mapped
		// address passes connect6, not connect4.
		t.Run("dual-stack socket to v4-mapped remote goes through own sidecar", func(t *testing.T) {
			seenA := len(sidecarEvents(t, tp.sidecarA))
			mapped := netip.AddrFrom16(cIP.As16())
			r := parseReply(t, n.client(app(tp.a), hostPort(mapped, appPort), "--reader", "blocking")[0].Reply)
			ev := newEvents(t, tp.sidecarA, seenA)
			if len(ev) != 1 || ev[0].Listener != wire.ListenerOutbound || ev[0].OrigDst != hostPort(cIP, appPort) {
				t.Fatalf("sidecar A events %+v, want one outbound with origDst %s", ev, hostPort(cIP, appPort))
			}
			if r.Name != "c" || r.Remote.Addr() != aIP {
				t.Fatalf("server saw %+v", r)
			}
		})
		t.Run("dual-stack socket to v4-mapped meshed pod goes to its inbound listener", func(t *testing.T) {
			seenB := len(sidecarEvents(t, tp.sideB))
			mapped := netip.AddrFrom16(bIP.As16())
			n.client(host(), hostPort(mapped, appPort), "--reader", "blocking")
			if ev := newEvents(t, tp.sideB, seenB); len(ev) != 1 || ev[0].OrigDst != hostPort(bIP, appPort) {
				t.Fatalf("sidecar B events %+v, want one inbound with origDst %s", ev, hostPort(bIP, appPort))
			}
		})
	}

	untouched := []struct {
		name string
		from where
		to   string
		// seen by the server as coming from
		remote netip.Addr
	}{
		{"host to non-meshed pod", host(), hostPort(cIP, appPort), tp.gateway(fam)},
		{"non-meshed pod to non-meshed pod", app(tp.c), hostPort(eIP, appPort), cIP},
		{"excluded inbound port", host(), hostPort(bIP, excludedIn), tp.gateway(fam)},
		{"excluded outbound port", app(tp.a), hostPort(cIP, excludedOut), aIP},
		{"excluded outbound CIDR", app(tp.a), hostPort(eIP, appPort), aIP},
		{"app to its own pod IP", app(tp.b), hostPort(bIP, appPort), bIP},
		{"sidecar to its own pod IP", proxy(tp.b, tp.prof), hostPort(bIP, appPort), bIP},
		{"process outside the cgroup", where{pod: nil, outside: true}, hostPort(bIP, appPort), tp.gateway(fam)},
	}
	for _, c := range untouched {
		t.Run("untouched: "+c.name, func(t *testing.T) {
			seenA, seenB := len(sidecarEvents(t, tp.sidecarA)), len(sidecarEvents(t, tp.sideB))
			r := parseReply(t, n.client(c.from, c.to)[0].Reply)
			if r.Remote.Addr() != c.remote || r.Local.String() != c.to {
				t.Fatalf("server saw remote %s local %s, want a direct connection from %s to %s", r.Remote, r.Local, c.remote, c.to)
			}
			if ev := newEvents(t, tp.sidecarA, seenA); len(ev) != 0 {
				t.Fatalf("sidecar A saw %+v", ev)
			}
			if ev := newEvents(t, tp.sideB, seenB); len(ev) != 0 {
				t.Fatalf("sidecar B saw %+v", ev)
			}
		})
	}
}

// TestPassthroughFirstConnection: the sidecar's inbound passthrough and
// its connections to its own pod are never redirected, from the very first
// connection of a fresh process, 1,000 times.
func TestPassthroughFirstConnection(t *testing.T) {
	prof := mesh.Istio
	n := newNode(t, false)
	b := n.pod("b")
	n.mesh(b, prof, nil)
	side := n.sidecar(b, prof)
	n.server(b, "b", appPort)

	const runs = 1000
	const workers = 4
	var failed atomic.Int64
	var wg sync.WaitGroup
	next := make(chan int)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fam := []netip.Addr{b.IPv4, b.IPv6}[i%2]
				src := []string{"127.0.0.6", "::6"}[i%2]
				res, err := n.tryClient(proxy(b, prof), hostPort(fam, appPort), "--bind", src)
				if err != nil || len(res) != 1 || !res[0].OK {
					failed.Add(1)
					t.Errorf("run %d: %v %+v", i, err, res)
					continue
				}
				r := parseReply(t, res[0].Reply)
				if r.Remote.Addr().String() != src || r.Local.Port() != appPort {
					failed.Add(1)
					t.Errorf("run %d: server saw %+v, want a direct connection from %s", i, r, src)
				}
			}
		}()
	}
	for i := 0; i < runs && !t.Failed(); i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	if ev := sidecarEvents(t, side); len(ev) != 0 {
		t.Fatalf("the sidecar's own connections reached a sidecar listener %d times: %+v", len(ev), ev[0])
	}
	t.Logf("%d fresh processes, %d failures", runs, failed.Load())
}

// TestIncludeRules: Istio's include lists (no "*"): outbound only to the
// included ranges or ports, inbound only on the included ports. The
// programs skip rule lookups for pods without rules of a kind, so each
// kind is checked here with rules present.
func TestIncludeRules(t *testing.T) {
	n := newNode(t, false)
	a, b, c, e := n.pod("a"), n.pod("b"), n.pod("c"), n.pod("e")
	n.mesh(a, mesh.Istio, map[string]string{
		"traffic.sidecar.istio.io/includeOutboundIPRanges": c.IPv4.String() + "/32," + c.IPv6.String() + "/128",
		"traffic.sidecar.istio.io/includeOutboundPorts":    fmt.Sprint(includedPort),
	})
	n.mesh(b, mesh.Istio, map[string]string{"traffic.sidecar.istio.io/includeInboundPorts": fmt.Sprint(includedPort)})
	sideA, sideB := n.sidecar(a, mesh.Istio), n.sidecar(b, mesh.Istio)
	n.server(b, "b", appPort, includedPort)
	n.server(c, "c", appPort)
	n.server(e, "e", appPort, includedPort)

	for fam := range families(a) {
		cases := []struct {
			name     string
			from     where
			to       netip.Addr
			port     int
			sidecar  string
			listener string
		}{
			{"app to an included range", app(a), families(c)[fam], appPort, sideA, wire.ListenerOutbound},
			{"app to a range not included", app(a), families(e)[fam], appPort, "", ""},
			{"app to an included port elsewhere", app(a), families(e)[fam], includedPort, sideA, wire.ListenerOutbound},
			{"host to an included inbound port", host(), families(b)[fam], includedPort, sideB, wire.ListenerInbound},
			{"host to an inbound port not included", host(), families(b)[fam], appPort, "", ""},
		}
		for _, c := range cases {
			t.Run(fam+"/"+c.name, func(t *testing.T) {
				seenA, seenB := len(sidecarEvents(t, sideA)), len(sidecarEvents(t, sideB))
				to := hostPort(c.to, c.port)
				n.client(c.from, to)
				evA, evB := newEvents(t, sideA, seenA), newEvents(t, sideB, seenB)
				got := map[string][]wire.SidecarEvent{sideA: evA, sideB: evB}
				for _, s := range []string{sideA, sideB} {
					want := 0
					if s == c.sidecar {
						want = 1
					}
					if len(got[s]) != want {
						t.Fatalf("sidecar %s events %+v, want %d", s, got[s], want)
					}
					if want == 1 && (got[s][0].Listener != c.listener || got[s][0].OrigDst != to) {
						t.Fatalf("sidecar event %+v, want %s listener with origDst %s", got[s][0], c.listener, to)
					}
				}
			})
		}
	}
}
