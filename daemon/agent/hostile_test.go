package agent_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// slowCaller is one hostile connection and when the agent cut it off.
type slowCaller struct {
	kind string
	cut  time.Duration // from connect to the agent closing the connection
	err  error
}

// hold connects to the socket, runs send (which may dribble bytes until
// the agent hangs up), then reads until the agent closes the connection,
// and reports how long after connecting that was. Nothing it does may take
// longer than limit.
func hold(path, kind string, limit time.Duration, send func(net.Conn) error) slowCaller {
	start := time.Now()
	c, err := net.Dial("unix", path)
	if err != nil {
		return slowCaller{kind: kind, err: err}
	}
	defer c.Close()
	c.SetDeadline(start.Add(limit))
	if err := send(c); err != nil && !isHangup(err) {
		return slowCaller{kind: kind, err: fmt.Errorf("sending: %w", err)}
	}
	_, err = io.Copy(io.Discard, c)
	if err != nil && !isHangup(err) {
		return slowCaller{kind: kind, err: fmt.Errorf("waiting for the agent to hang up: %w", err)}
	}
	return slowCaller{kind: kind, cut: time.Since(start)}
}

// isHangup tells a connection the agent closed from one that timed out
// on our side.
func isHangup(err error) bool {
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// dribble writes s one byte at a time, every gap, until it is written or
// the agent hangs up.
func dribble(c net.Conn, s string, gap time.Duration) error {
	for i := range len(s) {
		if _, err := c.Write([]byte{s[i]}); err != nil {
			return err
		}
		time.Sleep(gap)
	}
	return nil
}

// TestHostileCallers: while callers connect and say nothing, send their
// headers a byte at a time, send a body a byte at a time, send a header
// larger than the limit, and hammer the agent with malformed, oversized
// and misdirected requests, good ADDs and health checks are still answered
// at once; the agent hangs up on the slow ones at its read timeouts (5 s
// for the headers, 10 s for the whole request) instead of holding them.
func TestHostileCallers(t *testing.T) {
	t.Parallel()
	a := newAgent(t, opts{})
	path := serve(t, a)
	const limit = 20 * time.Second

	// Slow and idle callers.
	slowKinds := []struct {
		kind     string
		n        int
		min, max time.Duration
		send     func(net.Conn) error
	}{
		{"idle", 40, 4 * time.Second, 8 * time.Second, func(net.Conn) error { return nil }},
		{"headers byte by byte", 40, 4 * time.Second, 8 * time.Second, func(c net.Conn) error {
			return dribble(c, "POST "+api.PathAdd+" HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n", 100*time.Millisecond)
		}},
		{"body byte by byte", 20, 9 * time.Second, 14 * time.Second, func(c net.Conn) error {
			if _, err := io.WriteString(c, "POST "+api.PathAdd+" HTTP/1.1\r\nHost: agent\r\nContent-Length: 4096\r\n\r\n"); err != nil {
				return err
			}
			return dribble(c, `{"containerID":"`+strings.Repeat("x", 4000), 100*time.Millisecond)
		}},
	}
	var wg sync.WaitGroup
	results := make(chan slowCaller, 200)
	for _, k := range slowKinds {
		for range k.n {
			wg.Go(func() { results <- hold(path, k.kind, limit, k.send) })
		}
	}

	// Bad requests from 16 callers until the good ones are done.
	stop := make(chan struct{})
	var bad atomic.Int64
	var badWrong atomic.Value
	big := `{"containerID":"x","annotations":{"a":"` + strings.Repeat("x", 70<<10) + `"}}`
	badReqs := []struct {
		method, path string
		body         any
		code         int
	}{
		{http.MethodPost, api.PathAdd, `{"containerID":`, http.StatusBadRequest},
		{http.MethodPost, api.PathAdd, big, http.StatusRequestEntityTooLarge},
		{http.MethodPost, api.PathDel, `{"containerID":7}`, http.StatusBadRequest},
		{http.MethodPost, api.PathAdd, `{"containerID":"../../etc"}`, http.StatusBadRequest},
		{http.MethodGet, "/v1/nope", nil, http.StatusNotFound},
		{http.MethodGet, api.PathAdd, nil, http.StatusMethodNotAllowed},
	}
	var hammer sync.WaitGroup
	for w := range 16 {
		hammer.Go(func() {
			c := client(path)
			for i := w; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				r := badReqs[i%len(badReqs)]
				if code, body := doNoFatal(c, r.method, r.path, r.body); code != r.code {
					badWrong.Store(fmt.Sprintf("%s %s: %d %s, want %d", r.method, r.path, code, body, r.code))
				}
				bad.Add(1)
			}
		})
	}

	// A header larger than the server's limit is refused outright.
	c := client(path)
	req, _ := http.NewRequest(http.MethodGet, "http://agent"+api.PathHealthz, nil)
	req.Header.Set("X-Big", strings.Repeat("h", 70<<10))
	if resp, err := c.Do(req); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("request with a 70 KiB header: %v %v, want 431", resp, err)
	} else {
		resp.Body.Close()
	}

	// Good callers, meanwhile, one after the other.
	var slowest time.Duration
	for i := range 20 {
		p := newPod(t, fmt.Sprintf("good%d", i), istioAnn, fmt.Sprintf("10.3.0.%d/24", i+1))
		start := time.Now()
		code, resp, msg := call(t, c, api.PathAdd, p.ev)
		if code != http.StatusOK || resp.State != api.StateMeshed {
			t.Fatalf("good ADD %d among hostile callers: %d %+v %s", i, code, resp, msg)
		}
		if code, _ := do(t, c, http.MethodGet, api.PathHealthz, nil); code != http.StatusOK {
			t.Fatalf("healthz among hostile callers: %d", code)
		}
		slowest = max(slowest, time.Since(start))
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	hammer.Wait()
	if w := badWrong.Load(); w != nil {
		t.Errorf("a bad request got the wrong answer: %s", w)
	}
	if slowest > time.Second {
		t.Errorf("the slowest good ADD + healthz took %s among hostile callers, want under 1s", slowest)
	}
	if len(a.Pods()) != 20 {
		t.Errorf("agent holds %d pods, want the 20 good ones", len(a.Pods()))
	}

	wg.Wait()
	close(results)
	cuts := map[string][]time.Duration{}
	for r := range results {
		if r.err != nil {
			t.Errorf("%s caller: %v", r.kind, r.err)
			continue
		}
		cuts[r.kind] = append(cuts[r.kind], r.cut)
	}
	for _, k := range slowKinds {
		got := cuts[k.kind]
		lo, hi := limit, time.Duration(0)
		for _, d := range got {
			lo, hi = min(lo, d), max(hi, d)
		}
		t.Logf("%d %s callers cut off after %s to %s", len(got), k.kind, lo.Round(10*time.Millisecond), hi.Round(10*time.Millisecond))
		if len(got) != k.n || lo < k.min || hi > k.max {
			t.Errorf("%s callers: %d of %d cut off, after %s to %s; want all, between %s and %s", k.kind, len(got), k.n, lo, hi, k.min, k.max)
		}
	}
	t.Logf("%d bad requests answered meanwhile; 20 good ADDs, the slowest (with a healthz) %s", bad.Load(), slowest.Round(time.Millisecond))
}
