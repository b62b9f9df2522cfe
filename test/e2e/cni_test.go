// Package e2e drives meshlane the way a node does: pods created through
// libcni with the reference bridge and host-local plugins and meshlane-cni
// chained, the real agent binary holding the datapath, real sockets.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

var (
	buildOnce sync.Once
	bins      cninode.Binaries
	buildErr  error
)

func binaries(t *testing.T) cninode.Binaries {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "meshlane-e2e-bin-*")
		if err != nil {
			buildErr = err
			return
		}
		testenv.AtExit(func() error { return os.RemoveAll(dir) })
		bins, buildErr = cninode.Build(dir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return bins
}

// env is one simulated node for a test.
type env struct {
	t     *testing.T
	node  *cninode.Node
	cg    *testenv.Cgroup
	bpffs string
	bin   string
	log   *bytes.Buffer
}

func newEnv(t *testing.T, cniVersion, failPolicy string) *env {
	t.Helper()
	return newEnvWith(t, cniVersion, failPolicy)
}

// newEnvWith starts a node whose agent gets extra flags.
func newEnvWith(t *testing.T, cniVersion, failPolicy string, agentArgs ...string) *env {
	t.Helper()
	return newEnvOpts(t, func(o *cninode.Options) {
		o.CNIVersion, o.FailPolicy, o.AgentArgs = cniVersion, failPolicy, agentArgs
	})
}

// newEnvOpts starts a node with options set by edit.
func newEnvOpts(t *testing.T, edit func(*cninode.Options)) *env {
	t.Helper()
	testenv.RequireRoot(t)
	e := &env{t: t, cg: testenv.TempCgroup(t), bpffs: filepath.Join(testenv.BPFFS(t), "meshlane"), bin: testenv.BuildPodbin(t), log: &bytes.Buffer{}}
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		t.Fatal(err)
	}
	brName := testenv.LinkName()
	opts := cninode.Options{
		Bin: binaries(t), Dir: t.TempDir(), Cgroup: e.cg, BPFFS: e.bpffs,
		Bridge: brName, Subnet4: v4, Subnet6: v6, AgentLog: syncWriter{e},
	}
	edit(&opts)
	e.node, err = cninode.Start(opts)
	if err != nil {
		t.Fatalf("%v\nagent log:\n%s", err, e.log)
	}
	t.Cleanup(func() {
		e.node.Close()
		testenv.DeleteLink(brName)
		if t.Failed() {
			t.Logf("agent log:\n%s", e.log)
		}
	})
	return e
}

var logMu sync.Mutex

type syncWriter struct{ e *env }

func (w syncWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	return w.e.log.Write(p)
}

func istio() map[string]string { return map[string]string{mesh.Istio.Marker: "{}"} }

func (e *env) add(name string, ann map[string]string) *cninode.Pod {
	e.t.Helper()
	p, err := e.node.AddPod(context.Background(), "default", name, ann)
	if err != nil {
		e.t.Fatalf("ADD %s: %v", name, err)
	}
	e.t.Cleanup(func() { e.node.DelPod(context.Background(), p) })
	return p
}

// cgroupOf is where p's processes run: the pod's own cgroup when the node
// makes one per pod, the node's otherwise.
func (e *env) cgroupOf(p *cninode.Pod) *testenv.Cgroup {
	if p.Cgroup != nil {
		return p.Cgroup
	}
	return e.cg
}

// start runs podbin in a pod, inside the pod's cgroup.
func (e *env) start(p *cninode.Pod, uid uint32, args ...string) {
	e.t.Helper()
	proc, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: e.cgroupOf(p), Args: append([]string{e.bin}, args...)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { proc.Kill() })
}

// startApp runs podbin's app server "s" in a pod as uid 1000, listening on
// listen (comma separated ip:port), and waits until it listens.
func (e *env) startApp(p *cninode.Pod, listen string) {
	e.t.Helper()
	ready := filepath.Join(testenv.ScratchDir(e.t), "app.ready")
	e.start(p, 1000, "server", "--name", "s", "--listen", listen, "--ready", ready)
	e.waitFile(ready)
}

func (e *env) waitFile(path string) {
	e.t.Helper()
	if err := testenv.WaitFile(path, 10*time.Second); err != nil {
		e.t.Fatal(err)
	}
}

// pinnedEntries counts the entries of the agent's pinned maps.
func (e *env) pinnedEntries() map[string]int {
	e.t.Helper()
	out := map[string]int{}
	dir := filepath.Join(e.bpffs, fmt.Sprintf("maps-v%d", datapath.LayoutVersion))
	for _, name := range []string{"meshlane_pods", "meshlane_podips", "meshlane_ports", "meshlane_cidrs"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			e.t.Fatal(err)
		}
		n := 0
		k := make([]byte, m.KeySize())
		v := make([]byte, m.ValueSize())
		it := m.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		m.Close()
		out[name] = n
	}
	return out
}

func (e *env) agentPods() []map[string]any {
	e.t.Helper()
	var pods []map[string]any
	if err := api.NewClient(e.node.Sock).Get(context.Background(), api.PathPods, &pods); err != nil {
		e.t.Fatal(err)
	}
	return pods
}

func cniCode(err error) int {
	var te *types.Error
	if errors.As(err, &te) {
		return int(te.Code)
	}
	return -1
}

// TestPodLifecycle: through libcni, for the oldest and newest list
// versions a runtime writes, a meshed pod is redirected from its first
// connection, CHECK and STATUS pass, and DEL removes it from every map.
func TestPodLifecycle(t *testing.T) {
	for _, v := range []string{"0.3.1", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			e := newEnv(t, v, "")
			empty := e.pinnedEntries()
			client := e.add("client", istio())
			server := e.add("server", nil) // no annotations: not meshed until a sidecar listens; it never will
			if client.IPv4 == (netip.Addr{}) || client.IPv6 == (netip.Addr{}) {
				t.Fatalf("pod IPs from the chain: %+v", client)
			}
			scratch := testenv.ScratchDir(t)
			events, ready := filepath.Join(scratch, "events"), filepath.Join(scratch, "ready")
			e.start(client, mesh.Istio.ProxyUID, "sidecar", "--events", events, "--ready", ready)
			e.waitFile(ready)
			e.startApp(server, "0.0.0.0:8080,[::]:8080")

			// The first connection of a fresh process, v4 and v6.
			for _, ip := range []netip.Addr{server.IPv4, server.IPv6} {
				to := netip.AddrPortFrom(ip, 8080).String()
				out, err := runIn(e, client, 1000, "client", "--to", to)
				if err != nil {
					t.Fatalf("client to %s: %v %s", to, err, out)
				}
				ev, _ := testenv.ReadEvents[wire.SidecarEvent](events)
				if !hasOrig(ev, to) {
					t.Fatalf("the sidecar did not get the first connection to %s: %+v", to, ev)
				}
			}
			// CHECK came with 0.4.0 and STATUS with 1.1.0.
			if v == "1.1.0" {
				if err := e.node.CheckPod(context.Background(), client); err != nil {
					t.Fatalf("CHECK: %v", err)
				}
				if err := e.node.Status(context.Background()); err != nil {
					t.Fatalf("STATUS: %v", err)
				}
			}
			if got := e.pinnedEntries(); got["meshlane_pods"] != 1 || got["meshlane_podips"] != 2 {
				t.Fatalf("maps hold %v, want the one meshed pod with its two IPs", got)
			}
			for _, p := range []*cninode.Pod{client, server} {
				if err := e.node.DelPod(context.Background(), p); err != nil {
					t.Fatalf("DEL: %v", err)
				}
				// DEL again, as runtimes do: still succeeds.
				if err := e.node.DelPod(context.Background(), p); err != nil {
					t.Fatalf("second DEL: %v", err)
				}
			}
			if got := e.pinnedEntries(); !sameCounts(got, empty) {
				t.Fatalf("after DEL the maps hold %v, want %v", got, empty)
			}
			if pods := e.agentPods(); len(pods) != 0 {
				t.Fatalf("agent still holds %v", pods)
			}
		})
	}
}

func sameCounts(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return len(a) == len(b)
}

func hasOrig(ev []wire.SidecarEvent, orig string) bool {
	for _, e := range ev {
		if e.Event == wire.EventAccepted && e.OrigDst == orig {
			return true
		}
	}
	return false
}

func runIn(e *env, p *cninode.Pod, uid uint32, args ...string) ([]byte, error) {
	return runInCgroup(e, p, e.cgroupOf(p), uid, 30*time.Second, args...)
}

// runInCgroup runs podbin in pod p inside cgroup cg as uid, waits up to
// limit and returns its combined output.
func runInCgroup(e *env, p *cninode.Pod, cg *testenv.Cgroup, uid uint32, limit time.Duration, args ...string) ([]byte, error) {
	out, err := os.CreateTemp(e.t.TempDir(), "out-*")
	if err != nil {
		return nil, err
	}
	defer out.Close()
	proc, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: cg, Stdout: out, Stderr: out, Args: append([]string{e.bin}, args...)})
	if err != nil {
		return nil, err
	}
	werr := proc.Wait(limit)
	b, _ := os.ReadFile(out.Name())
	return b, werr
}

// TestAgentDown: with the agent stopped, a meshed pod's ADD fails with
// "try again later" under failPolicy closed and succeeds under open; DEL
// always succeeds; STATUS reports the plugin unavailable only when closed.
func TestAgentDown(t *testing.T) {
	for _, policy := range []string{"closed", "open"} {
		t.Run(policy, func(t *testing.T) {
			e := newEnv(t, "1.1.0", policy)
			p := e.add("before", istio())
			if err := e.node.StopAgent(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if err := e.node.DelPod(context.Background(), p); err != nil {
				t.Fatalf("DEL with the agent down: %v", err)
			}
			q, err := e.node.AddPod(context.Background(), "default", "during", istio())
			statusErr := e.node.Status(context.Background())
			switch policy {
			case "closed":
				if cniCode(err) != int(types.ErrTryAgainLater) {
					t.Fatalf("ADD with the agent down: %v (code %d), want code 11", err, cniCode(err))
				}
				if cniCode(statusErr) != int(types.ErrPluginNotAvailable) {
					t.Fatalf("STATUS with the agent down: %v, want code 50", statusErr)
				}
			case "open":
				if err != nil {
					t.Fatalf("ADD with failPolicy open: %v", err)
				}
				e.node.DelPod(context.Background(), q)
				if statusErr != nil {
					t.Fatalf("STATUS with failPolicy open: %v", statusErr)
				}
			}
			// Back up: the pod deleted while it was down is gone from the
			// agent once it restores (its netns is gone).
			if err := e.node.StartAgent(); err != nil {
				t.Fatal(err)
			}
			if got := e.pinnedEntries(); got["meshlane_pods"] != 0 {
				t.Fatalf("after restart the maps hold %v", got)
			}
		})
	}
}

// TestAgentRestartBetweenAddAndDel: a pod added before an agent restart
// (SIGTERM or SIGKILL) is still held and redirected after it, and its DEL
// still cleans up.
func TestAgentRestartBetweenAddAndDel(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			e := newEnv(t, "1.1.0", "")
			p := e.add("pod", istio())
			before := e.pinnedEntries()
			if err := e.node.StopAgent(sig); err != nil {
				t.Fatal(err)
			}
			if got := e.pinnedEntries(); !sameCounts(got, before) {
				t.Fatalf("agent stop changed the maps: %v, before %v", got, before)
			}
			if err := e.node.StartAgent(); err != nil {
				t.Fatal(err)
			}
			if err := e.node.CheckPod(context.Background(), p); err != nil {
				t.Fatalf("CHECK after restart: %v", err)
			}
			if err := e.node.DelPod(context.Background(), p); err != nil {
				t.Fatal(err)
			}
			if got := e.pinnedEntries(); got["meshlane_pods"] != 0 || got["meshlane_podips"] != 0 {
				t.Fatalf("after DEL: %v", got)
			}
		})
	}
}

// TestUpgradeFromLegacyStateFile: an agent started on a node whose older
// agent kept every pod in one pods.json takes those pods over: they are
// held, in the maps and redirected, each now has its own state file,
// pods.json is gone, and DEL still cleans up.
func TestUpgradeFromLegacyStateFile(t *testing.T) {
	e := newEnv(t, "1.1.0", "")
	server := e.add("server", map[string]string{"app": "server"})
	e.startApp(server, "0.0.0.0:8080")
	p := e.add("meshed", istio())
	before := e.pinnedEntries()
	if err := e.node.StopAgent(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	// Turn the pod files into what the older agent left: the same
	// records in one {"version": 1, "pods": [...]} file, no pods/.
	podsDir := filepath.Join(e.node.State, "pods")
	files, err := filepath.Glob(filepath.Join(podsDir, "*.json"))
	if err != nil || len(files) != 2 {
		t.Fatalf("pod state files %v (%v), want 2", files, err)
	}
	var recs []json.RawMessage
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Pod json.RawMessage `json:"pod"`
		}
		if err := json.Unmarshal(data, &doc); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		recs = append(recs, doc.Pod)
	}
	legacy, err := json.Marshal(map[string]any{"version": 1, "pods": recs})
	if err != nil {
		t.Fatal(err)
	}
	legacyPath := filepath.Join(e.node.State, "pods.json")
	if err := os.WriteFile(legacyPath, legacy, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(podsDir); err != nil {
		t.Fatal(err)
	}

	if err := e.node.StartAgent(); err != nil {
		t.Fatal(err)
	}
	checkConsistent(e)
	held := heldPods(e)
	if !holds(held, p.ContainerID) || !holds(held, server.ContainerID) {
		t.Fatalf("after the upgrade the agent holds %v, want %s and %s", held, p.ContainerID, server.ContainerID)
	}
	if got := e.pinnedEntries(); !sameCounts(got, before) {
		t.Fatalf("after the upgrade the maps hold %v, want %v", got, before)
	}
	redirected(e, p, fmt.Sprintf("%s:8080", server.IPv4))
	if _, err := os.Stat(legacyPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pods.json after the upgrade: %v, want it removed", err)
	}
	for _, id := range []string{p.ContainerID, server.ContainerID} {
		if _, err := os.Stat(filepath.Join(podsDir, id+".json")); err != nil {
			t.Fatalf("state file of %s after the upgrade: %v", id, err)
		}
	}
	if err := e.node.DelPod(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	if got := e.pinnedEntries(); got["meshlane_pods"] != 0 || got["meshlane_podips"] != 0 {
		t.Fatalf("after DEL: %v", got)
	}
	if _, err := os.Stat(filepath.Join(podsDir, p.ContainerID+".json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state file of the deleted pod: %v, want it removed", err)
	}
}

// TestGC: the runtime's GC keeps the listed attachments and the agent drops
// every other pod from its registry and the maps.
func TestGC(t *testing.T) {
	e := newEnv(t, "1.1.0", "")
	keep := e.add("keep", istio())
	e.add("drop1", istio())
	e.add("drop2", istio())
	if err := e.node.GC(context.Background(), []*cninode.Pod{keep}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got := e.pinnedEntries(); got["meshlane_pods"] != 1 {
		t.Fatalf("after GC the maps hold %v, want one pod", got)
	}
	if err := e.node.CheckPod(context.Background(), keep); err != nil {
		t.Fatalf("CHECK of the kept pod: %v", err)
	}
}

// TestConcurrentPods: 200 pods added concurrently through libcni, half of
// them deleted concurrently: the maps hold exactly the live ones.
func TestConcurrentPods(t *testing.T) {
	const total = 200
	e := newEnv(t, "1.1.0", "")
	pods := make([]*cninode.Pod, total)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	errs := make(chan error, total)
	for i := range total {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			p, err := e.node.AddPod(context.Background(), "load", fmt.Sprintf("p%d", i), istio())
			if err != nil {
				errs <- fmt.Errorf("ADD p%d: %w", i, err)
				return
			}
			pods[i] = p
		})
	}
	wg.Wait()
	for i := 0; i < total; i += 2 {
		if p := pods[i]; p != nil {
			wg.Go(func() {
				sem <- struct{}{}
				defer func() { <-sem }()
				if err := e.node.DelPod(context.Background(), p); err != nil {
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Cleanup(func() {
		for i := 1; i < total; i += 2 {
			if pods[i] != nil {
				e.node.DelPod(context.Background(), pods[i])
			}
		}
	})
	if got := e.pinnedEntries(); got["meshlane_pods"] != total/2 || got["meshlane_podips"] != total {
		t.Fatalf("maps hold %v, want %d pods with %d IPs", got, total/2, total)
	}
	if pods := e.agentPods(); len(pods) != total/2 {
		t.Fatalf("agent holds %d pods, want %d", len(pods), total/2)
	}
}

// TestBadAnnotations: a malformed annotation fails the pod's ADD with a
// message naming it, and changes nothing.
func TestBadAnnotations(t *testing.T) {
	e := newEnv(t, "1.1.0", "")
	before := e.pinnedEntries()
	ann := istio()
	ann["traffic.sidecar.istio.io/excludeOutboundPorts"] = "abc"
	_, err := e.node.AddPod(context.Background(), "default", "bad", ann)
	if err == nil || !strings.Contains(err.Error(), "excludeOutboundPorts") {
		t.Fatalf("ADD with a bad annotation: %v", err)
	}
	if got := e.pinnedEntries(); !sameCounts(got, before) {
		t.Fatalf("a rejected ADD changed the maps: %v", got)
	}
	if pods := e.agentPods(); len(pods) != 0 {
		t.Fatalf("a rejected ADD left %v", pods)
	}
}

// TestPluginLogRelay: what the plugin logs reaches the agent's log, not
// only the runtime's journal. Under failPolicy open a rejected pod is let
// through with a warning, which the agent must show.
func TestPluginLogRelay(t *testing.T) {
	e := newEnv(t, "1.1.0", "open")
	ann := istio()
	ann["traffic.sidecar.istio.io/excludeOutboundPorts"] = "abc"
	p := e.add("relayed", ann)
	deadline := time.Now().Add(5 * time.Second)
	for {
		logMu.Lock()
		log := e.log.String()
		logMu.Unlock()
		var line string
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, "cni-plugin") && strings.Contains(l, p.ContainerID) {
				line = l
			}
		}
		if strings.Contains(line, "excludeOutboundPorts") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no relayed plugin warning naming the annotation for %s in the agent log:\n%s", p.ContainerID, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
