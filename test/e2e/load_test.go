package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// agentPID is the pid of the process serving the agent's socket, from the
// socket's peer credentials.
func agentPID(e *env) int {
	e.t.Helper()
	c, err := net.Dial("unix", e.node.Sock)
	if err != nil {
		e.t.Fatal(err)
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		e.t.Fatal(err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		e.t.Fatal(err)
	}
	if cerr != nil {
		e.t.Fatalf("SO_PEERCRED on the agent socket: %v", cerr)
	}
	return int(cred.Pid)
}

// usage is what the agent process holds at one moment.
type usage struct {
	fds, goroutines int
	entries         map[string]int
}

func (u usage) String() string {
	return fmt.Sprintf("%d fds, %d goroutines, map entries %v", u.fds, u.goroutines, u.entries)
}

// measure reads the agent's open files from /proc, its goroutines from
// its own /metrics (go_goroutines), and the pinned maps' entries. c is
// the one client the caller uses throughout, so the agent sees the same
// connections from the test at every measure.
func measure(e *env, c *api.Client, pid int) usage {
	e.t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		e.t.Fatal(err)
	}
	return usage{fds: len(fds), goroutines: int(scrape(e, c)["go_goroutines"]), entries: e.pinnedEntries()}
}

// settled waits up to 15s for the agent to give back what a burst took:
// open files and goroutines back within slack of base (connections of
// exited plugins and their goroutines take a moment to go), map entries
// exactly as in base.
func settled(e *env, c *api.Client, pid int, base usage) usage {
	e.t.Helper()
	const fdSlack, goroutineSlack = 2, 4
	deadline := time.Now().Add(15 * time.Second)
	for {
		u := measure(e, c, pid)
		if u.fds <= base.fds+fdSlack && u.goroutines <= base.goroutines+goroutineSlack && sameCounts(u.entries, base.entries) {
			return u
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("the agent kept what the load took: now %v, before %v", u, base)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// scrape reads the agent's Prometheus metrics over its socket: series
// (name with labels, as written) to value.
func scrape(e *env, c *api.Client) map[string]float64 {
	e.t.Helper()
	raw, err := c.Do(context.Background(), "GET", api.PathMetrics, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(raw), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// requireFileLimit checks that processes started now may open n files:
// Go programs raise their soft limit to the hard one, which only
// CAP_SYS_RESOURCE can raise (this machine's root lacks it), so the hard
// limit the test inherits is what every pod process gets.
func requireFileLimit(t *testing.T, n uint64) {
	t.Helper()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max >= n {
		return
	}
	msg := fmt.Sprintf("pod processes need %d open files but the hard limit is %d: run with a higher `ulimit -Hn`", n, lim.Max)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// TestPodChurnUnderTraffic: 1,000 pods (Istio, Linkerd and plain, mixed)
// added and deleted through libcni by 16 workers at once, as fast as the
// machine goes, while requests run without pause between two meshed pods.
// Every ADD and DEL succeeds, no request fails and every one goes through
// the client's sidecar; afterwards the agent holds only the two pods, and
// its open files, goroutines and the map entries are back where they were.
func TestPodChurnUnderTraffic(t *testing.T) {
	const pods, workers = 1000, 16
	e := newEnv(t, "1.1.0", "")
	client, server, events := meshedPair(e)
	c := agentClient(e)
	pid := agentPID(e)
	annotations := []map[string]string{istio(), {mesh.Linkerd.Marker: "stable"}, istio(), {"app": "plain"}}
	churn := func(n int) (time.Duration, []error) {
		var wg sync.WaitGroup
		var next atomic.Int64
		var mu sync.Mutex
		var errs []error
		start := time.Now()
		for range workers {
			wg.Go(func() {
				for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
					p, err := e.node.AddPod(context.Background(), "churn", fmt.Sprintf("p%d", i), annotations[i%len(annotations)])
					if err == nil {
						err = e.node.DelPod(context.Background(), p)
					}
					if err != nil {
						mu.Lock()
						errs = append(errs, fmt.Errorf("pod p%d: %w", i, err))
						mu.Unlock()
					}
				}
			})
		}
		wg.Wait()
		return time.Since(start), errs
	}
	// A first round makes whatever the agent creates lazily (plugin
	// connections, metrics series) exist before the baseline.
	if _, errs := churn(workers); len(errs) > 0 {
		t.Fatal(errs)
	}
	base := measure(e, c, pid)

	out, err := os.CreateTemp(t.TempDir(), "client-*")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	to := fmt.Sprintf("%s:8080", server.IPv4)
	// Bounded by count, stopped once the churn is over.
	traffic, err := testenv.StartProc(client.NetnsPath, testenv.ProcOpts{UID: 1000, GID: 1000, Cgroup: e.cg, Stdout: out,
		Args: []string{e.bin, "client", "--to", to, "--count", "1000000", "--bytes", "512"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { traffic.Kill() })

	took, errs := churn(pods)
	// Every line written is one finished request: the client writes each
	// result with a single write, so the kill cuts none in half.
	traffic.Kill()
	for _, err := range errs {
		t.Error(err)
	}
	ok, failed := 0, 0
	var firstErr string
	f, err := os.Open(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r wire.ClientResult
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.OK && r.Match {
			ok++
			continue
		}
		failed++
		if firstErr == "" {
			firstErr = sc.Text()
		}
	}
	ev, err := testenv.ReadEvents[wire.SidecarEvent](events)
	if err != nil {
		t.Fatal(err)
	}
	redirected := 0
	for _, x := range ev {
		if x.Event == wire.EventAccepted && x.OrigDst == to {
			redirected++
		}
	}
	after := settled(e, c, pid, base)
	t.Logf("%d pods added and deleted by %d workers in %s (%.0f pods/s), %d failed; meanwhile %d requests ok, %d failed, %d through the client's sidecar; agent before: %v; after: %v",
		pods, workers, took.Round(time.Millisecond), float64(pods)/took.Seconds(), len(errs), ok, failed, redirected, base, after)
	if failed != 0 || ok == 0 {
		t.Fatalf("%d requests ok, %d failed during the churn; first failure: %s", ok, failed, firstErr)
	}
	// The client may have been killed between the sidecar's accept and
	// its own result line: at most one more accepted than finished.
	if redirected < ok || redirected > ok+1 {
		t.Fatalf("%d requests finished, %d went through the sidecar", ok, redirected)
	}
	if held := heldPods(e); len(held) != 2 {
		t.Fatalf("after the churn the agent holds %d pods, want the 2 of the traffic", len(held))
	}
	checkConsistent(e)
}

// TestTenThousandConnections: 10,000 connections held open at once, each
// from a meshed pod's app through its own sidecar to a server pod and
// redirected with its original destination; none is lost while held. Two
// client pods carry 5,000 each: a sidecar holds two sockets per
// connection, and the file limit here (20,000, which root without
// CAP_SYS_RESOURCE cannot raise) leaves one process short of 20,000
// sockets. The agent, which no connection involves, keeps its open files;
// the maps' entries are back where they were once the connections close.
func TestTenThousandConnections(t *testing.T) {
	const clients, perClient = 2, 5000
	const conns = clients * perClient
	// The server holds one socket per connection.
	requireFileLimit(t, conns+100)
	e := newEnv(t, "1.1.0", "")
	server := e.add("server", map[string]string{"app": "server"})
	scratch := testenv.ScratchDir(t)
	startProc(e, server, 1000, "server", "--name", "s", "--listen", "0.0.0.0:8080", "--ready", filepath.Join(scratch, "app.ready"))
	e.waitFile(filepath.Join(scratch, "app.ready"))
	to := netip.AddrPortFrom(server.IPv4, 8080).String()
	var pods []*cninode.Pod
	for i := range clients {
		p := e.add(fmt.Sprintf("client%d", i), istio())
		ev := filepath.Join(scratch, p.Name)
		startProc(e, p, mesh.Istio.ProxyUID, "sidecar", "--inbound", "", "--events", ev, "--ready", ev+".ready")
		e.waitFile(ev + ".ready")
		pods = append(pods, p)
	}
	c := agentClient(e)
	pid := agentPID(e)
	base := measure(e, c, pid)

	start := time.Now()
	holds := make([]*testenv.Proc, clients)
	outs := make([]string, clients)
	for i, p := range pods {
		outs[i] = filepath.Join(scratch, p.Name+".out")
		out, err := os.Create(outs[i])
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		holds[i], err = testenv.StartProc(p.NetnsPath, testenv.ProcOpts{UID: 1000, GID: 1000, Cgroup: e.cg, Stdout: out, Stderr: out,
			Args: []string{e.bin, "hold", "--to", to, "--conns", fmt.Sprint(perClient), "--parallel", "32",
				"--ready", outs[i] + ".ready", "--hold", "3m"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { holds[i].Kill() })
	}
	for _, o := range outs {
		if err := testenv.WaitFile(o+".ready", 3*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	opened := time.Since(start)

	// All open now: each went through its pod's sidecar to the server.
	sidecarEvents := func(kind string) int {
		n := 0
		for _, p := range pods {
			ev, err := testenv.ReadEvents[wire.SidecarEvent](filepath.Join(scratch, p.Name))
			if err != nil {
				t.Fatal(err)
			}
			for _, x := range ev {
				if x.Event == kind && x.OrigDst == to && x.UpstreamErr == "" && x.CopyErr == "" {
					n++
				}
			}
		}
		return n
	}
	accepted := sidecarEvents(wire.EventAccepted)
	var st api.Status
	if err := c.Get(context.Background(), api.PathStatus, &st); err != nil {
		t.Fatal(err)
	}
	during := measure(e, c, pid)

	var total wire.HoldResult
	var failures []string
	for i, h := range holds {
		if err := h.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		werr := h.Wait(time.Minute)
		b, _ := os.ReadFile(outs[i])
		var res wire.HoldResult
		if err := json.Unmarshal(b, &res); err != nil {
			t.Fatalf("hold result %q: %v (exit: %v)", b, err, werr)
		}
		if werr != nil {
			failures = append(failures, fmt.Sprintf("%s: %v: %s", pods[i].Name, werr, b))
		}
		total.Opened += res.Opened
		total.Failed += res.Failed
		total.Alive += res.Alive
	}
	// Each sidecar sees every connection end cleanly.
	closed := 0
	for deadline := time.Now().Add(time.Minute); closed < conns && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		closed = sidecarEvents(wire.EventClosed)
	}
	after := settled(e, c, pid, base)
	origdst := st.Datapath.Maps["meshlane_origdst"]
	t.Logf("%d connections from %d pods opened in %s (%d failed), %d through the sidecars with the right original destination, %d still open after the hold, %d closed cleanly at the sidecars; "+
		"meshlane_origdst while held: %d of %d; agent before: %v; while held: %v; after: %v",
		total.Opened, clients, opened.Round(time.Millisecond), total.Failed, accepted, total.Alive, closed, origdst.Entries, origdst.Capacity, base, during, after)
	if len(failures) > 0 || total.Opened != conns || total.Alive != conns {
		t.Fatalf("hold: %+v %v", total, failures)
	}
	if accepted != conns || closed != conns {
		t.Fatalf("the sidecars accepted %d and closed %d connections cleanly, want %d each", accepted, closed, conns)
	}
	if during.fds > base.fds+2 {
		t.Fatalf("the agent's open files went from %d to %d while connections it has no part in were held", base.fds, during.fds)
	}
}

// startProc starts podbin in a pod with the node's cgroup, killed at the
// end of the test, and returns it.
func startProc(e *env, p *cninode.Pod, uid uint32, args ...string) *testenv.Proc {
	e.t.Helper()
	proc, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: e.cg, Args: append([]string{e.bin}, args...)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { proc.Kill() })
	return proc
}

// TestFullMapReported: a pod whose rules do not fit fails its ADD with an
// error naming the full map, which the plugin turns into "try again later";
// the agent logs it, and its /v1/status and /metrics show the map's fill.
// The refused pod leaves nothing behind and the others keep working. With
// the capacities fixed in the datapath (meshlane_ports: 65,536 entries) a
// Linkerd pod skipping every inbound port (65,535 entries) fills it, and a
// second one skipping every outbound port no longer fits.
func TestFullMapReported(t *testing.T) {
	e := newEnv(t, "1.1.0", "")
	c := agentClient(e)
	pid := agentPID(e)
	base := measure(e, c, pid)
	linkerd := func(k, v string) map[string]string { return map[string]string{mesh.Linkerd.Marker: "stable", k: v} }

	wide := e.add("wide", linkerd("config.linkerd.io/skip-inbound-ports", "1-65535"))
	_, off := e.logSince(0)
	_, err := e.node.AddPod(context.Background(), "default", "wider", linkerd("config.linkerd.io/skip-outbound-ports", "1-65535"))
	if err == nil || cniCode(err) != int(types.ErrTryAgainLater) || !strings.Contains(err.Error(), "meshlane_ports is full") {
		t.Fatalf("ADD of a pod whose rules do not fit: %v (code %d), want code 11 naming meshlane_ports", err, cniCode(err))
	}
	log, _ := e.logSince(off)
	logged := false
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "pod refused") && strings.Contains(l, "meshlane_ports is full") {
			logged = true
		}
	}
	if !logged {
		t.Fatalf("no agent log line naming the full map:\n%s", log)
	}

	var st api.Status
	if err := c.Get(context.Background(), api.PathStatus, &st); err != nil {
		t.Fatal(err)
	}
	fill := st.Datapath.Maps["meshlane_ports"]
	m := scrape(e, c)
	entries, capacity := m[`meshlane_map_entries{map="meshlane_ports"}`], m[`meshlane_map_capacity{map="meshlane_ports"}`]
	t.Logf("meshlane_ports: /v1/status %d of %d, /metrics %.0f of %.0f; refused: %v", fill.Entries, fill.Capacity, entries, capacity, err)
	if fill.Capacity != 65536 || fill.Entries < fill.Capacity-1 || float64(fill.Entries) != entries || float64(fill.Capacity) != capacity {
		t.Fatalf("the map's fill is not reported: status %+v, metrics %v of %v", fill, entries, capacity)
	}
	// The refused pod took back what it wrote: the map holds the first
	// pod alone, which still has its rules.
	if got := e.pinnedEntries(); got["meshlane_pods"] != 1 || got["meshlane_ports"] != fill.Entries {
		t.Fatalf("after the refusal the maps hold %v", got)
	}
	checkConsistent(e)

	if err := e.node.DelPod(context.Background(), wide); err != nil {
		t.Fatal(err)
	}
	after := settled(e, c, pid, base)
	t.Logf("agent before: %v; after: %v", base, after)
}
