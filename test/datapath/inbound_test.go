package datapath_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// probePort is the sidecar's health port the mesh's injector points the
// kubelet's probes at; it is among the profile's excluded proxy ports.
func probePort(prof mesh.Profile) int {
	if prof.Name == mesh.Linkerd.Name {
		return 4191
	}
	return 15021
}

// inboundTopology: meshed pod B with the tc hooks on its eth0; meshed pod
// A on the same node; pod R plays a pod of another node: its processes run
// in a cgroup nothing is attached to, so no connect hook sees them, and its
// packets reach B's interface from the bridge as a remote node's would.
type inboundTopology struct {
	n            *node
	prof         mesh.Profile
	a, b, r      *testenv.Pod
	remoteCg     *testenv.Cgroup
	sideA, sideB string
}

func newInboundTopology(t *testing.T, prof mesh.Profile, mode string) *inboundTopology {
	n := newNodeInbound(t, false, mode)
	tp := &inboundTopology{n: n, prof: prof, a: n.pod("a"), b: n.pod("b"), r: n.pod("r"), remoteCg: testenv.TempCgroup(t)}
	var annB map[string]string
	switch prof.Name {
	case mesh.Istio.Name:
		annB = map[string]string{"traffic.sidecar.istio.io/excludeInboundPorts": fmt.Sprint(excludedIn)}
	case mesh.Linkerd.Name:
		annB = map[string]string{"config.linkerd.io/skip-inbound-ports": fmt.Sprint(excludedIn)}
	}
	n.meshInbound(tp.a, prof, nil)
	n.meshInbound(tp.b, prof, annB)
	tp.sideA = n.sidecar(tp.a, prof)
	tp.sideB = n.sidecar(tp.b, prof)
	n.server(tp.b, "b", appPort, excludedIn, probePort(prof))
	return tp
}

func (tp *inboundTopology) remote() where {
	return where{pod: tp.r, uid: appUID, gid: appUID, cg: tp.remoteCg}
}

// TestInboundFromOtherNodes: connections that no connect hook saw reach a
// meshed pod's inbound sidecar with the right original destination, in
// both hook modes, both meshes and both families; excluded and probe ports
// are left alone; and the node's own redirected connections are never
// rewritten a second time by tc.
func TestInboundFromOtherNodes(t *testing.T) {
	for _, mode := range []string{datapath.InboundTCX, datapath.InboundTC, datapath.InboundSkLookup} {
		for _, prof := range []mesh.Profile{mesh.Istio, mesh.Linkerd} {
			t.Run(mode+"/"+prof.Name, func(t *testing.T) {
				tp := newInboundTopology(t, prof, mode)
				if got := tp.n.dp.InboundMode(); got != mode {
					t.Fatalf("inbound mode %q, want %q", got, mode)
				}
				for _, fam := range []string{"v4", "v6"} {
					t.Run(fam, func(t *testing.T) { tp.check(t, fam) })
				}
			})
		}
	}
}

func (tp *inboundTopology) check(t *testing.T, fam string) {
	n := tp.n
	bIP, rIP := families(tp.b)[fam], families(tp.r)[fam]
	want := hostPort(bIP, appPort)

	remoteRedirects := func(t *testing.T, before map[string]uint64, wantN uint64) {
		t.Helper()
		if got := n.counters()["redirect_inbound_remote"] - before["redirect_inbound_remote"]; got != wantN {
			t.Fatalf("tc redirected %d connections, want %d", got, wantN)
		}
	}
	oneInbound := func(t *testing.T, seen int) {
		t.Helper()
		ev := newEvents(t, tp.sideB, seen)
		if len(ev) != 1 || ev[0].Listener != wire.ListenerInbound || ev[0].OrigDst != want {
			t.Fatalf("sidecar B events %+v, want one inbound with origDst %s", ev, want)
		}
	}

	t.Run("remote pod reaches the inbound sidecar", func(t *testing.T) {
		seen, before := len(sidecarEvents(t, tp.sideB)), n.counters()
		r := parseReply(t, n.client(tp.remote(), want)[0].Reply)
		oneInbound(t, seen)
		if r.Name != "b" {
			t.Fatalf("reply %+v, want b", r)
		}
		remoteRedirects(t, before, 1)
	})

	t.Run("the connections view shows a held remote connection", func(t *testing.T) {
		ready := filepath.Join(testenv.ScratchDir(t), "ready")
		proc := tp.r.Start(t, testenv.ProcOpts{UID: appUID, GID: appUID, Cgroup: tp.remoteCg,
			Args: []string{n.bin, "hold", "--to", want, "--conns", "1", "--ready", ready}})
		defer proc.Kill()
		if err := testenv.WaitFile(ready, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		conns, err := n.dp.Conns()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range conns {
			if c.Kind == datapath.KindInboundRemote && c.Side == datapath.SideListener && c.Original.String() == want &&
				c.Remote.Addr().Unmap() == rIP && c.ListenerNetns == tp.b.NetnsCookie {
				return
			}
		}
		t.Fatalf("no %s listener socket with original destination %s from %s among %+v", datapath.KindInboundRemote, want, rIP, conns)
	})

	t.Run("host process outside the cgroup reaches the inbound sidecar", func(t *testing.T) {
		seen, before := len(sidecarEvents(t, tp.sideB)), n.counters()
		n.client(where{uid: appUID, gid: appUID, outside: true}, want)
		oneInbound(t, seen)
		remoteRedirects(t, before, 1)
	})

	// Redirected by a connect hook already: tc must leave them alone.
	for _, c := range []struct {
		name string
		from where
	}{{"same-node meshed pod", app(tp.a)}, {"host process in the cgroup", host()}} {
		t.Run(c.name+" is redirected once, by its connect hook", func(t *testing.T) {
			seen, before := len(sidecarEvents(t, tp.sideB)), n.counters()
			n.client(c.from, want)
			oneInbound(t, seen)
			remoteRedirects(t, before, 0)
		})
	}

	// The kubelet probes from the host, in or out of the attached cgroup.
	gw := tp.n.br.Gateway4
	if fam == "v6" {
		gw = tp.n.br.Gateway6
	}
	callers := []struct {
		name string
		from where
		ip   netip.Addr
	}{
		{"remote pod", tp.remote(), rIP},
		{"host process in the cgroup", host(), gw},
		{"host process outside the cgroup", where{uid: appUID, gid: appUID, outside: true}, gw},
	}
	for _, port := range []int{excludedIn, probePort(tp.prof)} {
		for _, c := range callers {
			t.Run(fmt.Sprintf("port %d from %s is not redirected", port, c.name), func(t *testing.T) {
				seen, before := len(sidecarEvents(t, tp.sideB)), n.counters()
				to := hostPort(bIP, port)
				r := parseReply(t, n.client(c.from, to)[0].Reply)
				if r.Remote.Addr() != c.ip || r.Local.String() != to {
					t.Fatalf("server saw remote %s local %s, want a direct connection from %s to %s", r.Remote, r.Local, c.ip, to)
				}
				if ev := newEvents(t, tp.sideB, seen); len(ev) != 0 {
					t.Fatalf("sidecar B saw %+v", ev)
				}
				remoteRedirects(t, before, 0)
			})
		}
	}
}

// TestInboundShortConnectionsLeaveNoState: 10,000 short connections from
// another node's pod through B's inbound sidecar, over IPv4 and IPv6, are
// all steered and answered, and leave no record behind.
func TestInboundShortConnectionsLeaveNoState(t *testing.T) {
	const total, clients = 10_000, 4
	tp := newInboundTopology(t, mesh.Istio, datapath.InboundAuto)
	n := tp.n
	setSysctls(t, tp.r, map[string]string{
		"net/ipv4/ip_local_port_range": "1024 65535",
		"net/ipv4/tcp_tw_reuse":        "1",
	})
	before := n.counters()
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		to := hostPort(tp.b.IPv4, appPort)
		if i%2 == 1 {
			to = hostPort(tp.b.IPv6, appPort)
		}
		wg.Go(func() {
			res, err := n.tryClientWithin(10*time.Minute, tp.remote(), to, "--count", fmt.Sprint(total/clients))
			ok := 0
			for _, r := range res {
				if r.OK {
					ok++
				}
			}
			if err != nil || ok != total/clients {
				errs <- fmt.Errorf("client to %s: %v, %d of %d ok", to, err, ok, total/clients)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	after := n.counters()
	for _, c := range []string{"redirect_inbound_remote", "origdst_answered"} {
		if got := after[c] - before[c]; got != total {
			t.Errorf("%s went up by %d, want %d", c, got, total)
		}
	}
	if got := after["remote_no_listener"] + after["remote_assign_failed"]; got != 0 {
		t.Errorf("remote_no_listener + remote_assign_failed = %d", got)
	}
	waitMapEmpty(t, n, "meshlane_origdst")
	if ev := sidecarEvents(t, tp.sideB); len(ev) != total {
		t.Errorf("sidecar B accepted %d connections, want %d", len(ev), total)
	}
}

// TestUninstallRemovesInboundHooks: `meshlane-agent uninstall` (RemovePins
// on a closed datapath) takes the tc program off every pod interface, in
// both modes: new connections from other nodes reach the app directly
// again, no meshlane filter stays behind, and a connection the program
// steered before goes on through the sidecar (it never needed tc after its
// SYN).
func TestUninstallRemovesInboundHooks(t *testing.T) {
	for _, mode := range []string{datapath.InboundTCX, datapath.InboundTC, datapath.InboundSkLookup} {
		t.Run(mode, func(t *testing.T) {
			tp := newInboundTopology(t, mesh.Istio, mode)
			n := tp.n
			to := hostPort(tp.b.IPv4, appPort)
			seen := len(sidecarEvents(t, tp.sideB))
			n.client(tp.remote(), to)
			if ev := newEvents(t, tp.sideB, seen); len(ev) != 1 {
				t.Fatalf("before uninstall: sidecar B events %+v, want one", ev)
			}
			// This test process runs no meshlane program: from R's
			// netns it is another node's client.
			held := dialIn(t, tp.r, to)
			echo(t, held, "before")
			if err := n.dp.Close(); err != nil {
				t.Fatal(err)
			}
			if err := datapath.RemovePins(n.bpffs); err != nil {
				t.Fatal(err)
			}
			echo(t, held, "after the uninstall")
			seen = len(sidecarEvents(t, tp.sideB))
			r := parseReply(t, n.client(tp.remote(), to)[0].Reply)
			if r.Remote.Addr() != tp.r.IPv4 || r.Local.String() != to {
				t.Fatalf("after uninstall the app saw remote %s local %s, want a direct connection from %s", r.Remote, r.Local, tp.r.IPv4)
			}
			if ev := newEvents(t, tp.sideB, seen); len(ev) != 0 {
				t.Fatalf("after uninstall sidecar B saw %+v", ev)
			}
			if f := bpfFilters(t, tp.b); len(f) != 0 {
				t.Fatalf("tc filters left on b's eth0: %v", f)
			}
			// The node's cleanup uninstalls a loaded datapath.
			reloadNode(t, n, false)
		})
	}
}

// dialIn opens a connection from inside p's netns, says HELLO to the app
// server behind to, and checks it answered through B's sidecar (its
// passthrough source, 127.0.0.6).
func dialIn(t *testing.T, p *testenv.Pod, to string) net.Conn {
	t.Helper()
	var c net.Conn
	err := testenv.InNetns(p.NetnsPath, func() (err error) {
		c, err = net.DialTimeout("tcp", to, 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("HELLO held\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.Contains(line, "remote=127.0.0.6:") {
		t.Fatalf("reply %q, %v: want the app reached through the sidecar's passthrough", line, err)
	}
	return c
}

// echo sends a line on c and wants it back.
func echo(t *testing.T, c net.Conn, when string) {
	t.Helper()
	msg := "echo " + when + "\n"
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("%s: write: %v", when, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("%s: echo %q, %v; want %q", when, buf, err, msg)
	}
}

// bpfFilters lists the names of the classic tc bpf filters on p's eth0.
func bpfFilters(t *testing.T, p *testenv.Pod) []string {
	t.Helper()
	var names []string
	err := testenv.InNetns(p.NetnsPath, func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			fs, err := netlink.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range fs {
				if bf, ok := f.(*netlink.BpfFilter); ok {
					names = append(names, bf.Name)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// newMeshedServer is a node with pod B meshed (Istio, the inbound hook of
// mode on it) and its app server up but no sidecar yet, and a client in
// pod R that no connect hook sees, as another node's.
func newMeshedServer(t *testing.T, mode string) (*node, *testenv.Pod, where) {
	n := newNodeInbound(t, false, mode)
	b, r := n.pod("b"), n.pod("r")
	n.meshInbound(b, mesh.Istio, nil)
	n.server(b, "b", appPort)
	return n, b, where{pod: r, uid: appUID, gid: appUID, cg: testenv.TempCgroup(t)}
}

// TestInboundWithoutSidecar: while a meshed pod's sidecar is not
// listening, a connection from another node to a redirected port is
// dropped at its SYN, never handed to the app around the sidecar; once the
// sidecar listens, connections go through it.
func TestInboundWithoutSidecar(t *testing.T) {
	for _, mode := range []string{datapath.InboundTCX, datapath.InboundSkLookup} {
		t.Run(mode, func(t *testing.T) {
			n, b, remote := newMeshedServer(t, mode)
			to := hostPort(b.IPv4, appPort)

			before := n.counters()
			if res, err := n.tryClient(remote, to, "--timeout", "1s"); err == nil {
				t.Fatalf("connected to the app with no sidecar listening: %+v", res)
			}
			if got := n.counters()["remote_no_listener"] - before["remote_no_listener"]; got == 0 {
				t.Fatal("remote_no_listener did not count the dropped SYN")
			}
			side := n.sidecar(b, mesh.Istio)
			n.client(remote, to)
			if ev := sidecarEvents(t, side); len(ev) != 1 || ev[0].OrigDst != to {
				t.Fatalf("sidecar events %+v, want one with origDst %s", ev, to)
			}
		})
	}
}

// TestInboundReuseportListener: Envoy sets SO_REUSEPORT on its listeners;
// a SYN from another node is steered to such a listener too, IPv4 and
// IPv6.
func TestInboundReuseportListener(t *testing.T) {
	for _, mode := range []string{datapath.InboundTCX, datapath.InboundSkLookup} {
		t.Run(mode, func(t *testing.T) {
			n, b, remote := newMeshedServer(t, mode)
			side := n.sidecar(b, mesh.Istio, "--reuseport")
			for _, ip := range []netip.Addr{b.IPv4, b.IPv6} {
				to := hostPort(ip, appPort)
				seen, before := len(sidecarEvents(t, side)), n.counters()
				n.client(remote, to)
				if ev := newEvents(t, side, seen); len(ev) != 1 || ev[0].OrigDst != to {
					t.Fatalf("sidecar events %+v, want one with origDst %s", ev, to)
				}
				if got := n.counters()["redirect_inbound_remote"] - before["redirect_inbound_remote"]; got != 1 {
					t.Fatalf("tc steered %d connections, want 1", got)
				}
			}
		})
	}
}

// TestInboundSyncookies: when the sidecar's listener answers with a SYN
// cookie (its queue full, or tcp_syncookies=2 as here, for every
// connection), the handshake's last ACK finds no request socket, and the
// stack would complete it on the app's own listener, around the sidecar.
// tc hands that ACK to the sidecar's listener too.
func TestInboundSyncookies(t *testing.T) {
	for _, mode := range []string{datapath.InboundTCX, datapath.InboundSkLookup} {
		t.Run(mode, func(t *testing.T) {
			n, b, remote := newMeshedServer(t, mode)
			setSysctls(t, b, map[string]string{"net/ipv4/tcp_syncookies": "2"})
			side := n.sidecar(b, mesh.Istio)
			for _, ip := range []netip.Addr{b.IPv4, b.IPv6} {
				to := hostPort(ip, appPort)
				seen := len(sidecarEvents(t, side))
				r := parseReply(t, n.client(remote, to)[0].Reply)
				if ev := newEvents(t, side, seen); len(ev) != 1 || ev[0].OrigDst != to {
					t.Fatalf("sidecar events %+v, want one with origDst %s", ev, to)
				}
				if !r.Remote.Addr().IsLoopback() && r.Remote.Addr() != netip.MustParseAddr("::6") {
					t.Fatalf("the app saw %s: reached directly, not through the sidecar", r.Remote)
				}
			}
		})
	}
}

// TestDetachWithoutClsact: a pod whose interface lost its clsact qdisc
// (another tool removed it, or sk_lookup mode never put one there) is
// still deleted cleanly: the kernel answers a filter delete there with
// EINVAL, which must not fail the pod's DEL.
func TestDetachWithoutClsact(t *testing.T) {
	n := newNodeInbound(t, false, datapath.InboundTC)
	b := n.pod("b")
	p := n.meshInbound(b, mesh.Istio, nil)
	err := testenv.InNetns(b.NetnsPath, func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.QdiscDel(&netlink.GenericQdisc{QdiscType: "clsact",
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.dp.DeletePod(p); err != nil {
		t.Fatalf("DEL of a pod without clsact: %v", err)
	}
}
