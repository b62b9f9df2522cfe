package main

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// TestMain fails the run if a privileged test leaves anything behind.
func TestMain(m *testing.M) { testenv.Main(m) }

// TestCSidecar runs the C sidecar as the bench does, in two meshed pods
// under meshlane's redirect, plain and with the short-circuit (where sk_msg
// feeds its sockets), and pushes 1 MiB each way through both sidecars per
// family: the bytes come back intact, and the server sees the original
// destination and the passthrough source. A connection nothing redirected
// is refused, and SIGTERM ends the sidecar cleanly.
func TestCSidecar(t *testing.T) {
	testenv.RequireRoot(t)
	bin, err := buildCSidecar(filepath.Join("csidecar", "sidecar.c"), testenv.ScratchDir(t))
	if err != nil {
		t.Fatal(err)
	}
	podbin := testenv.BuildPodbin(t)
	for i, sockmap := range []bool{false, true} {
		t.Run(fmt.Sprintf("sockmap=%v", sockmap), func(t *testing.T) {
			cg := testenv.TempCgroup(t)
			dp, err := datapath.Load(datapath.Options{BPFFS: filepath.Join(testenv.BPFFS(t), "meshlane"), CgroupPath: cg.Path, Sockmap: sockmap})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := dp.Uninstall(); err != nil {
					t.Errorf("uninstall datapath: %v", err)
				}
			})
			v4, v6, err := testenv.FreeSubnets()
			if err != nil {
				t.Fatal(err)
			}
			br := testenv.NewBridge(t, fmt.Sprintf("csc%d", i), v4, v6)
			pod := func(label string, host int) *testenv.Pod {
				a4, a6 := br.Addr(host)
				p := testenv.NewPod(t, br, label, a4, a6)
				if err := meshPod(dp, p); err != nil {
					t.Fatal(err)
				}
				return p
			}
			a, b := pod("a", hostA), pod("b", hostB)
			scratch := testenv.ScratchDir(t)
			start := func(p *testenv.Pod, name string, uid uint32, args ...string) (*testenv.Proc, string) {
				ready, log := filepath.Join(scratch, name+".ready"), filepath.Join(scratch, name+".log")
				out, err := os.Create(log)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { out.Close() })
				proc := p.Start(t, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: cg, Stdout: out, Stderr: out,
					Args: append(args, "--ready", ready)})
				if err := testenv.WaitFile(ready, 10*time.Second); err != nil {
					b, _ := os.ReadFile(log)
					t.Fatalf("%s: %v\n%s", name, err, b)
				}
				return proc, log
			}
			sidecarA, logA := start(a, "sidecar-a", mesh.Istio.ProxyUID, bin)
			start(b, "sidecar-b", mesh.Istio.ProxyUID, bin)
			start(b, "server", appUID, podbin, "server", "--name", "b", "--listen", fmt.Sprintf("0.0.0.0:%d,[::]:%d", appPort, appPort))

			client := func(uid uint32, to netip.AddrPort, args ...string) ([]wire.ClientResult, error) {
				out, err := a.Run(t, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: cg,
					Args: append([]string{podbin, "client", "--to", to.String(), "--timeout", "10s"}, args...)}, time.Minute)
				res, rerr := wire.ReadClientResults(bytes.NewReader(out))
				if rerr != nil {
					t.Fatal(rerr)
				}
				return res, err
			}
			const size = 1 << 20
			for _, c := range []struct {
				dst, passthrough netip.Addr
			}{{b.IPv4, netip.MustParseAddr("127.0.0.6")}, {b.IPv6, netip.MustParseAddr("::6")}} {
				to := netip.AddrPortFrom(c.dst, appPort)
				res, err := client(appUID, to, "--bytes", fmt.Sprint(size))
				if err != nil || len(res) != 1 || !res[0].OK || !res[0].Match || res[0].Bytes != size {
					t.Fatalf("client to %s through both sidecars: %v, %+v", to, err, res)
				}
				r := parseReply(t, res[0].Reply)
				if r.Name != "b" || r.Remote.Addr() != c.passthrough || r.Local != to {
					t.Fatalf("server %s reached at %s from %s: want b reached at %s from %s", r.Name, r.Local, r.Remote, to, c.passthrough)
				}
			}
			counters, err := dp.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if counters["redirect_outbound"] < 2 || counters["redirect_inbound"] < 2 || counters["origdst_answered"] < 4 {
				t.Fatalf("datapath counters %v: want both connections redirected out and in, and 4 original destinations answered", counters)
			}
			if sockmap && counters["msg_redirected"] == 0 {
				t.Fatalf("datapath counters %v: the short-circuit redirected no message", counters)
			}

			// The proxy's own connect is not redirected: the sidecar finds
			// no original destination other than itself, and closes.
			if res, err := client(mesh.Istio.ProxyUID, netip.MustParseAddrPort("127.0.0.1:15001")); err == nil {
				t.Fatalf("a connection nothing redirected was relayed: %+v", res)
			}

			if err := sidecarA.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if err := sidecarA.Wait(5 * time.Second); err != nil {
				t.Fatalf("sidecar after SIGTERM: %v", err)
			}
			log, err := os.ReadFile(logA)
			if err != nil {
				t.Fatal(err)
			}
			// Two relayed, one refused (which reason depends on whether
			// conntrack tracks the pod's loopback), none aborted.
			i := bytes.LastIndex(log, []byte("exit:"))
			if i < 0 {
				t.Fatalf("sidecar A printed no exit line; its log:\n%s", log)
			}
			exit := string(log[i:])
			for _, want := range []string{"accepted 3,", "relayed 2,", "upstream failed 0,", "aborted 0,"} {
				if !strings.Contains(exit, want) {
					t.Fatalf("sidecar A's exit line %q lacks %q; its log:\n%s", exit, want, log)
				}
			}
		})
	}
}

func parseReply(t *testing.T, s string) wire.Reply {
	t.Helper()
	r, err := wire.ParseReply(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
