package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// meshedPair creates a meshed client pod and a meshed server pod through
// the chain, with sidecars, and an app server in the server pod.
func meshedPair(e *env) (client, server *cninode.Pod, clientEvents string) {
	e.t.Helper()
	client, server = e.add("client", istio()), e.add("server", istio())
	scratch := testenv.ScratchDir(e.t)
	for i, p := range []*cninode.Pod{client, server} {
		ev := filepath.Join(scratch, fmt.Sprintf("sidecar%d", i))
		e.start(p, mesh.Istio.ProxyUID, "sidecar", "--events", ev, "--ready", ev+".ready")
		e.waitFile(ev + ".ready")
		if i == 0 {
			clientEvents = ev
		}
	}
	e.startApp(server, "0.0.0.0:8080,[::]:8080")
	return client, server, clientEvents
}

// TestRestartUnderTraffic: requests keep flowing between meshed pods, each
// one redirected through both sidecars, while the agent is stopped with
// SIGTERM and started again, and killed with SIGKILL and started again:
// no request fails and none bypasses the sidecars.
func TestRestartUnderTraffic(t *testing.T) {
	const requests = 3000
	e := newEnv(t, "1.1.0", "")
	client, server, events := meshedPair(e)

	out, err := os.CreateTemp(t.TempDir(), "client-*")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	proc, err := testenv.StartProc(client.NetnsPath, testenv.ProcOpts{UID: 1000, GID: 1000, Cgroup: e.cg, Stdout: out,
		Args: []string{e.bin, "client", "--to", fmt.Sprintf("%s:8080", server.IPv4), "--count", fmt.Sprint(requests), "--bytes", "512"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Kill() })

	restarts := 0
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL, syscall.SIGTERM, syscall.SIGKILL} {
		time.Sleep(200 * time.Millisecond)
		if err := e.node.StopAgent(sig); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // traffic with no agent at all
		if err := e.node.StartAgent(); err != nil {
			t.Fatal(err)
		}
		restarts++
	}
	// The restarts must fall inside the traffic, not after it.
	if done := countLines(t, out.Name()); done >= requests {
		t.Fatalf("the client finished (%d results) before the last restart: raise the request count", done)
	} else {
		t.Logf("%d of %d requests done when the last restart completed", done, requests)
	}
	if err := proc.Wait(5 * time.Minute); err != nil {
		t.Errorf("client: %v", err)
	}
	ok, failed := 0, 0
	f, _ := os.Open(out.Name())
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r wire.ClientResult
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.OK && r.Match {
			ok++
		} else {
			failed++
		}
	}
	ev, err := testenv.ReadEvents[wire.SidecarEvent](events)
	if err != nil {
		t.Fatal(err)
	}
	redirected := 0
	for _, x := range ev {
		if x.Event == wire.EventAccepted && x.OrigDst == fmt.Sprintf("%s:8080", server.IPv4) {
			redirected++
		}
	}
	t.Logf("%d requests across %d agent restarts: %d ok, %d failed, %d through the client's sidecar", requests, restarts, ok, failed, redirected)
	if ok != requests || failed != 0 {
		t.Fatalf("%d of %d requests ok, %d failed", ok, requests, failed)
	}
	if redirected != requests {
		t.Fatalf("%d of %d requests went through the sidecar: redirection lapsed during a restart", redirected, requests)
	}
}

// TestStalePodRemoved: a pod whose netns disappears without a DEL (node
// lost the runtime's state) leaves the maps within the GC interval; a new
// pod on the same netns path is a different pod (its cookie differs).
func TestStalePodRemoved(t *testing.T) {
	e := newEnvWith(t, "1.1.0", "", "--gc-interval=500ms")
	p := e.add("stale", istio())
	if got := e.pinnedEntries(); got["meshlane_pods"] != 1 {
		t.Fatalf("maps %v", got)
	}
	start := time.Now()
	if err := testenv.DeleteNetns(p.NetnsPath); err != nil {
		t.Fatal(err)
	}
	for e.pinnedEntries()["meshlane_pods"] != 0 {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("pod with a deleted netns still in the maps after %s", time.Since(start))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("stale pod removed %s after its netns went away", time.Since(start).Round(10*time.Millisecond))
	if pods := e.agentPods(); len(pods) != 0 {
		t.Fatalf("agent still holds %v", pods)
	}
	// The runtime's late DEL still succeeds.
	if err := e.node.DelPod(context.Background(), p); err != nil {
		t.Fatalf("late DEL: %v", err)
	}
}

func countLines(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range b {
		if c == '\n' {
			n++
		}
	}
	return n
}

// TestIPv6ThroughBothSidecars: between two meshed pods made by the chain,
// an IPv6 request goes through the client's sidecar and the server's, whose
// inbound passthrough connects to the app from ::6: the agent put ::6 on
// the pod's lo, as the Istio init container it replaces would have.
func TestIPv6ThroughBothSidecars(t *testing.T) {
	e := newEnv(t, "1.1.0", "")
	client, server, events := meshedPair(e)
	to := netip.AddrPortFrom(server.IPv6, 8080).String()
	out, err := runIn(e, client, 1000, "client", "--to", to, "--bytes", "65536")
	if err != nil {
		t.Fatalf("client: %v %s", err, out)
	}
	var r wire.ClientResult
	if err := json.Unmarshal(out, &r); err != nil || !r.Match {
		t.Fatalf("client result %s: %v", out, err)
	}
	if !strings.Contains(r.Reply, "remote=[::6]:") {
		t.Fatalf("the app saw %q, want a connection from ::6 (the inbound passthrough)", r.Reply)
	}
	ev, _ := testenv.ReadEvents[wire.SidecarEvent](events)
	if !hasOrig(ev, to) {
		t.Fatalf("not through the client's sidecar: %+v", ev)
	}
}
