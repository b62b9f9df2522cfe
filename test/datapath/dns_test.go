package datapath_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

const dnsProbeArg = "meshlane-dns-probe"

// dnsCaptureAnn is how Istio asks for DNS capture on a pod.
var dnsCaptureAnn = map[string]string{"proxy.istio.io/config": "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"}

// dnsAnswer is one query as the asking process saw it.
type dnsAnswer struct {
	How   string `json:"how"`
	Reply string `json:"reply"`
	From  string `json:"from"`
	Err   string `json:"err,omitempty"`
}

// runDNSProbe is the test binary's role inside a pod:
//
//	serve NAME ADDR...   answer "NAME <query> <orig>" on UDP and TCP, where
//	                     orig is SO_ORIGINAL_DST of a TCP connection
//	ask TARGET           query TARGET with a connected UDP socket, an
//	                     unconnected one and TCP; print what came back
func runDNSProbe(args []string) {
	switch args[0] {
	case "serve":
		name := args[1]
		for _, a := range args[2:] {
			pc, err := net.ListenPacket("udp", a)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			go func() {
				buf := make([]byte, 512)
				for {
					n, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo([]byte(name+" "+string(buf[:n])+" -"), from)
				}
			}()
			l, err := net.Listen("tcp", a)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					q, _ := io.ReadAll(io.LimitReader(c, 64))
					orig := "-"
					if tc, ok := c.(*net.TCPConn); ok {
						if o, err := origDst(tc); err == nil {
							orig = o
						}
					}
					c.Write([]byte(name + " " + string(q) + " " + orig))
					c.Close()
				}
			}()
		}
		fmt.Println("ready")
		select {}
	case "ask":
		target := args[1]
		var out []dnsAnswer
		out = append(out, askUDP("connected", target), askUDP("unconnected", target), askTCP(target))
		json.NewEncoder(os.Stdout).Encode(out)
	}
}

func askUDP(how, target string) dnsAnswer {
	a := dnsAnswer{How: how}
	to, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		a.Err = err.Error()
		return a
	}
	var c *net.UDPConn
	if how == "connected" {
		c, err = net.DialUDP("udp", nil, to)
	} else {
		c, err = net.ListenUDP("udp", nil)
	}
	if err != nil {
		a.Err = err.Error()
		return a
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if how == "connected" {
		_, err = c.Write([]byte(how))
	} else {
		_, err = c.WriteToUDP([]byte(how), to)
	}
	if err != nil {
		a.Err = err.Error()
		return a
	}
	buf := make([]byte, 512)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		a.Err = err.Error()
		return a
	}
	a.Reply = string(buf[:n])
	a.From = netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String()
	return a
}

func askTCP(target string) dnsAnswer {
	a := dnsAnswer{How: "tcp"}
	c, err := net.DialTimeout("tcp", target, 3*time.Second)
	if err != nil {
		a.Err = err.Error()
		return a
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	c.Write([]byte("tcp"))
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		a.Err = err.Error()
	}
	a.Reply = string(b)
	a.From = c.RemoteAddr().String()
	return a
}

// TestDNSCapture: in a pod whose ProxyConfig asks for DNS capture, the
// app's DNS (connected UDP, unconnected UDP, TCP; IPv4 and IPv6) goes to
// the sidecar's DNS proxy on loopback, and UDP replies appear to come from
// the resolver the app asked; the proxy's own queries, other ports and
// pods without capture keep their path.
func TestDNSCapture(t *testing.T) {
	n := newNode(t, false)
	meshed, plain, resolver := n.pod("dnsapp"), n.pod("dnsplain"), n.pod("resolver")
	n.mesh(meshed, mesh.Istio, dnsCaptureAnn)
	n.mesh(plain, mesh.Istio, nil)

	bin := probeBinary(t)
	serve := func(p *testenv.Pod, uid uint32, name string, addrs ...string) {
		out := filepath.Join(testenv.ScratchDir(t), "serve")
		f, err := os.Create(out)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p.Start(t, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: n.cg, Stdout: f,
			Args: append([]string{bin, dnsProbeArg, "serve", name}, addrs...)})
		deadline := time.Now().Add(10 * time.Second)
		for {
			b, _ := os.ReadFile(out)
			if strings.Contains(string(b), "ready") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not start", name)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// Port 53 needs root to bind; the resolver pod is not meshed anyway.
	serve(resolver, 0, "resolver", "[::]:53", "[::]:5353") // dual stack
	for _, p := range []*testenv.Pod{meshed, plain} {
		serve(p, mesh.Istio.ProxyUID, "proxy", "127.0.0.1:15053", "[::1]:15053")
	}
	ask := func(p *testenv.Pod, uid uint32, target string) []dnsAnswer {
		t.Helper()
		out, err := p.Run(t, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: n.cg, Args: []string{bin, dnsProbeArg, "ask", target}}, 20*time.Second)
		if err != nil {
			t.Fatalf("ask %s: %v %s", target, err, out)
		}
		var a []dnsAnswer
		if err := json.Unmarshal(out, &a); err != nil {
			t.Fatalf("%q: %v", out, err)
		}
		return a
	}

	for _, r := range []netip.Addr{resolver.IPv4, resolver.IPv6} {
		dns := netip.AddrPortFrom(r, 53).String()
		before := n.counters()
		for _, a := range ask(meshed, appUID, dns) {
			want := "proxy " + a.How
			if a.How == "tcp" {
				want += " " + dns // the proxy read the original destination
			} else if a.From != dns {
				t.Errorf("%s query to %s: reply seen from %s, want the resolver asked", a.How, dns, a.From)
			}
			if a.Err != "" || !strings.HasPrefix(a.Reply, want) {
				t.Errorf("app %s query to %s: %+v, want the DNS proxy's answer %q", a.How, dns, a, want)
			}
		}
		after := n.counters()
		if got := after["redirect_dns"] - before["redirect_dns"]; got != 3 {
			t.Errorf("redirect_dns counted %d, want 3", got)
		}
		if got := after["dns_reply_restored"] - before["dns_reply_restored"]; got != 2 {
			t.Errorf("dns_reply_restored counted %d, want 2 (both UDP replies)", got)
		}

		untouched := []struct {
			what   string
			pod    *testenv.Pod
			uid    uint32
			target string
		}{
			{"the proxy's own query", meshed, mesh.Istio.ProxyUID, dns},
			{"a pod without DNS capture", plain, appUID, dns},
			{"another UDP port", meshed, appUID, netip.AddrPortFrom(r, 5353).String()},
		}
		for _, u := range untouched {
			for _, a := range ask(u.pod, u.uid, u.target) {
				if a.How == "tcp" && u.what == "a pod without DNS capture" {
					// TCP from an app still goes to the sidecar's outbound
					// listener, where nothing answers in this test.
					continue
				}
				if a.How == "tcp" && u.what == "another UDP port" {
					continue
				}
				if a.Err != "" || !strings.HasPrefix(a.Reply, "resolver ") || (a.How != "tcp" && a.From != u.target) {
					t.Errorf("%s, %s to %s: %+v, want the resolver's own answer", u.what, a.How, u.target, a)
				}
			}
		}
	}
}

// origDst asks the kernel (here: the getsockopt program) where an accepted
// TCP connection was going.
func origDst(c *net.TCPConn) (string, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return "", err
	}
	var res sockoptCall
	v6 := netip.MustParseAddrPort(c.LocalAddr().String()).Addr().Is6()
	rc.Control(func(fd uintptr) {
		if v6 {
			res = getsockopt(int(fd), 41, 80, 28, 28) // SOL_IPV6, IP6T_SO_ORIGINAL_DST
		} else {
			res = getsockopt(int(fd), 0, 80, 16, 16) // SOL_IP, SO_ORIGINAL_DST
		}
	})
	if res.Errno != "" || len(res.Head) < 8 {
		return "", fmt.Errorf("SO_ORIGINAL_DST: %s", res.Errno)
	}
	port := uint16(res.Head[2])<<8 | uint16(res.Head[3])
	var a netip.Addr
	if v6 {
		a = netip.AddrFrom16([16]byte(res.Head[8:24])).Unmap()
	} else {
		a = netip.AddrFrom4([4]byte(res.Head[4:8]))
	}
	return netip.AddrPortFrom(a, port).String(), nil
}
