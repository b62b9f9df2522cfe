package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/testenv"
)

// holdArg makes the test binary, run inside a pod, the holder of
// long-lived connections: `e2e.test meshlane-e2e-hold ADDR COUNT READY`
// opens COUNT connections to ADDR, says HELLO on each and reads the
// reply (so the whole sidecar chain is up), writes READY and keeps them
// open until killed, or for holdMax at most.
const holdArg = "meshlane-e2e-hold"

const holdMax = 2 * time.Minute

// The hold mode runs before TestMain: an init in this file sees it first
// and never returns to the test framework.
func init() {
	if len(os.Args) > 1 && os.Args[1] == holdArg {
		if err := runHold(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "hold: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

func runHold(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("want ADDR COUNT READY, got %q", args)
	}
	n, err := strconv.Atoi(args[1])
	if err != nil || n < 1 {
		return fmt.Errorf("COUNT %q: want a positive number", args[1])
	}
	var conns []net.Conn
	for i := range n {
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return err
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintf(c, "HELLO hold-%d\n", i); err != nil {
			return err
		}
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
			return fmt.Errorf("connection %d: no reply: %w", i, err)
		}
	}
	tmp := args[2] + ".tmp"
	if err := os.WriteFile(tmp, []byte("ready\n"), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, args[2]); err != nil {
		return err
	}
	time.Sleep(holdMax)
	for _, c := range conns {
		c.Close()
	}
	return nil
}

var (
	ctlOnce sync.Once
	ctlBin  string
	ctlErr  error
)

// meshlanectl builds the real command once per test binary.
func meshlanectl(t *testing.T) string {
	t.Helper()
	ctlOnce.Do(func() {
		dir := filepath.Dir(binaries(t).Agent)
		ctlBin = filepath.Join(dir, "meshlanectl")
		cmd := exec.Command("go", "build", "-o", ctlBin, "./cmd/meshlanectl")
		cmd.Dir = moduleDir(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			ctlErr = fmt.Errorf("build meshlanectl: %v\n%s", err, out)
		}
	})
	if ctlErr != nil {
		t.Fatal(ctlErr)
	}
	return ctlBin
}

func moduleDir(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// ctl runs meshlanectl against the node's socket and returns its exit
// code, stdout and stderr.
func (e *env) ctl(args ...string) (int, []byte, string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, meshlanectl(e.t), append([]string{"--socket", e.node.Sock}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, out.Bytes(), errOut.String()
	case errors.As(err, &ee):
		return ee.ExitCode(), out.Bytes(), errOut.String()
	}
	e.t.Fatalf("meshlanectl %q: %v", args, err)
	return 0, nil, ""
}

// ctlJSON runs meshlanectl -o json, wants exit code want, and decodes.
func (e *env) ctlJSON(want int, out any, args ...string) {
	e.t.Helper()
	code, stdout, stderr := e.ctl(append(args, "-o", "json")...)
	if code != want {
		e.t.Fatalf("meshlanectl %q: exit %d, want %d\n%s%s", args, code, want, stdout, stderr)
	}
	if err := json.Unmarshal(stdout, out); err != nil {
		e.t.Fatalf("meshlanectl %q -o json: %v\n%s", args, err, stdout)
	}
}

// freeTCPAddr is a loopback address with a port free right now.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// newDebugEnv is newEnv with the agent's probe server on a free port.
func newDebugEnv(t *testing.T, sockmap bool) (*env, string) {
	t.Helper()
	testenv.RequireRoot(t)
	probe := freeTCPAddr(t)
	e := &env{t: t, cg: testenv.TempCgroup(t), bpffs: filepath.Join(testenv.BPFFS(t), "meshlane"), bin: testenv.BuildPodbin(t), log: &bytes.Buffer{}}
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		t.Fatal(err)
	}
	brName := testenv.LinkName()
	e.node, err = cninode.Start(cninode.Options{
		Bin: binaries(t), Dir: t.TempDir(), Cgroup: e.cg, BPFFS: e.bpffs,
		Bridge: brName, Subnet4: v4, Subnet6: v6, Sockmap: sockmap,
		AgentLog: syncWriter{e}, AgentArgs: []string{"--probe-addr", probe},
	})
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
	return e, probe
}

// TestMeshlanectl: on a node with a meshed client, a meshed server and a
// pod that is not meshed, meshlanectl reports exactly what happened: the
// pods and their states, counter deltas equal to the connections made,
// the held connections with their original destinations, and a self-check
// that passes until a map entry is deleted behind the agent's back.
// /metrics, over the socket and the probe port, agrees with the counters.
func TestMeshlanectl(t *testing.T) {
	const (
		conns = 7 // short connections, client pod to server pod
		held  = 3 // long-lived ones, held open during the checks
	)
	e, probe := newDebugEnv(t, false)
	client, server := e.meshedPair()
	plain := e.add("plain", map[string]string{"app": "batch"})

	// Pods and states.
	var pods []api.PodStatus
	e.ctlJSON(0, &pods, "pods")
	states := map[string]string{}
	for _, p := range pods {
		states[p.Event.PodNamespace+"/"+p.Event.PodName] = p.State
	}
	if want := map[string]string{"default/client": api.StateMeshed, "default/server": api.StateMeshed, "default/plain": api.StateNotMeshed}; !equalStrMaps(states, want) {
		t.Fatalf("pods: %v, want %v", states, want)
	}
	var srv api.PodStatus
	e.ctlJSON(0, &srv, "pods", "default/server")
	if s := srv.Pod; s == nil || s.ProxyUID != mesh.Istio.ProxyUID || s.OutboundPort != 15001 || s.InboundPort != 15006 ||
		!slices.Contains(s.IPs, server.IPv4) || !slices.Contains(s.InboundExclude, 15090) {
		t.Fatalf("server pod settings: %+v", srv.Pod)
	}
	var byIP api.PodStatus
	if e.ctlJSON(0, &byIP, "pods", plain.IPv4.String()); byIP.Event.ContainerID != plain.ContainerID || byIP.Pod != nil {
		t.Fatalf("pods %s: %+v", plain.IPv4, byIP)
	}

	// Counter deltas equal the connections made.
	var before api.Counters
	e.ctlJSON(0, &before, "counters")
	to := netip.AddrPortFrom(server.IPv4, 8080).String()
	if out, err := runIn(e, client, 1000, "client", "--to", to, "--count", strconv.Itoa(conns)); err != nil {
		t.Fatalf("client: %v\n%s", err, out)
	}
	var after api.Counters
	e.ctlJSON(0, &after, "counters")
	delta := func(name string) uint64 { return after.Counters[name] - before.Counters[name] }
	for name, want := range map[string]uint64{
		"redirect_outbound":     conns, // app to its sidecar
		"redirect_inbound":      conns, // client sidecar to the server's inbound listener
		"origdst_answered":      2 * conns,
		"origdst_adopted":       2 * conns,
		"pass_proxy_own_pod":    conns, // server sidecar to its app from 127.0.0.6
		"origdst_missed":        0,
		"storage_failed":        0,
		"origdst_record_failed": 0,
	} {
		if got := delta(name); got != want {
			t.Errorf("counter %s went up by %d, want %d (before %v, after %v)", name, got, want, before.Counters, after.Counters)
		}
	}

	// /metrics over the socket and over the probe port: the decision
	// counters are the ones meshlanectl showed (nothing ran in between).
	raw, err := api.NewClient(e.node.Sock).Do(context.Background(), http.MethodGet, api.PathMetrics, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkMetrics(t, "socket", bytes.NewReader(raw), after.Counters)
	resp, err := http.Get("http://" + probe + api.PathMetrics)
	if err != nil {
		t.Fatalf("probe port %s: %v", probe, err)
	}
	checkMetrics(t, "probe port", resp.Body, after.Counters)
	resp.Body.Close()
	for _, path := range []string{api.PathHealthz, api.PathReadyz} {
		resp, err := http.Get("http://" + probe + path)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("probe %s: %v %v", path, resp, err)
		}
		resp.Body.Close()
	}

	// Long-lived connections: each shows as four sockets, two per sidecar
	// hop, with the original destination the app asked for.
	held8081 := netip.AddrPortFrom(server.IPv4, 8081)
	e.hold(client, held8081, held)

	var all api.Conns
	e.ctlJSON(0, &all, "conns")
	mine := heldConns(all, held8081)
	type key struct{ kind, side, pod string }
	got := map[key]int{}
	for _, c := range mine {
		got[key{c.Kind, c.Side, c.ListenerPod}]++
		if c.State != "ESTABLISHED" || c.ShortCircuited {
			t.Errorf("held connection socket %+v: want ESTABLISHED, not short-circuited (sockmap off)", c)
		}
		switch c.Kind + "/" + c.Side {
		case "outbound/client":
			if c.Remote != netip.MustParseAddrPort("127.0.0.1:15001") {
				t.Errorf("app socket %+v: want its peer the client sidecar's outbound listener", c)
			}
		case "inbound/listener":
			if c.Local != netip.AddrPortFrom(server.IPv4, 15006) || c.Remote.Addr() != client.IPv4 {
				t.Errorf("server sidecar socket %+v: want local %s:15006 and the client pod as peer", c, server.IPv4)
			}
		}
	}
	want := map[key]int{
		{"outbound", "client", "default/client"}:   held,
		{"outbound", "listener", "default/client"}: held,
		{"inbound", "client", "default/server"}:    held,
		{"inbound", "listener", "default/server"}:  held,
	}
	if !equalCounts(got, want) {
		t.Fatalf("held connections by kind/side/sidecar pod: %v, want %v\nall: %+v", got, want, all.Conns)
	}
	var ofServer, ofPlain api.Conns
	e.ctlJSON(0, &ofServer, "conns", "--pod", "default/server")
	e.ctlJSON(0, &ofPlain, "conns", "--pod", "plain")
	if n := len(heldConns(ofServer, held8081)); n != 4*held {
		t.Errorf("conns --pod default/server: %d held sockets, want %d", n, 4*held)
	}
	if len(ofPlain.Conns) != 0 {
		t.Errorf("conns --pod plain: %+v, want none", ofPlain.Conns)
	}

	// Status: the attached programs and the map fill.
	var st api.Status
	e.ctlJSON(0, &st, "status")
	if st.Datapath == nil || st.Datapath.Cgroup != e.cg.Path || st.Datapath.Sockmap || len(st.Datapath.Links) != 8 ||
		st.Datapath.Maps["meshlane_pods"].Entries != 2 || st.Pods[api.StateMeshed] != 2 || st.Pods[api.StateNotMeshed] != 1 {
		t.Fatalf("status: %+v %+v", st, st.Datapath)
	}
	var evs []api.Event
	e.ctlJSON(0, &evs, "events")
	if added := countEvents(evs, "pod-added"); added != 3 {
		t.Errorf("events: %d pod-added, want 3: %+v", added, evs)
	}

	// Self-check: healthy pods pass, the pod that is not meshed says why.
	for _, p := range []string{"default/client", "server", plain.ContainerID} {
		var rep api.CheckReport
		e.ctlJSON(0, &rep, "check", p)
		if !rep.OK {
			t.Fatalf("check %s: %+v", p, rep)
		}
	}
	var tr transcript
	e.tables(&tr)

	// Behind the agent's back: the server's pod entry disappears.
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.bpffs, fmt.Sprintf("maps-v%d", datapath.LayoutVersion), "meshlane_pods"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Delete(srv.NetnsCookie); err != nil {
		t.Fatalf("delete the server's meshlane_pods entry: %v", err)
	}
	var rep api.CheckReport
	e.ctlJSON(1, &rep, "check", "default/server")
	i := slices.IndexFunc(rep.Checks, func(c api.CheckItem) bool { return c.Name == "meshlane_pods" })
	if rep.OK || i < 0 || rep.Checks[i].OK || !strings.Contains(rep.Checks[i].Detail, "no entry") || rep.Checks[i].Fix == "" {
		t.Fatalf("check after deleting the entry: %+v", rep)
	}
	code, out, _ := e.ctl("check", "default/server")
	if code != 1 || !strings.Contains(string(out), "FAIL") || !strings.Contains(string(out), "fix: restart meshlane-agent") {
		t.Fatalf("check table: exit %d\n%s", code, out)
	}
	tr.add([]string{"check", "default/server"}, out, code)
	tr.write(t)

	// The fix the check gives works: a restarted agent rewrites the entry.
	if err := e.node.StopAgent(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := e.node.StartAgent(); err != nil {
		t.Fatal(err)
	}
	rep = api.CheckReport{}
	if e.ctlJSON(0, &rep, "check", "default/server"); !rep.OK {
		t.Fatalf("check after the agent restart: %+v", rep)
	}
	if code, _, stderr := e.ctl("check", "no-such-pod"); code != 1 || !strings.Contains(stderr, "no pod matching") {
		t.Fatalf("check of an unknown pod: exit %d, %s", code, stderr)
	}
}

// meshedPair adds a meshed client pod and a meshed server pod, starts
// their sidecars, and the server's app on ports 8080 and 8081.
func (e *env) meshedPair() (client, server *cninode.Pod) {
	e.t.Helper()
	client = e.add("client", istio())
	server = e.add("server", istio())
	scratch := testenv.ScratchDir(e.t)
	for _, p := range []*cninode.Pod{client, server} {
		ready := filepath.Join(scratch, p.Name+"-sidecar")
		e.start(p, mesh.Istio.ProxyUID, "sidecar", "--ready", ready)
		e.waitFile(ready)
	}
	e.startApp(server, "0.0.0.0:8080,0.0.0.0:8081")
	return client, server
}

// hold opens n connections from pod p to addr, this test binary being
// the app (see holdArg), and returns once all of them got their reply.
// They stay open until the test ends.
func (e *env) hold(p *cninode.Pod, addr netip.AddrPort, n int) {
	e.t.Helper()
	self, err := os.Executable()
	if err != nil {
		e.t.Fatal(err)
	}
	ready := filepath.Join(testenv.ScratchDir(e.t), "hold")
	proc, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{Cgroup: e.cg, Args: []string{self, holdArg, addr.String(), strconv.Itoa(n), ready}})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { proc.Kill() })
	e.waitFile(ready)
}

// TestConnsShortCircuited: with the fast path on, every socket of a held
// connection between two meshed pods is in the sockhash, and conns says
// so; status shows the sk_msg program attached.
func TestConnsShortCircuited(t *testing.T) {
	const held = 2
	e, _ := newDebugEnv(t, true)
	client, server := e.meshedPair()
	orig := netip.AddrPortFrom(server.IPv4, 8081)
	e.hold(client, orig, held)
	var c api.Conns
	e.ctlJSON(0, &c, "conns", "--pod", "client")
	mine := heldConns(c, orig)
	if len(mine) != 4*held {
		t.Fatalf("conns: %d sockets of the held connections, want %d: %+v", len(mine), 4*held, c.Conns)
	}
	for _, x := range mine {
		if !x.ShortCircuited || x.Side == "unknown" {
			t.Errorf("socket %+v: want short-circuited with a known side", x)
		}
	}
	var st api.Status
	e.ctlJSON(0, &st, "status")
	if st.Datapath == nil || !st.Datapath.Sockmap || !slices.ContainsFunc(st.Datapath.Links, func(l api.Link) bool { return l.Name == "sk_msg" && l.ProgramID != 0 }) {
		t.Fatalf("status with the fast path on: %+v", st.Datapath)
	}
}

// heldConns are the sockets of connections whose original destination is
// orig.
func heldConns(c api.Conns, orig netip.AddrPort) []api.Conn {
	var out []api.Conn
	for _, x := range c.Conns {
		if x.Original == orig {
			out = append(out, x)
		}
	}
	return out
}

func checkMetrics(t *testing.T, where string, r io.Reader, counters map[string]uint64) {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		t.Fatalf("/metrics over the %s does not parse: %v", where, err)
	}
	got := map[string]uint64{}
	for _, fam := range []string{"meshlane_datapath_decisions_total", "meshlane_datapath_bytes_total"} {
		f := fams[fam]
		if f == nil {
			t.Fatalf("/metrics over the %s lacks %s", where, fam)
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" {
					name := l.GetValue()
					if fam == "meshlane_datapath_bytes_total" {
						name += "_bytes"
					}
					got[name] = uint64(m.GetCounter().GetValue())
				}
			}
		}
	}
	if !equalU64Maps(got, counters) {
		t.Fatalf("/metrics over the %s: %v\nmeshlanectl counters: %v", where, got, counters)
	}
	if f := fams["meshlane_cni_requests_total"]; f == nil {
		t.Fatalf("/metrics over the %s lacks the CNI request counters", where)
	}
}

func countEvents(evs []api.Event, kind string) int {
	n := 0
	for _, e := range evs {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

func equalStrMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func equalU64Maps(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func equalCounts[K comparable](a, b map[K]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// transcript records meshlanectl sessions; with
// MESHLANECTL_TRANSCRIPT=path the test writes them to path as Markdown, so
// the README's example is a real run.
type transcript struct{ doc bytes.Buffer }

func (tr *transcript) add(args []string, out []byte, code int) {
	fmt.Fprintf(&tr.doc, "```console\n# meshlanectl %s\n%s", strings.Join(args, " "), out)
	if code != 0 {
		fmt.Fprintf(&tr.doc, "# echo $?\n%d\n", code)
	}
	fmt.Fprintf(&tr.doc, "```\n\n")
}

func (tr *transcript) write(t *testing.T) {
	t.Helper()
	if path := os.Getenv("MESHLANECTL_TRANSCRIPT"); path != "" {
		if err := os.WriteFile(path, tr.doc.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// tables runs the table form of each command, which must succeed.
func (e *env) tables(tr *transcript) {
	e.t.Helper()
	for _, args := range [][]string{
		{"status"}, {"pods"}, {"pods", "default/server"}, {"counters"},
		{"conns", "--pod", "default/server"}, {"check", "default/server"}, {"events"},
	} {
		code, out, stderr := e.ctl(args...)
		if code != 0 || len(out) == 0 {
			e.t.Fatalf("meshlanectl %q: exit %d\n%s%s", args, code, out, stderr)
		}
		tr.add(args, out, code)
	}
}
