package api

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// serve runs h with net/http's server, as the agent does, on a unix socket.
func serve(t *testing.T, h http.HandlerFunc) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatalf("listen on %s: %v", sock, err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return NewClient(sock)
}

// TestClientAgainstNetHTTP checks the hand-written HTTP/1.0 exchange
// against net/http's server: requests arrive whole, answers of every size
// and status come back whole.
func TestClientAgainstNetHTTP(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 64<<10) // 1 MiB, streamed
	c := serve(t, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case PathAdd:
			if r.Method != MethodPost || r.Header.Get("Content-Type") != "application/json" || string(body) != `{"containerID":"c1"}` {
				http.Error(w, "bad request: "+r.Method+" "+string(body), http.StatusBadRequest)
				return
			}
			w.Write([]byte(`{"containerID":"c1","state":"meshed"}`))
		case PathConns:
			// Written in pieces, so net/http cannot know its length up
			// front: an HTTP/1.1 client would get it chunked.
			for i := 0; i < len(big); i += 32 << 10 {
				w.Write([]byte(big[i : i+32<<10]))
				w.(http.Flusher).Flush()
			}
		case PathCheck:
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"error":"container c9 not held"}`))
		case PathReadyz:
			http.Error(w, "not ready: restoring state", http.StatusServiceUnavailable)
		}
	})
	ctx := context.Background()

	raw, err := c.Do(ctx, MethodPost, PathAdd, map[string]string{"containerID": "c1"})
	if err != nil || string(raw) != `{"containerID":"c1","state":"meshed"}` {
		t.Fatalf("POST %s: %q, %v", PathAdd, raw, err)
	}
	raw, err = c.Do(ctx, MethodGet, PathConns, nil)
	if err != nil || string(raw) != big {
		t.Fatalf("GET %s: %d bytes (want %d), %v", PathConns, len(raw), len(big), err)
	}
	_, err = c.Do(ctx, MethodPost, PathCheck, map[string]string{"containerID": "c9"})
	if StatusOf(err) != StatusNotFound || !strings.Contains(err.Error(), "container c9 not held") {
		t.Fatalf("POST %s: want a 404 carrying the agent's message, got %v", PathCheck, err)
	}
	err = c.Ready(ctx)
	if StatusOf(err) != http.StatusServiceUnavailable || !strings.Contains(err.Error(), "not ready: restoring state") {
		t.Fatalf("Ready: want a 503 carrying the plain-text message, got %v", err)
	}
}

func TestClientTimeoutAndNoAgent(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	c := serve(t, func(w http.ResponseWriter, r *http.Request) { <-release })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Do(ctx, MethodGet, PathHealthz, nil)
	if !errors.Is(err, context.DeadlineExceeded) || StatusOf(err) != 0 {
		t.Fatalf("stalled agent: want a deadline error and no status, got %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("the call outlived its 100ms context by far: %v", took)
	}

	ctx, cancel = context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if _, err := c.Do(ctx, MethodGet, PathHealthz, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: want context.Canceled, got %v", err)
	}

	gone := NewClient(filepath.Join(t.TempDir(), "none.sock"))
	_, err = gone.Do(context.Background(), MethodGet, PathHealthz, nil)
	if err == nil || StatusOf(err) != 0 || !strings.Contains(err.Error(), "none.sock") {
		t.Fatalf("no agent: want an error naming the socket, got %v", err)
	}
}

func TestParseAnswer(t *testing.T) {
	for _, tc := range []struct {
		name, raw string
		status    int
		body      string
		err       string
	}{
		{"ok", "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, "ok", ""},
		{"no length", "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nlater\n", 503, "later\n", ""},
		{"empty body", "HTTP/1.0 204 No Content\r\n\r\n", 204, "", ""},
		{"cut short", "HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nabc", 0, "", "cut short"},
		{"headers cut", "HTTP/1.0 200 OK\r\nContent-Le", 0, "", "before its headers"},
		{"not http", "SSH-2.0-OpenSSH\r\n\r\n", 0, "", "not an HTTP/1 status line"},
		{"bad code", "HTTP/1.0 2x0 OK\r\n\r\n", 0, "", "bad status code"},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", 0, "", "Transfer-Encoding"},
		{"bad header", "HTTP/1.0 200 OK\r\nno colon here\r\n\r\n", 0, "", "malformed header"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, body, err := ParseAnswer([]byte(tc.raw))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("want an error containing %q, got %v (status %d)", tc.err, err, status)
				}
				return
			}
			if err != nil || status != tc.status || string(body) != tc.body {
				t.Fatalf("got %d %q %v, want %d %q", status, body, err, tc.status, tc.body)
			}
		})
	}
}

// FuzzParseAnswer: any bytes from the socket give a status and a body that
// is the end of what was read, or an error; never a panic.
func FuzzParseAnswer(f *testing.F) {
	f.Add([]byte("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
	f.Add([]byte("HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"x\"}"))
	f.Add([]byte("HTTP/1.0 200\r\n\r\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		status, body, err := ParseAnswer(raw)
		if err != nil {
			return
		}
		if status < 100 || status > 999 {
			t.Fatalf("status %d accepted", status)
		}
		if !bytes.HasSuffix(raw, body) {
			t.Fatalf("body %q is not the end of the answer", body)
		}
	})
}
