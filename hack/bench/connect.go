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

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Hidden first arguments that turn this binary into the connect-tax probe
// (client) and its listener, run inside pods and inside the bench cgroup.
const (
	connectLoopArg = "connect-loop"
	acceptLoopArg  = "accept-loop"
)

// taxPort is where the accept loop listens in pod R; abPort the paired
// probe's own listener there, in the tax cgroup.
const (
	taxPort = 9090
	abPort  = 9091
)

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
	sa, err := listenerAddr(*to)
	if err != nil {
		return err
	}
	l := connectFor(sa, *dur, maxConnectErrors)
	res := ConnectResult{Connects: l.connects, Elapsed: l.elapsed, Errors: l.errors}
	if l.first != nil {
		res.FirstError = l.first.Error()
	}
	if res.Connects > 0 {
		res.NsPerConnect = float64(res.Elapsed.Nanoseconds()) / float64(res.Connects)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return err
	}
	if res.Errors > 0 {
		return fmt.Errorf("%d of %d connects to %s failed, first: %s", res.Errors, res.Errors+res.Connects, *to, res.FirstError)
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
	return parseResultLine[ConnectResult]("connect probe", out)
}

// parseResultLine decodes the first JSON line a probe printed.
func parseResultLine[T any](probe, out string) (T, error) {
	var r T
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "{") {
			continue
		}
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return r, fmt.Errorf("%s output %q: %w", probe, line, err)
		}
		return r, nil
	}
	return r, fmt.Errorf("%s printed no result line", probe)
}

// connectABArg turns this binary into the paired connect-tax probe.
const connectABArg = "connect-ab"

// ABResult is the paired probe's one line of output: for each pair of
// slices, the connect+close time with the datapath's programs attached
// over the time without.
type ABResult struct {
	Ratios []float64 `json:"ratios"`
	Slice  string    `json:"slice"`
}

// runConnectAB measures what attaching the datapath's cgroup programs
// costs a connect+close, the kernel's dispatch to them included, which no
// BPF run-time figure counts. Run as root in the tax cgroup, which nothing
// else attaches to, it attaches the programs behind the datapath's pinned
// links to --cgroup itself (its own cgroup: node scope; a sibling: pod
// scope, seen from a pod that is not meshed), then alternates slices with
// and without them, in this one process: a wall-clock comparison between separate runs
// drowns a tax of a few per cent in a shared machine's noise, pairs of
// neighbouring slices (their order alternating) do not.
func runConnectAB(args []string) error {
	fs := flag.NewFlagSet(connectABArg, flag.ContinueOnError)
	to := fs.String("to", "", "IPv4 listener ip:port")
	links := fs.String("links", "", "the datapath's pinned links directory")
	cgroup := fs.String("cgroup", "", "the cgroup to attach to: the one this process runs in (node scope), or another (pod scope: a meshed pod's, this process playing a pod that is not meshed)")
	pairs := fs.Int("pairs", 100, "slice pairs")
	slice := fs.Duration("slice", 100*time.Millisecond, "length of one slice")
	if err := fs.Parse(args); err != nil {
		return err
	}
	sa, err := listenerAddr(*to)
	if err != nil {
		return err
	}
	progs, err := cgroupPrograms(*links)
	if err != nil {
		return err
	}
	defer func() {
		for _, p := range progs {
			p.prog.Close()
		}
	}()
	loop := func() (float64, error) {
		l := connectFor(sa, *slice, 1)
		if l.first != nil {
			return 0, l.first
		}
		if l.connects == 0 {
			return 0, fmt.Errorf("no connect within a slice of %s", *slice)
		}
		return float64(l.elapsed.Nanoseconds()) / float64(l.connects), nil
	}
	var attached []link.Link
	attach := func() error {
		for _, p := range progs {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: *cgroup, Attach: p.attach, Program: p.prog})
			if err != nil {
				return fmt.Errorf("attach %s to %s: %w", p.name, *cgroup, err)
			}
			attached = append(attached, l)
		}
		return nil
	}
	detach := func() error {
		var errs []error
		for _, l := range attached {
			errs = append(errs, l.Close())
		}
		attached = nil
		return errors.Join(errs...)
	}
	defer detach()
	if _, err := loop(); err != nil { // warm-up
		return err
	}
	res := ABResult{Slice: slice.String()}
	for i := range *pairs {
		var on, off float64
		for j := range 2 {
			withProgs := (i+j)%2 == 0
			if withProgs {
				if err := attach(); err != nil {
					return err
				}
			}
			t, err := loop()
			if err != nil {
				return err
			}
			if withProgs {
				on = t
				if err := detach(); err != nil {
					return err
				}
			} else {
				off = t
			}
		}
		res.Ratios = append(res.Ratios, on/off)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// listenerAddr parses a probe's --to.
func listenerAddr(to string) (*unix.SockaddrInet4, error) {
	ap, err := netip.ParseAddrPort(to)
	if err != nil || !ap.Addr().Is4() {
		return nil, fmt.Errorf("--to %q: want an IPv4 ip:port", to)
	}
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}, nil
}

// loopResult is what one connectFor did.
type loopResult struct {
	connects, errors int64
	first            error
	elapsed          time.Duration
}

// connectFor connects to sa and closes, one connection after the other,
// for d or until maxErrors connects failed. It reads the clock only every
// 64 connects, which keeps the clock out of the cost.
func connectFor(sa *unix.SockaddrInet4, d time.Duration, maxErrors int64) loopResult {
	var l loopResult
	start := time.Now()
	deadline := start.Add(d)
	for i := 0; ; i++ {
		if i%64 == 0 && time.Now().After(deadline) {
			break
		}
		if err := connectClose(sa); err != nil {
			l.errors++
			if l.first == nil {
				l.first = err
			}
			if l.errors >= maxErrors {
				break
			}
			continue
		}
		l.connects++
	}
	l.elapsed = time.Since(start)
	return l
}

// connectClose opens a connection to sa and closes it with RST.
func connectClose(sa *unix.SockaddrInet4) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	return unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
}

type cgroupProgram struct {
	name   string
	prog   *ebpf.Program
	attach ebpf.AttachType
}

// cgroupPrograms opens the programs behind the datapath's pinned cgroup
// links, with the hook each is attached to.
func cgroupPrograms(linksDir string) ([]cgroupProgram, error) {
	links, err := pinnedLinks(linksDir)
	if err != nil {
		return nil, err
	}
	var out []cgroupProgram
	for _, l := range links {
		cg := l.info.Cgroup()
		if cg == nil {
			l.prog.Close() // not a cgroup hook (sk_msg sits on the sockhash)
			continue
		}
		out = append(out, cgroupProgram{l.name, l.prog, ebpf.AttachType(cg.AttachType)})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no pinned cgroup link under %s", linksDir)
	}
	return out, nil
}
