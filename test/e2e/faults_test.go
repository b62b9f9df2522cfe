package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshlane/meshlane/bpf"
	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// on returns the same node for a subtest: helpers fail, and register
// cleanups on, t.
func (e *env) on(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

// restartAgent stops the node's agent (reaping it if it already died) and
// starts it again with the crash-test fault point set, or none when point
// is empty. The variable is in the environment only while the agent is
// exec'd, so no plugin or pod process sees it.
func restartAgent(e *env, point string) {
	e.t.Helper()
	if err := e.node.StopAgent(syscall.SIGKILL); err != nil {
		e.t.Fatal(err)
	}
	if point != "" {
		os.Setenv(agent.FaultEnv, point)
	}
	err := e.node.StartAgent()
	os.Unsetenv(agent.FaultEnv)
	if err != nil {
		e.t.Fatal(err)
	}
}

// logSince returns what the agent logged after offset, and the new offset.
func (e *env) logSince(offset int) (string, int) {
	logMu.Lock()
	defer logMu.Unlock()
	s := e.log.String()
	return s[offset:], len(s)
}

// killedAt checks that the agent's log, from offset on, has the line of a
// fault-injection kill at point: the failure the test saw was that crash.
func killedAt(e *env, offset int, point string) {
	e.t.Helper()
	log, _ := e.logSince(offset)
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "fault injection") && strings.Contains(l, point) {
			return
		}
	}
	e.t.Fatalf("the agent did not die at %s; its log since the request:\n%s", point, log)
}

// clients keeps one agent client per socket, so that the tests' own idle
// connections to an agent are one at most, whatever they ask it: the
// load tests count the agent's open files.
var clients sync.Map

func agentClient(e *env) *api.Client {
	c, _ := clients.LoadOrStore(e.node.Sock, api.NewClient(e.node.Sock))
	return c.(*api.Client)
}

// heldPods lists the agent's registry.
func heldPods(e *env) []api.PodStatus {
	e.t.Helper()
	var pods []api.PodStatus
	if err := agentClient(e).Get(context.Background(), api.PathPods, &pods); err != nil {
		e.t.Fatal(err)
	}
	return pods
}

func holds(pods []api.PodStatus, containerID string) bool {
	return slices.ContainsFunc(pods, func(p api.PodStatus) bool { return p.Event.ContainerID == containerID })
}

// checkConsistent compares the agent's registry with the pinned maps: every
// meshed pod it holds is in meshlane_pods with all its IPs in
// meshlane_podips, and every entry of every pod map belongs to a meshed
// pod it holds. A map entry no held pod explains is what a crash must
// never leave: it would redirect a later pod given the same IP.
func checkConsistent(e *env) {
	e.t.Helper()
	meshed := map[uint64]int{} // cookie -> IP count
	for _, p := range heldPods(e) {
		if p.State == api.StateMeshed && p.Pod != nil {
			meshed[p.NetnsCookie] = len(p.Pod.IPs)
		}
	}
	var problems []string
	inPods := map[uint64]bool{}
	eachEntry(e, "meshlane_pods", new(uint64), new(bpf.MeshlaneMlPod), func(k, _ any) {
		c := *k.(*uint64)
		inPods[c] = true
		if _, ok := meshed[c]; !ok {
			problems = append(problems, fmt.Sprintf("meshlane_pods holds netns %d, which the agent does not hold", c))
		}
	})
	ips := map[uint64]int{}
	eachEntry(e, "meshlane_podips", new(bpf.MeshlaneMlAddr), new(uint64), func(_, v any) {
		c := *v.(*uint64)
		ips[c]++
		if _, ok := meshed[c]; !ok {
			problems = append(problems, fmt.Sprintf("meshlane_podips maps an address to netns %d, which the agent does not hold", c))
		}
	})
	eachEntry(e, "meshlane_ports", new(bpf.MeshlaneMlPortKey), new(uint32), func(k, _ any) {
		pk := k.(*bpf.MeshlaneMlPortKey)
		if _, ok := meshed[pk.Netns]; !ok {
			problems = append(problems, fmt.Sprintf("meshlane_ports holds port %d of netns %d, which the agent does not hold", pk.Port, pk.Netns))
		}
	})
	eachEntry(e, "meshlane_cidrs", new(bpf.MeshlaneMlCidrKey), new(uint32), func(k, _ any) {
		ck := k.(*bpf.MeshlaneMlCidrKey)
		if _, ok := meshed[ck.Netns]; !ok {
			problems = append(problems, fmt.Sprintf("meshlane_cidrs holds a prefix of netns %d, which the agent does not hold", ck.Netns))
		}
	})
	for c, n := range meshed {
		if !inPods[c] {
			problems = append(problems, fmt.Sprintf("the agent holds meshed netns %d, but meshlane_pods does not", c))
		}
		if ips[c] != n {
			problems = append(problems, fmt.Sprintf("netns %d has %d addresses in meshlane_podips, the agent recorded %d", c, ips[c], n))
		}
	}
	if len(problems) > 0 {
		e.t.Fatalf("registry and pinned maps disagree:\n%s", strings.Join(problems, "\n"))
	}
}

// eachEntry calls fn with every entry of the agent's pinned map name,
// decoded into key and value (pointers, reused between calls).
func eachEntry(e *env, name string, key, value any, fn func(key, value any)) {
	e.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.bpffs, fmt.Sprintf("maps-v%d", datapath.LayoutVersion), name), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Close()
	it := m.Iterate()
	for it.Next(key, value) {
		fn(key, value)
	}
	if err := it.Err(); err != nil {
		e.t.Fatalf("iterate %s: %v", name, err)
	}
}

// redirected runs a sidecar in p and one client connection from p to to,
// and fails the test unless that connection went through the sidecar.
func redirected(e *env, p *cninode.Pod, to string) {
	e.t.Helper()
	events := filepath.Join(testenv.ScratchDir(e.t), "sidecar-"+p.Name)
	proc, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{UID: mesh.Istio.ProxyUID, GID: mesh.Istio.ProxyUID, Cgroup: e.cgroupOf(p),
		Args: []string{e.bin, "sidecar", "--events", events, "--ready", events + ".ready"}})
	if err != nil {
		e.t.Fatal(err)
	}
	defer proc.Kill()
	e.waitFile(events + ".ready")
	if out, err := runIn(e, p, 1000, "client", "--to", to); err != nil {
		e.t.Fatalf("client in %s to %s: %v %s", p.Name, to, err, out)
	}
	ev, _ := testenv.ReadEvents[wire.SidecarEvent](events)
	if !hasOrig(ev, to) {
		e.t.Fatalf("the connection from %s to %s did not go through its sidecar: %+v", p.Name, to, ev)
	}
}

// TestCrashAtEveryStep kills the agent (SIGKILL, through the fault points
// of daemon/agent/faults.go) at every step of a pod's ADD and DEL, restarts
// it, and checks that the registry and the pinned maps agree: the pod is
// either held and redirected or absent from every map. For ADD it plays
// both things a runtime does with the failed sandbox: tear it down at once
// (containerd: DEL right away, which the plugin cannot deliver to a dead
// agent, then a new sandbox) or keep it until the agent is back and DEL it
// then.
func TestCrashAtEveryStep(t *testing.T) {
	e := newEnv(t, "1.1.0", "closed")
	server := e.add("server", map[string]string{"app": "server"})
	e.startApp(server, "0.0.0.0:8080")
	to := fmt.Sprintf("%s:8080", server.IPv4)
	base := e.pinnedEntries()
	ctx := context.Background()

	for _, point := range agent.FaultPoints {
		t.Run(point, func(t *testing.T) {
			e := e.on(t)
			if verb, _, _ := strings.Cut(point, ":"); verb == "del" {
				restartAgent(e, point)
				p := e.add("victim", istio())
				redirected(e, p, to)
				_, off := e.logSince(0)
				// The plugin's DEL succeeds with the agent gone (a failing
				// DEL leaves pods stuck Terminating); the runtime then
				// removes the netns.
				if err := e.node.DelPod(ctx, p); err != nil {
					t.Fatalf("DEL with the agent dying: %v", err)
				}
				killedAt(e, off, point)
				restartAgent(e, "")
				checkConsistent(e)
				if holds(heldPods(e), p.ContainerID) {
					t.Fatalf("the restarted agent still holds the deleted pod %s", p.ContainerID)
				}
				if got := e.pinnedEntries(); !sameCounts(got, base) {
					t.Fatalf("after the crash in DEL and a restart the maps hold %v, want %v", got, base)
				}
				t.Logf("killed at %s: the plugin's DEL succeeded, the runtime removed the netns; after a restart the pod is absent from the registry and every map", point)
				return
			}

			t.Run("sandbox torn down", func(t *testing.T) {
				e := e.on(t)
				restartAgent(e, point)
				_, off := e.logSince(0)
				_, err := e.node.AddPod(ctx, "default", "crashed", istio())
				if cniCode(err) != int(types.ErrTryAgainLater) {
					t.Fatalf("ADD with the agent dying: %v (code %d), want code 11", err, cniCode(err))
				}
				killedAt(e, off, point)
				restartAgent(e, "")
				checkConsistent(e)
				if got := e.pinnedEntries(); !sameCounts(got, base) {
					t.Fatalf("the torn-down sandbox left map entries: %v, want %v", got, base)
				}
				// The runtime's retry: a new sandbox for the pod.
				p := e.add("crashed", istio())
				redirected(e, p, to)
				checkConsistent(e)
				if err := e.node.DelPod(ctx, p); err != nil {
					t.Fatal(err)
				}
				if got := e.pinnedEntries(); !sameCounts(got, base) {
					t.Fatalf("after DEL: %v, want %v", got, base)
				}
				t.Logf("killed at %s: ADD failed with code 11, the runtime tore the sandbox down; after a restart nothing of it is held or in a map; its new sandbox is redirected", point)
			})
			t.Run("sandbox kept", func(t *testing.T) {
				e := e.on(t)
				restartAgent(e, point)
				_, off := e.logSince(0)
				p, err := e.node.AddPodKeepSandbox(ctx, "default", "kept", istio())
				if p != nil {
					t.Cleanup(func() { e.node.DelPod(ctx, p) })
				}
				if cniCode(err) != int(types.ErrTryAgainLater) {
					t.Fatalf("ADD with the agent dying: %v (code %d), want code 11", err, cniCode(err))
				}
				killedAt(e, off, point)
				restartAgent(e, "")
				checkConsistent(e)
				held := holds(heldPods(e), p.ContainerID)
				switch point {
				case "add:after-cookie":
					if held {
						t.Fatalf("the agent died before writing anything, yet holds %s", p.ContainerID)
					}
				default:
					// The pod's state file was written: the restarted agent
					// holds it and has it in the maps.
					if !held {
						t.Fatalf("the restarted agent does not hold %s although its state file was written", p.ContainerID)
					}
					redirected(e, p, to)
				}
				// The runtime DELs the sandbox now that the agent is back.
				if err := e.node.DelPod(ctx, p); err != nil {
					t.Fatal(err)
				}
				checkConsistent(e)
				if got := e.pinnedEntries(); !sameCounts(got, base) {
					t.Fatalf("after DEL: %v, want %v", got, base)
				}
				outcome := "absent from the registry and every map"
				if held {
					outcome = "held, in the maps and redirected"
				}
				t.Logf("killed at %s: ADD failed with code 11; after a restart the kept sandbox is %s; its DEL then removes it everywhere", point, outcome)
			})
		})
	}
}
