package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// maxAnswer caps how much of an agent answer is read.
const maxAnswer = 8 << 20

// Client talks HTTP/JSON to the agent over its unix socket. The plugin,
// meshlanectl and the tests share it.
//
// It writes its HTTP/1.0 requests itself rather than through net/http:
// linking net/http costs every meshlane-cni process about 2 ms of start-up
// (package initialisation and the page faults of a binary twice the size),
// which was a quarter of what the plugin added to each pod's ADD. HTTP/1.0
// keeps the exchange to what a local socket needs: one request per
// connection, an answer never chunked, ending when the agent closes. The
// agent serves it with net/http's server like any other client.
type Client struct {
	Socket string
}

// NewClient returns a client for the agent listening on socket.
func NewClient(socket string) *Client {
	return &Client{Socket: socket}
}

// StatusError is an agent answer outside 2xx.
type StatusError struct {
	Status int
	Msg    string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("agent answered status %d: %s", e.Status, e.Msg)
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
	var body []byte
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encode request for %s: %w", path, err)
		}
		body = b
	}
	raw, err := c.exchange(ctx, request(method, path, body))
	if err != nil {
		return nil, fmt.Errorf("no answer from the agent at %s: %w", c.Socket, err)
	}
	status, payload, err := ParseAnswer(raw)
	if err != nil {
		return nil, fmt.Errorf("answer to %s from the agent at %s: %w", path, c.Socket, err)
	}
	if status < 200 || status > 299 {
		var ae Error
		msg := strings.TrimSpace(string(payload))
		if json.Unmarshal(payload, &ae) == nil && ae.Error != "" {
			msg = ae.Error
		}
		return nil, &StatusError{Status: status, Msg: msg}
	}
	return payload, nil
}

// request is the whole HTTP/1.0 request. The host is never resolved: the
// request only ever goes down the socket.
func request(method, path string, body []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.0\r\nHost: meshlane\r\n", method, path)
	if body != nil {
		fmt.Fprintf(&b, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.Write(body)
	return b.Bytes()
}

// exchange sends req on a new connection and reads the answer until the
// agent closes it, within ctx.
func (c *Client) exchange(ctx context.Context, req []byte) ([]byte, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Socket)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// A cancelled context must end a blocked read or write too.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	if _, err := conn.Write(req); err != nil {
		return nil, ctxErr(ctx, err)
	}
	raw, err := io.ReadAll(io.LimitReader(conn, maxAnswer+1))
	if err != nil {
		return nil, ctxErr(ctx, err)
	}
	if len(raw) > maxAnswer {
		return nil, fmt.Errorf("answer longer than %d bytes", maxAnswer)
	}
	return raw, nil
}

// ctxErr prefers the context's reason to the deadline error it caused
// (the connection's deadline, the context's own, may pass first).
func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%w (%v)", cerr, err)
	}
	if _, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}

// ParseAnswer splits a whole HTTP/1.x answer into its status and body. A
// Content-Length, when present, must match the body read.
func ParseAnswer(raw []byte) (status int, body []byte, err error) {
	head, body, ok := bytes.Cut(raw, []byte("\r\n\r\n"))
	if !ok {
		return 0, nil, errors.New("answer ends before its headers do (the agent closed the connection early)")
	}
	lines := strings.Split(string(head), "\r\n")
	proto, rest, _ := strings.Cut(lines[0], " ")
	code, _, _ := strings.Cut(rest, " ")
	if !strings.HasPrefix(proto, "HTTP/1.") || len(code) != 3 {
		return 0, nil, fmt.Errorf("not an HTTP/1 status line: %q", truncate(lines[0]))
	}
	status, err = strconv.Atoi(code)
	if err != nil || status < 100 {
		return 0, nil, fmt.Errorf("bad status code in %q", truncate(lines[0]))
	}
	for _, l := range lines[1:] {
		name, value, ok := strings.Cut(l, ":")
		if !ok {
			return 0, nil, fmt.Errorf("malformed header line %q", truncate(l))
		}
		switch strings.ToLower(strings.TrimSpace(name)) {
		case "content-length":
			n, err := strconv.Atoi(strings.TrimSpace(value))
			if err != nil || n < 0 {
				return 0, nil, fmt.Errorf("bad Content-Length %q", truncate(value))
			}
			if n != len(body) {
				return 0, nil, fmt.Errorf("answer body has %d bytes, Content-Length says %d (cut short?)", len(body), n)
			}
		case "transfer-encoding":
			// An HTTP/1.0 request never gets one; refuse rather than
			// hand back an encoded body.
			return 0, nil, fmt.Errorf("unexpected Transfer-Encoding %q in an answer to HTTP/1.0", truncate(value))
		}
	}
	return status, body, nil
}

func truncate(s string) string {
	const most = 80
	if len(s) > most {
		return s[:most] + "..."
	}
	return s
}

// Get fetches path and decodes its JSON answer into out.
func (c *Client) Get(ctx context.Context, path string, out any) error {
	raw, err := c.Do(ctx, MethodGet, path, nil)
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
	_, err := c.Do(ctx, MethodGet, PathReadyz, nil)
	return err
}
