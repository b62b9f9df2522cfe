package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/meshlane/meshlane/test/podbin/wire"
)

const clientUsage = `usage: podbin client --to ip:port [flags]

Opens --count fresh connections one after the other. Each sends
"HELLO <token>\n", reads the server's reply line, then (with --bytes N)
sends N pseudo-random bytes while reading N back, compares them, half-closes
and expects EOF. Prints one JSON line per connection; exits 0 only if every
connection was ok.

Flags:
`

// stream is what one client connection needs, implemented over Go's
// netpoller (epoll) and over a plain blocking socket.
type stream interface {
	io.ReadWriter
	CloseWrite() error
	// Abort makes pending and later reads and writes fail at once.
	Abort()
	Close() error
	LocalAddr() string
	RemoteAddr() string
}

type clientConfig struct {
	to       netip.AddrPort
	bind     netip.Addr
	bytes    int
	blocking bool
	timeout  time.Duration
}

func runClient(args []string) error {
	fs := newFlagSet("client", clientUsage)
	to := fs.String("to", "", "server address ip:port (required)")
	count := fs.Int("count", 1, "sequential connections to open")
	n := fs.Int("bytes", 0, "bytes to send and expect echoed after the hello exchange")
	reader := fs.String("reader", "epoll", "epoll (Go net.Conn) or blocking (blocking socket read with read(2), no netpoller)")
	timeout := fs.Duration("timeout", 10*time.Second, "time limit for each connection")
	bind := fs.String("bind", "", "source address to bind (optional)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected arguments %q", fs.Args())
	}
	cfg := clientConfig{bytes: *n, timeout: *timeout}
	var err error
	if cfg.to, err = netip.ParseAddrPort(*to); err != nil {
		return usageError(fs, "--to %q: %v", *to, err)
	}
	if *bind != "" {
		if cfg.bind, err = netip.ParseAddr(*bind); err != nil {
			return usageError(fs, "--bind %q: %v", *bind, err)
		}
	}
	switch *reader {
	case "epoll":
	case "blocking":
		cfg.blocking = true
	default:
		return usageError(fs, "--reader must be epoll or blocking, not %q", *reader)
	}
	if *count < 1 || cfg.bytes < 0 || cfg.timeout <= 0 {
		return usageError(fs, "--count must be >= 1, --bytes >= 0 and --timeout > 0")
	}

	enc := json.NewEncoder(os.Stdout)
	failed := 0
	for i := range *count {
		res := cfg.connect(i)
		if !res.OK {
			failed++
		}
		if err := enc.Encode(res); err != nil {
			return fmt.Errorf("writing result: %w", err)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d connections failed", failed, *count)
	}
	return nil
}

func (cfg clientConfig) dial() (stream, error) {
	if cfg.blocking {
		return dialBlocking(cfg.to, cfg.bind, cfg.timeout)
	}
	d := net.Dialer{Timeout: cfg.timeout}
	if cfg.bind.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: cfg.bind.AsSlice()}
	}
	c, err := d.Dial("tcp", cfg.to.String())
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	tc.SetDeadline(time.Now().Add(cfg.timeout))
	return netStream{tc}, nil
}

func (cfg clientConfig) connect(i int) (res wire.ClientResult) {
	c, err := cfg.dial()
	if err != nil {
		res.Err = fmt.Sprintf("connect %s: %v", cfg.to, err)
		return res
	}
	defer c.Close()
	res.Local, res.Remote = c.LocalAddr(), c.RemoteAddr()

	if _, err := fmt.Fprintf(c, "HELLO %d-%d\n", os.Getpid(), i); err != nil {
		res.Err = fmt.Sprintf("sending HELLO: %v", err)
		return res
	}
	br := bufio.NewReader(c)
	reply, err := br.ReadString('\n')
	if err != nil {
		res.Err = fmt.Sprintf("reading reply: %v", err)
		return res
	}
	res.Reply = strings.TrimSuffix(reply, "\n")

	payload := make([]byte, cfg.bytes)
	var seed [32]byte
	seed[0], seed[1] = byte(i), byte(i>>8)
	rand.NewChaCha8(seed).Read(payload)

	// Write and read at once: a large payload does not fit in the socket
	// buffers, so writing it all first would deadlock against the echo.
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		if _, werr = c.Write(payload); werr == nil {
			werr = c.CloseWrite()
		}
	})
	got := make([]byte, cfg.bytes)
	n, rerr := io.ReadFull(br, got)
	res.Bytes = int64(n)
	var extra int
	if rerr == nil {
		// After the echo the server half-closes: anything more is wrong.
		var tail [1]byte
		extra, rerr = br.Read(tail[:])
		if rerr == io.EOF {
			rerr = nil
		} else if rerr == nil {
			rerr = errors.New("server sent more bytes than were echoed")
		}
	}
	if rerr != nil {
		// Unblock the writer before waiting for it.
		c.Abort()
	}
	wg.Wait()
	res.Match = n == cfg.bytes && extra == 0 && bytes.Equal(got, payload)
	switch {
	case werr != nil:
		res.Err = fmt.Sprintf("sending %d bytes: %v", cfg.bytes, werr)
	case rerr != nil:
		res.Err = fmt.Sprintf("reading echo (%d of %d bytes): %v", n, cfg.bytes, rerr)
	case !res.Match:
		res.Err = fmt.Sprintf("echo differs from what was sent (first difference at byte %d)", firstDiff(got, payload))
	}
	res.OK = res.Err == ""
	return res
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// netStream is a connection served by Go's netpoller.
type netStream struct{ *net.TCPConn }

func (s netStream) Abort()             { s.TCPConn.Close() }
func (s netStream) LocalAddr() string  { return s.TCPConn.LocalAddr().String() }
func (s netStream) RemoteAddr() string { return s.TCPConn.RemoteAddr().String() }
