package api

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
)

// maxAnswer caps how much of an agent answer is read.
const maxAnswer = 8 << 20

// Client talks HTTP/JSON to the agent over its unix socket. The plugin,
// meshlanectl and the tests share it.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client for the agent listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		// No Proxy: a caller's HTTP_PROXY must never apply to a local socket.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression:  true,
		MaxIdleConnsPerHost: 1,
	}
	return &Client{Socket: socket, http: &http.Client{Transport: tr}}
}

// StatusError is an agent answer outside 2xx.
type StatusError struct {
	Status int
	Msg    string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("agent answered %d %s: %s", e.Status, http.StatusText(e.Status), e.Msg)
}

// StatusOf returns the HTTP status of an agent answer in err, or 0 when the
// agent did not answer at all.
func StatusOf(err error) int {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Status
	}
	return 0
}

// Do makes one request; in is sent as JSON when non-nil. It returns the body
// of a 2xx answer; any other answer is a *StatusError, and no answer at all
// is an error that names the socket.
func (c *Client) Do(ctx context.Context, method, path string, in any) ([]byte, error) {
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
		return nil, fmt.Errorf("no answer from the agent at %s: %w", c.Socket, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return nil, fmt.Errorf("answer to %s cut short: %w", path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		var ae Error
		msg := strings.TrimSpace(string(raw))
		if json.Unmarshal(raw, &ae) == nil && ae.Error != "" {
			msg = ae.Error
		}
		return nil, &StatusError{Status: resp.StatusCode, Msg: msg}
	}
	return raw, nil
}

// Get fetches path and decodes its JSON answer into out.
func (c *Client) Get(ctx context.Context, path string, out any) error {
	raw, err := c.Do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("decode answer to %s: %w", path, err)
	}
	return nil
}

// Ready returns nil once the agent answers /readyz with 200.
func (c *Client) Ready(ctx context.Context) error {
	_, err := c.Do(ctx, http.MethodGet, PathReadyz, nil)
	return err
}
