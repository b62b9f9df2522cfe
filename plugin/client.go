package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// relayTimeout bounds one relayed log line: the relay is a courtesy and must
// never hold up the runtime.
const relayTimeout = 300 * time.Millisecond

// maxAnswer caps how much of an agent answer is read; real answers are a
// few hundred bytes.
const maxAnswer = 1 << 20

// agentClient talks HTTP to the agent over its unix socket.
type agentClient struct {
	timeout time.Duration
	http    *http.Client
	// down is set once a request could not reach the agent, so the log
	// relay stops paying for connection attempts that will fail too.
	down bool
}

func newAgentClient(socket string, timeout time.Duration) *agentClient {
	tr := &http.Transport{
		// No Proxy: a runtime's HTTP_PROXY must never apply to a local socket.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression:  true,
		MaxIdleConnsPerHost: 1,
	}
	return &agentClient{timeout: timeout, http: &http.Client{Transport: tr}}
}

// statusError is an agent answer outside 2xx.
type statusError struct {
	Status int
	Msg    string
}

func (e *statusError) Error() string {
	return fmt.Sprintf("agent answered %d %s: %s", e.Status, http.StatusText(e.Status), e.Msg)
}

// agentDown reports whether err means the agent could not do the work (not
// reachable, timed out, or a 5xx answer) as opposed to refusing the request.
func agentDown(err error) bool {
	var se *statusError
	return !errors.As(err, &se) || se.Status >= 500
}

// statusOf returns the HTTP status of an agent answer in err, or 0.
func statusOf(err error) int {
	var se *statusError
	if errors.As(err, &se) {
		return se.Status
	}
	return 0
}

// call makes one request bounded by the configured timeout. in is sent as
// JSON when non-nil. It returns the body of a 2xx answer; any other answer
// is a *statusError.
func (c *agentClient) call(method, path string, in any) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	return c.do(ctx, method, path, in)
}

// relay sends one log record to the agent, best-effort.
func (c *agentClient) relay(rec api.LogRecord) {
	if c.down {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(relayTimeout, c.timeout))
	defer cancel()
	_, _ = c.do(ctx, http.MethodPost, api.PathLog, rec)
}

func (c *agentClient) do(ctx context.Context, method, path string, in any) ([]byte, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encode request for %s: %w", path, err)
		}
		body = bytes.NewReader(b)
	}
	// The host is never resolved: the transport always dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://meshlane"+path, body)
	if err != nil {
		return nil, fmt.Errorf("build request for %s: %w", path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		c.down = true
		return nil, fmt.Errorf("no answer: %w", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		c.down = true
		return nil, fmt.Errorf("answer to %s cut short: %w", path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		var ae api.Error
		msg := strings.TrimSpace(string(raw))
		if json.Unmarshal(raw, &ae) == nil && ae.Error != "" {
			msg = ae.Error
		}
		return nil, &statusError{Status: resp.StatusCode, Msg: msg}
	}
	return raw, nil
}
