package plugin

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// request is one request the fake agent received.
type request struct {
	Method string
	Path   string
	Body   []byte
}

// answer is what the fake agent replies on one path.
type answer struct {
	status int
	body   string
	delay  time.Duration
}

// fakeAgent is an HTTP server on a unix socket that records every request
// and answers as told; by default it answers like a healthy agent.
type fakeAgent struct {
	socket string

	mu      sync.Mutex
	reqs    []request
	answers map[string]answer
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	a := &fakeAgent{
		socket: filepath.Join(t.TempDir(), "agent.sock"),
		answers: map[string]answer{
			api.PathAdd:     {status: http.StatusOK, body: `{"containerID":"c","state":"meshed"}`},
			api.PathDel:     {status: http.StatusOK, body: `{"containerID":"c","state":"deleted"}`},
			api.PathCheck:   {status: http.StatusOK, body: `{"containerID":"c","state":"meshed"}`},
			api.PathGC:      {status: http.StatusOK, body: `{"removed":["gone-1"]}`},
			api.PathLog:     {status: http.StatusNoContent},
			api.PathHealthz: {status: http.StatusOK, body: "ok"},
		},
	}
	l, err := net.Listen("unix", a.socket)
	if err != nil {
		t.Fatalf("listen on %s: %v", a.socket, err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(a.serve))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return a
}

func (a *fakeAgent) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.reqs = append(a.reqs, request{Method: r.Method, Path: r.URL.Path, Body: body})
	ans, ok := a.answers[r.URL.Path]
	a.mu.Unlock()
	if !ok {
		ans = answer{status: http.StatusNotFound, body: `{"error":"no such path"}`}
	}
	if ans.delay > 0 {
		select {
		case <-time.After(ans.delay):
		case <-r.Context().Done():
			return
		}
	}
	w.WriteHeader(ans.status)
	_, _ = io.WriteString(w, ans.body)
}

// respond sets the answer for one path.
func (a *fakeAgent) respond(path string, status int, body string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.answers[path] = answer{status: status, body: body}
}

// stall makes the agent hold requests on path for d before answering.
func (a *fakeAgent) stall(path string, d time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ans := a.answers[path]
	ans.delay = d
	a.answers[path] = ans
}

// requests returns the requests received on path.
func (a *fakeAgent) requests(path string) []request {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []request
	for _, r := range a.reqs {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// only returns the single request received on path, failing otherwise.
func (a *fakeAgent) only(t *testing.T, path string) request {
	t.Helper()
	reqs := a.requests(path)
	if len(reqs) != 1 {
		t.Fatalf("agent got %d requests on %s, want 1", len(reqs), path)
	}
	return reqs[0]
}

// logs decodes every relayed log record.
func (a *fakeAgent) logs(t *testing.T) []api.LogRecord {
	t.Helper()
	var out []api.LogRecord
	for _, r := range a.requests(api.PathLog) {
		var rec api.LogRecord
		if err := json.Unmarshal(r.Body, &rec); err != nil {
			t.Fatalf("relayed log record %q: %v", r.Body, err)
		}
		out = append(out, rec)
	}
	return out
}
