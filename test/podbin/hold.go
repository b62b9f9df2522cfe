package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/meshlane/meshlane/test/podbin/wire"
)

const holdUsage = `usage: podbin hold --to ip:port --conns N [flags]

Opens --conns connections to the app server at --to, --parallel at a time;
on each it sends "HELLO <token>\n" and reads the reply line, then keeps the
connection open. Once all are open (or failed) it writes --ready and holds
them until SIGTERM or --hold, then checks which are still open, closes them
all and prints one JSON line (opened, failed, alive). Exits 0 only if every
connection opened and stayed open. Needs a file limit above --conns.

Flags:
`

func runHold(args []string) error {
	fs := newFlagSet("hold", holdUsage)
	to := fs.String("to", "", "server address ip:port (required)")
	conns := fs.Int("conns", 1000, "connections to open and hold")
	parallel := fs.Int("parallel", 64, "connections being opened at once")
	timeout := fs.Duration("timeout", 10*time.Second, "time limit for opening one connection")
	hold := fs.Duration("hold", time.Minute, "longest hold; SIGTERM ends it sooner")
	ready := fs.String("ready", "", "file written once every connection is open or failed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected arguments %q", fs.Args())
	}
	dst, err := netip.ParseAddrPort(*to)
	if err != nil {
		return usageError(fs, "--to %q: %v", *to, err)
	}
	if *conns < 1 || *parallel < 1 || *timeout <= 0 || *hold <= 0 {
		return usageError(fs, "--conns and --parallel must be >= 1, --timeout and --hold > 0")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	start := time.Now()
	open, res := openAll(dst, *conns, *parallel, *timeout)
	res.OpenSeconds = time.Since(start).Seconds()
	if *ready != "" {
		if err := os.WriteFile(*ready, []byte(fmt.Sprintf("%d\n", res.Opened)), 0o644); err != nil {
			return fmt.Errorf("ready file: %w", err)
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(*hold):
	}
	for _, c := range open {
		if stillOpen(c) {
			res.Alive++
		}
		c.Close()
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return fmt.Errorf("writing result: %w", err)
	}
	if res.Failed > 0 || res.Alive != res.Opened {
		return fmt.Errorf("%d of %d connections failed to open, %d of %d opened were lost while held",
			res.Failed, *conns, res.Opened-res.Alive, res.Opened)
	}
	return nil
}

// openAll opens n connections, parallel at a time, each through the HELLO
// exchange.
func openAll(dst netip.AddrPort, n, parallel int, timeout time.Duration) ([]*net.TCPConn, wire.HoldResult) {
	var (
		mu   sync.Mutex
		open []*net.TCPConn
		res  wire.HoldResult
		wg   sync.WaitGroup
	)
	next := make(chan int)
	for range min(parallel, n) {
		wg.Go(func() {
			for i := range next {
				c, err := hello(dst, i, timeout)
				mu.Lock()
				if err != nil {
					res.Failed++
					if res.FirstErr == "" {
						res.FirstErr = err.Error()
					}
				} else {
					res.Opened++
					open = append(open, c)
				}
				mu.Unlock()
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return open, res
}

func hello(dst netip.AddrPort, i int, timeout time.Duration) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: timeout}
	nc, err := d.Dial("tcp", dst.String())
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}
	c := nc.(*net.TCPConn)
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(c, "HELLO %d-%d\n", os.Getpid(), i); err != nil {
		c.Close()
		return nil, fmt.Errorf("sending HELLO: %w", err)
	}
	// The reply is one short line; a small reader is enough, and nothing
	// else is sent until the hold ends.
	if _, err := bufio.NewReaderSize(c, 256).ReadString('\n'); err != nil {
		c.Close()
		return nil, fmt.Errorf("reading reply: %w", err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// stillOpen reports whether neither end closed or reset c: a peek that
// does not wait finds no data and no end of stream.
func stillOpen(c *net.TCPConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	open := false
	raw.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		open = errors.Is(err, syscall.EAGAIN)
		return true
	})
	return open
}
