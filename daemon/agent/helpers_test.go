package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podcgroup"
	"github.com/meshlane/meshlane/daemon/podns"
	"github.com/meshlane/meshlane/daemon/podns/podnstest"
)

// fakeMaps is an in-memory PodMaps keyed by netns cookie, with a log of
// the calls so tests can check their order.
type fakeMaps struct {
	mu        sync.Mutex
	pods      map[uint64]datapath.Pod
	ops       []string
	upserts   int
	failWrite error
	// failUpsert fails UpsertPod only.
	failUpsert error
}

func newFakeMaps() *fakeMaps { return &fakeMaps{pods: map[uint64]datapath.Pod{}} }

func (f *fakeMaps) AddPod(p datapath.Pod) error    { return f.write(p, "add") }
func (f *fakeMaps) UpsertPod(p datapath.Pod) error { return f.write(p, "upsert") }

// write records AddPod and UpsertPod alike, named apart in the op log;
// upserts counts both.
func (f *fakeMaps) write(p datapath.Pod, op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrite != nil {
		return f.failWrite
	}
	if f.failUpsert != nil {
		return f.failUpsert
	}
	f.pods[p.NetnsCookie] = p
	f.upserts++
	f.ops = append(f.ops, fmt.Sprintf("%s %d", op, p.NetnsCookie))
	return nil
}

func (f *fakeMaps) DeletePod(p datapath.Pod) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrite != nil {
		return f.failWrite
	}
	delete(f.pods, p.NetnsCookie)
	f.ops = append(f.ops, fmt.Sprintf("delete %d", p.NetnsCookie))
	return nil
}

func (f *fakeMaps) setFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failWrite = err
}

func (f *fakeMaps) get(cookie uint64) (datapath.Pod, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.pods[cookie]
	return p, ok
}

func (f *fakeMaps) cookies() []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []uint64
	for c := range f.pods {
		out = append(out, c)
	}
	slices.Sort(out)
	return out
}

func (f *fakeMaps) opLog() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.ops)
}

func (f *fakeMaps) upsertCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.upserts
}

type opts struct {
	maps     *fakeMaps
	stateDir string
	gc       time.Duration
	profile  *mesh.Profile
	ready    func() (bool, string)
	// cgroups puts the agent in pod cgroup scope.
	cgroups *podcgroup.Resolver
}

// newAgent makes an agent with a fake datapath and a temp state dir, closed
// when the test ends.
func newAgent(t *testing.T, o opts) *agent.Agent {
	t.Helper()
	if o.maps == nil {
		o.maps = newFakeMaps()
	}
	if o.stateDir == "" {
		o.stateDir = t.TempDir()
	}
	p := mesh.Istio
	if o.profile != nil {
		p = *o.profile
	}
	a, err := agent.New(agent.Config{
		Maps:       o.maps,
		Profile:    p,
		StateDir:   o.stateDir,
		GCInterval: o.gc,
		Logger:     zaptest.NewLogger(t),
		Ready:      o.ready,
		PodCgroups: o.cgroups,
	})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	t.Cleanup(a.Close)
	return a
}

// serve runs a's HTTP API on a fresh unix socket and returns its path.
func serve(t *testing.T, a *agent.Agent) string {
	t.Helper()
	// Short path: sun_path holds 108 bytes and test temp dirs are long.
	dir, err := os.MkdirTemp("", "mla")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "run", "agent.sock")
	l, err := agent.ListenUnix(path)
	if err != nil {
		t.Fatalf("ListenUnix: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := a.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path
}

// client talks HTTP over the unix socket at path.
func client(path string) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
			MaxIdleConnsPerHost: 64,
		},
	}
}

// do sends method path with body (a string is sent raw, anything else as
// JSON) and returns the status and the body.
func do(t *testing.T, c *http.Client, method, path string, body any) (int, []byte) {
	t.Helper()
	code, out := doNoFatal(c, method, path, body)
	if code == 0 {
		t.Fatalf("%s %s: %s", method, path, out)
	}
	return code, out
}

// doNoFatal is do for goroutines: a transport failure is status 0 with
// the error as body.
func doNoFatal(c *http.Client, method, path string, body any) (int, []byte) {
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			return 0, []byte(err.Error())
		}
		r = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, "http://agent"+path, r)
	if err != nil {
		return 0, []byte(err.Error())
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, []byte(err.Error())
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, []byte("read body: " + err.Error())
	}
	return resp.StatusCode, out
}

// call posts ev to one of the pod endpoints and decodes the answer: the
// PodResponse on 200, the api.Error message otherwise.
func call(t *testing.T, c *http.Client, path string, ev any) (int, api.PodResponse, string) {
	t.Helper()
	code, resp, msg := callNoFatal(c, path, ev)
	if code == 0 {
		t.Fatalf("%s: %s", path, msg)
	}
	return code, resp, msg
}

// callNoFatal is call for goroutines: status 0 means the call itself
// failed, and the message says why.
func callNoFatal(c *http.Client, path string, ev any) (int, api.PodResponse, string) {
	code, body := doNoFatal(c, http.MethodPost, path, ev)
	if code == 0 {
		return 0, api.PodResponse{}, string(body)
	}
	if code != http.StatusOK {
		var e api.Error
		if err := json.Unmarshal(body, &e); err != nil || e.Error == "" {
			return 0, api.PodResponse{}, fmt.Sprintf("status %d without an api.Error body: %q", code, body)
		}
		return code, api.PodResponse{}, e.Error
	}
	var resp api.PodResponse
	if err := json.Unmarshal(body, &resp); err != nil {
		return 0, api.PodResponse{}, fmt.Sprintf("bad PodResponse %q: %v", body, err)
	}
	return code, resp, ""
}

// errorBody decodes an api.Error and checks it says something.
func errorBody(t *testing.T, body []byte) string {
	t.Helper()
	var e api.Error
	if err := json.Unmarshal(body, &e); err != nil || e.Error == "" {
		t.Fatalf("want an api.Error body, got %q (%v)", body, err)
	}
	return e.Error
}

// Annotation sets.
var (
	istioAnn   = map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`}
	linkerdAnn = map[string]string{"linkerd.io/proxy-version": "stable-2.14"}
	plainAnn   = map[string]string{"app": "web"}
)

// pod is a test pod: its netns and the event the plugin would send.
type pod struct {
	ns *podnstest.NS
	ev api.PodEvent
}

func newPod(t *testing.T, id string, ann map[string]string, ips ...string) pod {
	t.Helper()
	ns := podnstest.New(t)
	if len(ips) == 0 {
		ips = []string{"10.1.0.7/24"}
	}
	return pod{ns: ns, ev: api.PodEvent{
		ContainerID:  id,
		Netns:        ns.Path,
		IfName:       "eth0",
		IPs:          ips,
		PodName:      "pod-" + id,
		PodNamespace: "default",
		Annotations:  ann,
	}}
}

func (p pod) cookie(t *testing.T) uint64 {
	t.Helper()
	c, err := podns.NetnsCookie(p.ns.Path)
	if err != nil {
		t.Fatalf("cookie of %s: %v", p.ns.Path, err)
	}
	return c
}

// eventually polls cond every 20ms for up to 5s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func podState(a *agent.Agent, id string) string {
	for _, r := range a.Pods() {
		if r.Event.ContainerID == id {
			return r.State
		}
	}
	return ""
}

func heldIDs(a *agent.Agent) []string {
	var out []string
	for _, r := range a.Pods() {
		out = append(out, r.Event.ContainerID)
	}
	return out
}

// mustAdd runs ADD and fails the test on error.
func mustAdd(t *testing.T, a *agent.Agent, ev api.PodEvent) api.PodResponse {
	t.Helper()
	resp, err := a.Add(ev)
	if err != nil {
		t.Fatalf("ADD %s: %v", ev.ContainerID, err)
	}
	return resp
}

// mustDel runs DEL and fails the test on error.
func mustDel(t *testing.T, a *agent.Agent, ev api.PodEvent) api.PodResponse {
	t.Helper()
	resp, err := a.Del(ev)
	if err != nil {
		t.Fatalf("DEL %s: %v", ev.ContainerID, err)
	}
	return resp
}

// statePods reads every pod state file under dir (the agent's StateDir)
// the way an operator would, without the agent's reader: each file must
// be <container id>.json holding version 1 and the pod's record. A
// missing pods directory is no pods.
func statePods(t *testing.T, dir string) map[string]agent.PodRecord {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "pods", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]agent.PodRecord{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Version int             `json:"version"`
			Pod     agent.PodRecord `json:"pod"`
		}
		if err := json.Unmarshal(data, &doc); err != nil {
			t.Fatalf("state file %s: %v", f, err)
		}
		id := strings.TrimSuffix(filepath.Base(f), ".json")
		if doc.Version != 1 || doc.Pod.Event.ContainerID != id {
			t.Fatalf("state file %s: version %d, container %q", f, doc.Version, doc.Pod.Event.ContainerID)
		}
		out[id] = doc.Pod
	}
	return out
}

// stateIDs returns the container ids with a state file under dir, sorted.
func stateIDs(t *testing.T, dir string) []string {
	t.Helper()
	return slices.Sorted(maps.Keys(statePods(t, dir)))
}
