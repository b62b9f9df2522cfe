package e2e

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/meshlane/meshlane/bpf"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podns"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// runRemote runs podbin in pod p inside cgroup cg, which has no program
// attached: its connections pass no connect hook, as another node's.
func runRemote(e *env, p *cninode.Pod, cg *testenv.Cgroup, limit time.Duration, args ...string) ([]byte, error) {
	return runInCgroup(e, p, cg, 1000, limit, args...)
}

func clientResults(t *testing.T, out []byte) []wire.ClientResult {
	t.Helper()
	res, err := wire.ReadClientResults(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestRemoteNodePods: pods made through the real CNI chain; "remote node"
// pods whose processes are outside the attached cgroup connect to a meshed
// pod. Every connection reaches its inbound sidecar with the right original
// destination, over IPv4 and IPv6, also while the agent is killed and
// restarted; an excluded port is reached directly; DEL removes the pod's
// inbound hook. Both with the default hooks (sk_lookup, whose listener
// registry must survive the agent's restarts) and with tcx.
func TestRemoteNodePods(t *testing.T) {
	for _, hooks := range []string{"auto", "tcx"} {
		t.Run(hooks, func(t *testing.T) { testRemoteNodePods(t, hooks) })
	}
}

func testRemoteNodePods(t *testing.T, hooks string) {
	e := newEnvWith(t, "1.1.0", "", "--inbound-hooks", hooks)
	server := e.add("server", map[string]string{
		mesh.Istio.Marker: "{}",
		"traffic.sidecar.istio.io/excludeInboundPorts": "9090",
	})
	remote := e.add("remote", nil)
	remoteCg := testenv.TempCgroup(t)
	scratch := testenv.ScratchDir(t)
	events := filepath.Join(scratch, "sidecar")
	e.start(server, mesh.Istio.ProxyUID, "sidecar", "--events", events, "--ready", events+".ready")
	e.waitFile(events + ".ready")
	e.startApp(server, "0.0.0.0:8080,[::]:8080,0.0.0.0:9090,[::]:9090")

	inbound := func() map[string]int {
		ev, _ := testenv.ReadEvents[wire.SidecarEvent](events)
		out := map[string]int{}
		for _, x := range ev {
			if x.Event == wire.EventAccepted && x.Listener == wire.ListenerInbound {
				out[x.OrigDst]++
			}
		}
		return out
	}

	for _, ip := range []netip.Addr{server.IPv4, server.IPv6} {
		to := netip.AddrPortFrom(ip, 8080).String()
		before := inbound()[to]
		out, err := runRemote(e, remote, remoteCg, 30*time.Second, "client", "--to", to)
		if err != nil {
			t.Fatalf("remote client to %s: %v %s", to, err, out)
		}
		if got := inbound()[to] - before; got != 1 {
			t.Fatalf("connection to %s: the inbound sidecar accepted %d connections with that original destination, want 1", to, got)
		}
		excl := netip.AddrPortFrom(ip, 9090).String()
		out, err = runRemote(e, remote, remoteCg, 30*time.Second, "client", "--to", excl)
		if err != nil {
			t.Fatalf("remote client to %s: %v %s", excl, err, out)
		}
		if r := clientResults(t, out); len(r) != 1 || !bytes.Contains([]byte(r[0].Reply), []byte("local="+excl)) {
			t.Fatalf("excluded port: %+v, want the app reached directly at %s", r, excl)
		}
		if n := inbound()[excl]; n != 0 {
			t.Fatalf("excluded port went through the sidecar %d times", n)
		}
	}

	t.Run("agent killed and restarted under remote traffic", func(t *testing.T) {
		const requests = 1500
		to := netip.AddrPortFrom(server.IPv4, 8080).String()
		before := inbound()[to]
		type result struct {
			out []byte
			err error
		}
		done := make(chan result, 1)
		go func() {
			out, err := runRemote(e, remote, remoteCg, 5*time.Minute, "client", "--to", to, "--count", strconv.Itoa(requests))
			done <- result{out, err}
		}()
		for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
			time.Sleep(300 * time.Millisecond)
			if err := e.node.StopAgent(sig); err != nil {
				t.Fatal(err)
			}
			if err := e.node.StartAgent(); err != nil {
				t.Fatal(err)
			}
		}
		r := <-done
		if r.err != nil {
			t.Fatalf("remote client: %v", r.err)
		}
		res := clientResults(t, r.out)
		ok := 0
		for _, x := range res {
			if x.OK {
				ok++
			}
		}
		if ok != requests {
			t.Fatalf("%d of %d requests succeeded", ok, requests)
		}
		if got := inbound()[to] - before; got != requests {
			t.Fatalf("%d of %d requests went through the inbound sidecar", got, requests)
		}
	})

	t.Run("no record outlives its connection", func(t *testing.T) {
		var (
			k bpf.MeshlaneMlTuple
			v bpf.MeshlaneMlOrigdst
		)
		n := -1
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && n != 0; time.Sleep(100 * time.Millisecond) {
			n = 0
			eachEntry(e, "meshlane_origdst", &k, &v, func(_, _ any) { n++ })
		}
		if n != 0 {
			t.Fatalf("meshlane_origdst still holds %d entries", n)
		}
	})

	cookie, err := podns.NetnsCookie(server.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(e.bpffs, "inbound", fmt.Sprint(cookie))
	if _, err := os.Stat(pins); err != nil {
		t.Fatalf("the meshed pod's inbound hook is not pinned: %v", err)
	}
	// auto is sk_lookup on the kernels this runs on (BTF, TCP iterator).
	pin := map[string]string{"auto": "sk_lookup", "tcx": "ingress"}[hooks]
	if _, err := os.Stat(filepath.Join(pins, pin)); err != nil {
		t.Fatalf("no %s link pinned for the meshed pod: %v", pin, err)
	}
	if err := e.node.DelPod(t.Context(), server); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pins); !os.IsNotExist(err) {
		t.Fatalf("DEL left the pod's inbound hook pinned at %s (%v)", pins, err)
	}
}
