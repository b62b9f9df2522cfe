// Package datapath_test proves the eBPF datapath on real sockets: pods in
// network namespaces on a bridge, their processes in a test cgroup with the
// programs attached, a test sidecar that behaves like Envoy, and app
// clients and servers whose replies show which path each connection took.
package datapath_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

func TestMain(m *testing.M) {
	// The test binary doubles as the probes run inside a pod.
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case hazardProbeArg:
			runHazardProbe()
			return
		case sockoptProbeArg:
			runSockoptProbe()
			return
		case dnsProbeArg:
			runDNSProbe(os.Args[2:])
			return
		case validateArg:
			runValidation(os.Args[2:])
			return
		}
	}
	testenv.Main(m)
}

// appUID runs the test apps: any uid but the proxy's.
const appUID = 1000

// node is one simulated node: a cgroup with the datapath attached, a
// private bpffs and a bridge for its pods.
type node struct {
	t     *testing.T
	cg    *testenv.Cgroup
	bpffs string
	dp    *datapath.Datapath
	br    *testenv.Bridge
	bin   string
	n     int
	// inbound is the tc hook mode the datapath loads with.
	inbound string
	// scope is where the cgroup programs attach; in pod scope every pod
	// gets a cgroup of its own below cg (podCgroups) for its processes.
	scope      string
	podCgroups map[*testenv.Pod]*testenv.Cgroup
}

// nodes numbers the nodes of this test binary: bridge names must differ.
var nodes int

func newNode(t *testing.T, sockmap bool) *node {
	t.Helper()
	return newNodeInbound(t, sockmap, datapath.InboundAuto)
}

// newNodeInbound is newNode with the tc hooks attached in the given mode.
func newNodeInbound(t *testing.T, sockmap bool, inbound string) *node {
	t.Helper()
	return newNodeScope(t, sockmap, inbound, datapath.ScopeNode)
}

// newNodeScope is newNodeInbound with the cgroup programs attached in the
// given scope.
func newNodeScope(t *testing.T, sockmap bool, inbound, scope string) *node {
	t.Helper()
	testenv.RequireRoot(t)
	n := &node{t: t, cg: testenv.TempCgroup(t), bpffs: filepath.Join(testenv.BPFFS(t), "meshlane"), inbound: inbound,
		scope: scope, podCgroups: map[*testenv.Pod]*testenv.Cgroup{}}
	reloadNode(t, n, sockmap)
	t.Cleanup(func() {
		if err := n.dp.Uninstall(); err != nil {
			t.Errorf("uninstall datapath: %v", err)
		}
	})
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		t.Fatal(err)
	}
	nodes++
	n.br = testenv.NewBridge(t, fmt.Sprintf("dp%d", nodes), v4, v6)
	n.bin = testenv.BuildPodbin(t)
	return n
}

// reloadNode loads the datapath on the node's cgroup and pins, as an agent
// start (or restart, when the node's previous datapath was closed) does.
func reloadNode(t *testing.T, n *node, sockmap bool) {
	t.Helper()
	dp, err := datapath.Load(datapath.Options{BPFFS: n.bpffs, CgroupPath: n.cg.Path, Scope: n.scope, Sockmap: sockmap, Inbound: n.inbound})
	if err != nil {
		t.Fatal(err)
	}
	n.dp = dp
}

// pod makes a dual-stack pod on the node's bridge.
func (n *node) pod(label string) *testenv.Pod {
	n.t.Helper()
	n.n++
	v4, v6 := n.br.Addr(10 + n.n)
	p := testenv.NewPod(n.t, n.br, label, v4, v6)
	if n.scope == datapath.ScopePod {
		cg, err := testenv.NewCgroup(n.cg.Path, "pod-"+label)
		if err != nil {
			n.t.Fatal(err)
		}
		n.t.Cleanup(func() {
			if err := cg.Destroy(); err != nil {
				n.t.Errorf("remove cgroup of pod %s: %v", label, err)
			}
		})
		n.podCgroups[p] = cg
	}
	return p
}

// cgroupOf is the cgroup p's processes run in: the pod's own in pod
// scope, the node's otherwise.
func (n *node) cgroupOf(p *testenv.Pod) *testenv.Cgroup {
	if cg, ok := n.podCgroups[p]; ok {
		return cg
	}
	return n.cg
}

func podIPs(p *testenv.Pod) []netip.Addr {
	var ips []netip.Addr
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if a.IsValid() {
			ips = append(ips, a)
		}
	}
	return ips
}

// mesh marks a pod as injected by prof's mesh with extra annotations and
// writes it into the datapath, as the agent does at CNI ADD, but without
// the tc hooks on its interface (see meshInbound).
func (n *node) mesh(p *testenv.Pod, prof mesh.Profile, ann map[string]string) datapath.Pod {
	n.t.Helper()
	return n.meshPod(p, prof, ann, datapath.PodInterface{})
}

// meshInbound is mesh with the tc hooks on the pod's eth0, as the agent
// writes every meshed pod.
func (n *node) meshInbound(p *testenv.Pod, prof mesh.Profile, ann map[string]string) datapath.Pod {
	n.t.Helper()
	return n.meshPod(p, prof, ann, datapath.PodInterface{Netns: p.NetnsPath, Name: "eth0"})
}

func (n *node) meshPod(p *testenv.Pod, prof mesh.Profile, ann map[string]string, ifc datapath.PodInterface) datapath.Pod {
	n.t.Helper()
	all := map[string]string{prof.Marker: "{}"}
	for k, v := range ann {
		all[k] = v
	}
	d, err := mesh.Decide(all, prof)
	if err != nil {
		n.t.Fatal(err)
	}
	if d.Membership != mesh.Meshed {
		n.t.Fatalf("pod %s: decided %v, want meshed", p.Name, d.Membership)
	}
	var cgroup string
	if cg, ok := n.podCgroups[p]; ok {
		cgroup = cg.Path
	}
	dp := d.Settings.Pod(p.NetnsCookie, podIPs(p), ifc, cgroup)
	if err := n.dp.UpsertPod(dp); err != nil {
		n.t.Fatal(err)
	}
	return dp
}

// sidecar starts the test sidecar in p as the profile's proxy user and
// returns its event file.
func (n *node) sidecar(p *testenv.Pod, prof mesh.Profile, extra ...string) string {
	n.t.Helper()
	dir := testenv.ScratchDir(n.t)
	events, ready := filepath.Join(dir, "events"), filepath.Join(dir, "ready")
	args := []string{n.bin, "sidecar", "--events", events, "--ready", ready}
	if prof.Name == mesh.Linkerd.Name {
		args = append(args, "--outbound", "127.0.0.1:4140,[::1]:4140", "--inbound", "0.0.0.0:4143,[::]:4143")
	}
	args = append(args, extra...)
	p.Start(n.t, testenv.ProcOpts{UID: prof.ProxyUID, GID: prof.ProxyGID, Cgroup: n.cgroupOf(p), Args: args})
	if err := testenv.WaitFile(ready, 10*time.Second); err != nil {
		n.t.Fatalf("sidecar in %s: %v", p.Name, err)
	}
	return events
}

// server starts an app server in p listening on every port given.
func (n *node) server(p *testenv.Pod, name string, ports ...int) {
	n.t.Helper()
	var ls []string
	for _, port := range ports {
		ls = append(ls, fmt.Sprintf("0.0.0.0:%d", port), fmt.Sprintf("[::]:%d", port))
	}
	ready := filepath.Join(testenv.ScratchDir(n.t), "ready")
	p.Start(n.t, testenv.ProcOpts{UID: appUID, GID: appUID, Cgroup: n.cgroupOf(p),
		Args: []string{n.bin, "server", "--name", name, "--listen", strings.Join(ls, ","), "--ready", ready}})
	if err := testenv.WaitFile(ready, 10*time.Second); err != nil {
		n.t.Fatalf("server in %s: %v", p.Name, err)
	}
}

// where runs a client: in a pod (p != nil) or on the host inside the test
// cgroup (p == nil).
type where struct {
	pod      *testenv.Pod
	uid, gid uint32
	// outside: a host process outside the test cgroup.
	outside bool
	// cg, when set, replaces the node's cgroup: a pod process that no
	// connect hook sees, as on another node.
	cg *testenv.Cgroup
}

func app(p *testenv.Pod) where { return where{pod: p, uid: appUID, gid: appUID} }
func proxy(p *testenv.Pod, prof mesh.Profile) where {
	return where{pod: p, uid: prof.ProxyUID, gid: prof.ProxyGID}
}
func host() where { return where{uid: appUID, gid: appUID} }

// client runs podbin client with args and returns its results; it fails
// the test if any connection failed.
func (n *node) client(w where, to string, args ...string) []wire.ClientResult {
	n.t.Helper()
	res, err := n.tryClient(w, to, args...)
	if err != nil {
		n.t.Fatalf("client to %s: %v (results %+v)", to, err, res)
	}
	return res
}

func (n *node) tryClient(w where, to string, args ...string) ([]wire.ClientResult, error) {
	n.t.Helper()
	return n.tryClientWithin(time.Minute, w, to, args...)
}

// tryClientWithin is tryClient with a bound on the client's run time, for
// clients that open many connections.
func (n *node) tryClientWithin(limit time.Duration, w where, to string, args ...string) ([]wire.ClientResult, error) {
	n.t.Helper()
	out, err := os.CreateTemp(n.t.TempDir(), "client-*")
	if err != nil {
		n.t.Fatal(err)
	}
	defer out.Close()
	opts := testenv.ProcOpts{UID: w.uid, GID: w.gid, Cgroup: n.cg, Stdout: out,
		Args: append([]string{n.bin, "client", "--to", to, "--timeout", "5s"}, args...)}
	if w.pod != nil {
		opts.Cgroup = n.cgroupOf(w.pod)
	}
	if w.cg != nil {
		opts.Cgroup = w.cg
	}
	var proc *testenv.Proc
	switch {
	case w.pod != nil:
		proc = w.pod.Start(n.t, opts)
	case w.outside:
		opts.Cgroup = nil
		proc = testenv.StartUncontained(n.t, opts)
	default:
		proc = testenv.StartHost(n.t, opts)
	}
	werr := proc.Wait(limit)
	res := readResults(n.t, out.Name())
	if werr != nil {
		return res, werr
	}
	if len(res) == 0 {
		return res, fmt.Errorf("client printed no result")
	}
	return res, nil
}

func readResults(t *testing.T, path string) []wire.ClientResult {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := wire.ReadClientResults(f)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func parseReply(t *testing.T, s string) wire.Reply {
	t.Helper()
	r, err := wire.ParseReply(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// sidecarEvents returns the accepted-connection events of a sidecar.
func sidecarEvents(t *testing.T, path string) []wire.SidecarEvent {
	t.Helper()
	all, err := testenv.ReadEvents[wire.SidecarEvent](path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []wire.SidecarEvent
	for _, e := range all {
		if e.Event == wire.EventAccepted {
			out = append(out, e)
		}
	}
	return out
}

// newEvents returns the events past the first `seen`.
func newEvents(t *testing.T, path string, seen int) []wire.SidecarEvent {
	t.Helper()
	ev := sidecarEvents(t, path)
	if len(ev) < seen {
		t.Fatalf("sidecar events shrank: %d < %d", len(ev), seen)
	}
	return ev[seen:]
}

func hostPort(a netip.Addr, port int) string {
	return netip.AddrPortFrom(a, uint16(port)).String()
}

func (n *node) counters() map[string]uint64 {
	n.t.Helper()
	c, err := n.dp.Counters()
	if err != nil {
		n.t.Fatal(err)
	}
	return c
}

// probeBinary copies the test binary where the proxy and app users may run
// it (the build directory is root's only), for the probes it doubles as.
func probeBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(testenv.ScratchDir(t), "probe")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}
