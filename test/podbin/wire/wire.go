// Package wire holds what podbin writes and what tests read back: the JSON
// lines of the sidecar and server event files and of the client's results.
// Keeping the types in one place lets test code decode exactly what the
// binary encodes.
package wire

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"
)

// Event kinds: a connection is reported once when it is accepted (and, for
// the sidecar, its upstream dialed) and once when it is closed.
const (
	EventAccepted = "accepted"
	EventClosed   = "closed"
)

// Sidecar listener kinds.
const (
	ListenerOutbound = "outbound"
	ListenerInbound  = "inbound"
)

// SidecarEvent is one line of the sidecar's event file.
type SidecarEvent struct {
	Event string `json:"event"`
	// ID pairs the accepted and closed events of one connection.
	ID       uint64 `json:"id"`
	Listener string `json:"listener"`
	// Local and Remote are the accepted socket's own addresses.
	Local  string `json:"local"`
	Remote string `json:"remote"`
	// OrigDst is what SO_ORIGINAL_DST answered; OrigErr why it could not.
	OrigDst string `json:"origDst,omitempty"`
	OrigErr string `json:"origErr,omitempty"`
	// UpstreamLocal is the source address of the onward connection (the
	// passthrough source for inbound); UpstreamErr why dialing failed.
	UpstreamLocal string `json:"upstreamLocal,omitempty"`
	UpstreamErr   string `json:"upstreamErr,omitempty"`
	// BytesUp counts client to upstream, BytesDown upstream to client;
	// CopyErr is the first copy error. Set on closed events only.
	BytesUp   int64     `json:"bytesUp"`
	BytesDown int64     `json:"bytesDown"`
	CopyErr   string    `json:"copyErr,omitempty"`
	Time      time.Time `json:"time"`
}

// ServerEvent is one line of the app server's event file.
type ServerEvent struct {
	Event  string `json:"event"`
	ID     uint64 `json:"id"`
	Name   string `json:"name"`
	Local  string `json:"local"`
	Remote string `json:"remote"`
	// Token is what the client sent in its HELLO line.
	Token string `json:"token,omitempty"`
	// Bytes counts echoed bytes (closed events only).
	Bytes int64     `json:"bytes"`
	Err   string    `json:"err,omitempty"`
	Time  time.Time `json:"time"`
}

// ClientResult is one line of the client's standard output, one per
// connection.
type ClientResult struct {
	OK     bool   `json:"ok"`
	Err    string `json:"err,omitempty"`
	Reply  string `json:"reply"`
	Local  string `json:"local"`
	Remote string `json:"remote"`
	// Bytes is how many echoed bytes came back; Match whether they equal
	// what was sent (and nothing more followed).
	Bytes int64 `json:"bytes"`
	Match bool  `json:"match"`
}

// ReadClientResults decodes the client's output, a result per line.
func ReadClientResults(r io.Reader) ([]ClientResult, error) {
	var res []ClientResult
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var c ClientResult
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			return res, fmt.Errorf("client output %q: %w", sc.Text(), err)
		}
		res = append(res, c)
	}
	return res, sc.Err()
}

// Reply is the app server's answer to a client: its name and the
// connection's two ends as the server saw them (IPv4-mapped addresses
// unmapped).
type Reply struct {
	Name          string
	Remote, Local netip.AddrPort
}

// ParseReply reads the server's answer "<name> remote=<ip:port> local=<ip:port>".
func ParseReply(s string) (Reply, error) {
	f := strings.Fields(s)
	if len(f) != 3 || !strings.HasPrefix(f[1], "remote=") || !strings.HasPrefix(f[2], "local=") {
		return Reply{}, fmt.Errorf("unexpected server reply %q", s)
	}
	remote, err := netip.ParseAddrPort(strings.TrimPrefix(f[1], "remote="))
	if err != nil {
		return Reply{}, fmt.Errorf("server reply %q: %w", s, err)
	}
	local, err := netip.ParseAddrPort(strings.TrimPrefix(f[2], "local="))
	if err != nil {
		return Reply{}, fmt.Errorf("server reply %q: %w", s, err)
	}
	return Reply{
		Name:   f[0],
		Remote: netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()),
		Local:  netip.AddrPortFrom(local.Addr().Unmap(), local.Port()),
	}, nil
}

// Writer appends JSON lines to a file. Each line goes out in a single
// write(2) on an O_APPEND file, so a reader polling the file while the
// process runs sees whole lines as soon as they happen.
type Writer struct {
	mu sync.Mutex
	f  *os.File
}

// Create opens path for appending, creating it if needed.
func Create(path string) (*Writer, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open event file: %w (check the directory exists and is writable by this uid)", err)
	}
	return &Writer{f: f}, nil
}

// Write appends v as one JSON line. A nil Writer discards, so callers
// without an event file need no checks.
func (w *Writer) Write(v any) error {
	if w == nil {
		return nil
	}
	line, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	line = append(line, '\n')
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.f.Write(line); err != nil {
		return fmt.Errorf("write event to %s: %w", w.f.Name(), err)
	}
	return nil
}
