package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podns/podnstest"
)

// childEnv makes the test binary act as an unprivileged socket client:
// TestNonRootRejected re-executes it under another uid.
const childEnv = "MESHLANE_AGENT_TEST_SOCKET"

func TestMain(m *testing.M) {
	if path := os.Getenv(childEnv); path != "" {
		os.Exit(childRequest(path))
	}
	os.Exit(m.Run())
}

// childRequest GETs /healthz over the socket and prints the status code.
func childRequest(path string) int {
	resp, err := client(path).Get("http://agent" + api.PathHealthz)
	if err != nil {
		fmt.Println("request failed:", err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("%d %s\n", resp.StatusCode, body)
	return 0
}

func TestNonRootRejected(t *testing.T) {
	podnstest.RequireRoot(t)
	a := newAgent(t, opts{})
	path := serve(t, a)

	// Root is served.
	if code, body := do(t, client(path), http.MethodGet, api.PathHealthz, nil); code != http.StatusOK || string(body) != "ok\n" {
		t.Fatalf("healthz as root: %d %q", code, body)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v, want 0600", fi.Mode(), err)
	}
	if di, err := os.Stat(filepath.Dir(path)); err != nil || di.Mode().Perm() != 0o700 {
		t.Fatalf("socket dir mode: %v %v, want 0700", di.Mode(), err)
	}

	// A copy of the test binary that uid 65534 may execute.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	binDir, err := os.MkdirTemp("", "mlbin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(binDir) })
	if err := os.Chmod(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(binDir, "agent.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}

	// The child keeps CAP_DAC_OVERRIDE so the 0600 socket's file mode does
	// not stop it: only the agent's SO_PEERCRED check is left to refuse it.
	const capDacOverride = 1
	cmd := exec.Command(bin)
	cmd.Env = []string{childEnv + "=" + path}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: 65534, Gid: 65534},
		AmbientCaps: []uintptr{capDacOverride},
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child as uid 65534: %v: %s", err, out)
	}
	if !strings.HasPrefix(string(out), "403 ") || !strings.Contains(string(out), "uid 65534") {
		t.Fatalf("non-root caller got %q, want 403 naming its uid", out)
	}
}

func TestHTTPErrors(t *testing.T) {
	a := newAgent(t, opts{})
	c := client(serve(t, a))

	big := `{"containerID":"x","annotations":{"a":"` + strings.Repeat("x", 70<<10) + `"}}`
	cases := []struct {
		name, method, path string
		body               any
		code               int
		want               string
	}{
		{"oversized", http.MethodPost, api.PathAdd, big, http.StatusRequestEntityTooLarge, "larger than 65536"},
		{"malformed", http.MethodPost, api.PathAdd, `{"containerID":`, http.StatusBadRequest, "malformed JSON"},
		{"wrong type", http.MethodPost, api.PathDel, `{"containerID":7}`, http.StatusBadRequest, "malformed JSON"},
		{"trailing", http.MethodPost, api.PathAdd, `{"containerID":"a"} {}`, http.StatusBadRequest, "after the JSON object"},
		{"empty", http.MethodPost, api.PathCheck, ``, http.StatusBadRequest, "empty request body"},
		{"unknown path", http.MethodGet, "/v1/nope", nil, http.StatusNotFound, "no endpoint /v1/nope"},
		{"wrong method", http.MethodGet, api.PathAdd, nil, http.StatusMethodNotAllowed, "use POST"},
		{"wrong method pods", http.MethodPost, api.PathPods, `{}`, http.StatusMethodNotAllowed, "use GET"},
		{"log malformed", http.MethodPost, api.PathLog, `[`, http.StatusBadRequest, "malformed JSON"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := do(t, c, tc.method, tc.path, tc.body)
			if code != tc.code {
				t.Fatalf("status %d, want %d (%s)", code, tc.code, body)
			}
			if msg := errorBody(t, body); !strings.Contains(msg, tc.want) {
				t.Fatalf("error %q does not mention %q", msg, tc.want)
			}
		})
	}
}

func TestReadyzPodsAndLog(t *testing.T) {
	var mu sync.Mutex
	ready, why := false, "datapath not loaded"
	core, logs := observer.New(zap.DebugLevel)
	a, err := agent.New(agent.Config{
		Maps:     newFakeMaps(),
		Profile:  mesh.Istio,
		StateDir: t.TempDir(),
		Logger:   zap.New(core),
		Ready: func() (bool, string) {
			mu.Lock()
			defer mu.Unlock()
			return ready, why
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	c := client(serve(t, a))

	code, body := do(t, c, http.MethodGet, api.PathReadyz, nil)
	if code != http.StatusServiceUnavailable || !strings.Contains(errorBody(t, body), "datapath not loaded") {
		t.Fatalf("readyz before ready: %d %s", code, body)
	}
	mu.Lock()
	ready = true
	mu.Unlock()
	if code, body := do(t, c, http.MethodGet, api.PathReadyz, nil); code != http.StatusOK || string(body) != "ok\n" {
		t.Fatalf("readyz when ready: %d %s", code, body)
	}

	p := newPod(t, "pods1", istioAnn)
	mustAdd(t, a, p.ev)
	code, body = do(t, c, http.MethodGet, api.PathPods, nil)
	var recs []agent.PodRecord
	if err := json.Unmarshal(body, &recs); code != http.StatusOK || err != nil {
		t.Fatalf("pods: %d %s %v", code, body, err)
	}
	if len(recs) != 1 || recs[0].Event.ContainerID != "pods1" || recs[0].State != api.StateMeshed ||
		recs[0].Pod == nil || recs[0].Pod.NetnsCookie != p.cookie(t) {
		t.Fatalf("pods answer: %+v", recs)
	}

	code, body = do(t, c, http.MethodPost, api.PathLog, api.LogRecord{
		Level: "warn", Msg: "prevResult had no IPs", ContainerID: "pods1", Fields: map[string]string{"cmd": "ADD"},
	})
	if code != http.StatusNoContent {
		t.Fatalf("log: %d %s", code, body)
	}
	lines := logs.FilterMessage("prevResult had no IPs").All()
	if len(lines) != 1 || lines[0].Level != zap.WarnLevel {
		t.Fatalf("relayed plugin line: %+v", lines)
	}
	f := lines[0].ContextMap()
	if f["source"] != "cni-plugin" || f["container_id"] != "pods1" || f["plugin.cmd"] != "ADD" {
		t.Fatalf("relayed plugin line fields: %v", f)
	}
	if !hasEvent(a, agent.EventPluginLog, "pods1") {
		t.Fatalf("plugin line not in the event ring: %+v", a.Events())
	}

	// The pod's ADD left one structured line with its identity.
	added := logs.FilterMessage("pod added").All()
	if len(added) != 1 {
		t.Fatalf("pod added lines: %+v", added)
	}
	f = added[0].ContextMap()
	if f["container_id"] != "pods1" || f["pod"] != "default/pod-pods1" || f["netns_cookie"] != p.cookie(t) ||
		f["state"] != api.StateMeshed || f["reason"] == "" || f["duration"] == nil {
		t.Fatalf("pod added fields: %v", f)
	}
}

func TestListenUnixRefusesLiveSocket(t *testing.T) {
	a := newAgent(t, opts{})
	path := serve(t, a)
	if _, err := agent.ListenUnix(path); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second ListenUnix on a served socket: %v", err)
	}

	// A stale socket file (no one serving) is replaced.
	stale := filepath.Join(t.TempDir(), "s.sock")
	l, err := agent.ListenUnix(stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(stale); err != nil {
		t.Fatalf("setup: stale socket missing: %v", err)
	}
	l, err = agent.ListenUnix(stale)
	if err != nil {
		t.Fatalf("ListenUnix over a stale socket: %v", err)
	}
	l.Close()
}

// A Shutdown that races ahead of Serve (a signal right at start) must
// still stop it.
func TestShutdownBeforeServe(t *testing.T) {
	a := newAgent(t, opts{})
	dir, err := os.MkdirTemp("", "mla")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := agent.ListenUnix(filepath.Join(dir, "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Serve(l) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		l.Close()
		t.Fatal("Serve after Shutdown kept serving")
	}
}

// TestConcurrentPods drives 200 pods through the socket at once: each is
// added twice, half are then deleted twice, and a GC verb runs alongside.
// The maps must end up holding exactly the live meshed pods.
func TestConcurrentPods(t *testing.T) {
	const n = 200
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	c := client(serve(t, a))

	pods := make([]pod, n)
	valid := make([]api.Attachment, n)
	for i := range pods {
		ann := istioAnn
		if i%5 == 0 {
			ann = plainAnn
		}
		id := "conc-" + strconv.Itoa(i)
		pods[i] = newPod(t, id, ann, fmt.Sprintf("10.2.%d.%d", i/250, i%250+1))
		valid[i] = api.Attachment{ContainerID: id, IfName: "eth0"}
	}

	var wg sync.WaitGroup
	errs := make(chan string, 4*n+1)
	sem := make(chan struct{}, 32)
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			for range 2 {
				if code, _, msg := callNoFatal(c, api.PathAdd, p.ev); code != http.StatusOK {
					errs <- fmt.Sprintf("ADD %s: %d %s", p.ev.ContainerID, code, msg)
				}
			}
			if i%2 == 1 {
				for range 2 {
					if code, _, msg := callNoFatal(c, api.PathDel, p.ev); code != http.StatusOK {
						errs <- fmt.Sprintf("DEL %s: %d %s", p.ev.ContainerID, code, msg)
					}
				}
			}
		}()
	}
	// Every pod is valid, so a concurrent GC must remove nothing.
	wg.Add(1)
	go func() {
		defer wg.Done()
		code, body := doNoFatal(c, http.MethodPost, api.PathGC, api.GCRequest{ValidAttachments: valid})
		if code != http.StatusOK || !strings.Contains(string(body), `"removed":[]`) {
			errs <- fmt.Sprintf("GC: %d %s", code, body)
		}
	}()
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}

	var wantMaps []uint64
	var wantIDs []string
	for i, p := range pods {
		if i%2 == 1 {
			continue
		}
		wantIDs = append(wantIDs, p.ev.ContainerID)
		if i%5 != 0 {
			wantMaps = append(wantMaps, p.cookie(t))
		}
	}
	slices.Sort(wantMaps)
	slices.Sort(wantIDs)
	if got := maps.cookies(); !slices.Equal(got, wantMaps) {
		t.Fatalf("maps hold %d pods, want exactly the %d live meshed ones", len(got), len(wantMaps))
	}
	if got := heldIDs(a); !slices.Equal(got, wantIDs) {
		t.Fatalf("agent holds %d pods, want the %d live ones", len(got), len(wantIDs))
	}
}
