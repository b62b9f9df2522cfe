package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Hidden first arguments that turn this binary into the connect-tax probe
// (client) and its listener, run inside pods and inside the bench cgroup.
const (
	connectLoopArg = "connect-loop"
	acceptLoopArg  = "accept-loop"
)

// taxPort is where the accept loop listens in pod R.
const taxPort = 9090

// maxConnectErrors ends the loop early: a path that refuses this often is
// broken, not slow.
const maxConnectErrors = 100

// ConnectResult is the probe's one line of output.
type ConnectResult struct {
	Connects     int64         `json:"connects"`
	Elapsed      time.Duration `json:"elapsed"`
	NsPerConnect float64       `json:"nsPerConnect"`
	Errors       int64         `json:"errors"`
	FirstError   string        `json:"firstError,omitempty"`
}

// runConnectLoop opens and closes TCP connections to --to, one after the
// other, for --duration, with plain blocking system calls so the loop
// measures the kernel (and any cgroup programs), not Go's netpoller. Each
// close sends RST (SO_LINGER 0): no TIME_WAIT piles up, so the source
// ports never run out however long the loop runs.
func runConnectLoop(args []string) error {
	fs := flag.NewFlagSet(connectLoopArg, flag.ContinueOnError)
	to := fs.String("to", "", "IPv4 listener ip:port")
	dur := fs.Duration("duration", 5*time.Second, "how long to loop")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(*to)
	if err != nil || !ap.Addr().Is4() {
		return fmt.Errorf("--to %q: want an IPv4 ip:port", *to)
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	linger := &unix.Linger{Onoff: 1, Linger: 0}

	var res ConnectResult
	start := time.Now()
	deadline := start.Add(*dur)
	for i := 0; ; i++ {
		// Reading the clock every 64 connects keeps it out of the cost.
		if i%64 == 0 && time.Now().After(deadline) {
			break
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		err = unix.Connect(fd, sa)
		if err == nil {
			err = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, linger)
		}
		unix.Close(fd)
		if err != nil {
			res.Errors++
			if res.FirstError == "" {
				res.FirstError = err.Error()
			}
			if res.Errors >= maxConnectErrors {
				break
			}
			continue
		}
		res.Connects++
	}
	res.Elapsed = time.Since(start)
	if res.Connects > 0 {
		res.NsPerConnect = float64(res.Elapsed.Nanoseconds()) / float64(res.Connects)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return err
	}
	if res.Errors > 0 {
		return fmt.Errorf("%d of %d connects to %s failed, first: %s", res.Errors, res.Errors+res.Connects, ap, res.FirstError)
	}
	return nil
}

// runAcceptLoop accepts and closes connections on --listen until killed,
// with blocking system calls: the cheapest listener there is, so the
// connect loop's cost is the kernel's connection path and not a server's.
func runAcceptLoop(args []string) error {
	fs := flag.NewFlagSet(acceptLoopArg, flag.ContinueOnError)
	listen := fs.String("listen", "", "IPv4 ip:port to listen on")
	ready := fs.String("ready", "", "file to create once listening")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(*listen)
	if err != nil || !ap.Addr().Is4() {
		return fmt.Errorf("--listen %q: want an IPv4 ip:port", *listen)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("SO_REUSEADDR: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		return fmt.Errorf("bind %s: %w", ap, err)
	}
	if err := unix.Listen(fd, 4096); err != nil {
		return fmt.Errorf("listen %s: %w", ap, err)
	}
	if *ready != "" {
		if err := os.WriteFile(*ready, []byte(ap.String()+"\n"), 0o644); err != nil {
			return fmt.Errorf("ready file: %w", err)
		}
	}
	for {
		// The raw call asks for no peer address: unix.Accept4 decodes one
		// and calls getsockopt for it, which would run the datapath's
		// getsockopt program on every accept and count it as connect tax.
		c, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(fd), 0, 0, unix.SOCK_CLOEXEC, 0, 0)
		if errno != 0 {
			if errno == unix.EINTR || errno == unix.ECONNABORTED {
				continue
			}
			return fmt.Errorf("accept: %w", errno)
		}
		unix.Close(int(c))
	}
}

// parseConnectResult finds the probe's JSON line in its output.
func parseConnectResult(out string) (ConnectResult, error) {
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var r ConnectResult
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return r, fmt.Errorf("connect probe output %q: %w", line, err)
		}
		return r, nil
	}
	return ConnectResult{}, errors.New("connect probe printed no result line")
}
