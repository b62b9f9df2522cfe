package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlane/meshlane/test/podbin/wire"
)

const sidecarUsage = `usage: podbin sidecar [flags]

An L4 stand-in for a mesh sidecar. Each accepted connection asks the kernel
for its original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) and
relays to it: outbound connections straight, inbound ones from the
passthrough source address (Istio's 127.0.0.6 / ::6). A connection whose
original destination cannot be read is recorded and closed.

Flags:
`

type sidecar struct {
	events       *wire.Writer
	splice       bool
	passthrough4 netip.Addr
	passthrough6 netip.Addr
	dialTimeout  time.Duration
	nextID       atomic.Uint64
}

func runSidecar(args []string) error {
	fs := newFlagSet("sidecar", sidecarUsage)
	outbound := fs.String("outbound", "0.0.0.0:15001,[::]:15001", "outbound listen addresses, comma separated (Linkerd: 127.0.0.1:4140)")
	inbound := fs.String("inbound", "0.0.0.0:15006,[::]:15006", "inbound listen addresses, comma separated (empty: none)")
	passthrough := fs.String("passthrough-src", "127.0.0.6,::6", "source addresses for inbound upstream connections, one per family (empty: the kernel picks)")
	events := fs.String("events", "", "append one JSON line per connection event to this file")
	copyMode := fs.String("copy", "buffer", "how to relay bytes: buffer (read/write loop, 32 KiB) or splice (io.Copy between TCP conns, which uses splice(2))")
	ready := fs.String("ready", "", "write the bound addresses to this file once every listener is up")
	dualstack := fs.Bool("dualstack", false, "let IPv6 listeners accept v4-mapped connections (one [::] socket for both families)")
	reuseport := fs.Bool("reuseport", false, "set SO_REUSEPORT on the listeners, as Envoy does by default")
	mptcp := fs.Bool("mptcp", false, "listen with MPTCP (Go's own default), not plain TCP as Envoy and linkerd2-proxy do")
	dialTimeout := fs.Duration("dial-timeout", 5*time.Second, "timeout for upstream connections")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected arguments %q", fs.Args())
	}
	s := &sidecar{dialTimeout: *dialTimeout}
	switch *copyMode {
	case "buffer":
	case "splice":
		s.splice = true
	default:
		return usageError(fs, "--copy must be buffer or splice, not %q", *copyMode)
	}
	for p := range strings.SplitSeq(*passthrough, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		a, err := netip.ParseAddr(p)
		if err != nil {
			return usageError(fs, "--passthrough-src %q: %v", p, err)
		}
		if a.Is4() {
			s.passthrough4 = a
		} else {
			s.passthrough6 = a
		}
	}

	outAddrs, err := parseAddrPorts(*outbound)
	if err != nil {
		return usageError(fs, "--outbound: %v", err)
	}
	var inAddrs []netip.AddrPort
	if *inbound != "" {
		if inAddrs, err = parseAddrPorts(*inbound); err != nil {
			return usageError(fs, "--inbound: %v", err)
		}
	}
	if *events != "" {
		if s.events, err = wire.Create(*events); err != nil {
			return err
		}
	}
	outLns, err := listenAll(outAddrs, listenOpts{*dualstack, *reuseport, *mptcp})
	if err != nil {
		return fmt.Errorf("outbound listener: %w", err)
	}
	inLns, err := listenAll(inAddrs, listenOpts{*dualstack, *reuseport, *mptcp})
	if err != nil {
		return fmt.Errorf("inbound listener: %w", err)
	}
	if *ready != "" {
		if err := writeReady(*ready, outLns, inLns); err != nil {
			return err
		}
	}

	errc := make(chan error, len(outLns)+len(inLns))
	for _, ln := range outLns {
		go func() { errc <- s.serve(ln, wire.ListenerOutbound) }()
	}
	for _, ln := range inLns {
		go func() { errc <- s.serve(ln, wire.ListenerInbound) }()
	}
	return <-errc
}

func (s *sidecar) serve(ln *net.TCPListener, kind string) error {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return fmt.Errorf("%s listener %s: accept: %w", kind, ln.Addr(), err)
		}
		go s.handle(c, kind, uint16(ln.Addr().(*net.TCPAddr).Port))
	}
}

// handle relays one accepted connection; port is its listener's.
func (s *sidecar) handle(c *net.TCPConn, kind string, port uint16) {
	ev := wire.SidecarEvent{
		Event:    wire.EventAccepted,
		ID:       s.nextID.Add(1),
		Listener: kind,
		Local:    c.LocalAddr().String(),
		Remote:   c.RemoteAddr().String(),
	}
	dst, err := originalDst(c)
	if self := netip.AddrPortFrom(unmapped(c.LocalAddr().(*net.TCPAddr).AddrPort()).Addr(), port); err == nil && unmapped(dst) == self {
		// Conntrack answers with the socket's own address when nothing
		// rewrote the destination: the listener's port on the accepted
		// address. Relaying would connect to ourselves. (A connection
		// steered to the listener keeps the address and port it dialed,
		// which are its original destination, as with TPROXY.)
		err = errors.New("original destination is this listener itself: the connection was not redirected")
	}
	if err != nil {
		ev.OrigErr = err.Error()
		s.record(ev)
		c.Close()
		return
	}
	dst = unmapped(dst)
	ev.OrigDst = dst.String()

	d := net.Dialer{Timeout: s.dialTimeout}
	if kind == wire.ListenerInbound {
		src := s.passthrough6
		if dst.Addr().Is4() {
			src = s.passthrough4
		}
		if src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
	}
	up, err := d.Dial("tcp", dst.String())
	if err != nil {
		ev.UpstreamErr = err.Error()
		s.record(ev)
		c.Close()
		return
	}
	ev.UpstreamLocal = up.LocalAddr().String()
	s.record(ev)

	ev.Event = wire.EventClosed
	ev.BytesUp, ev.BytesDown, err = s.relay(c, up.(*net.TCPConn))
	if err != nil {
		ev.CopyErr = err.Error()
	}
	s.record(ev)
}

// relay copies both ways until both directions end, passing each EOF on as
// a half close. A copy error closes both sockets so the other direction
// cannot hang.
func (s *sidecar) relay(down, up *net.TCPConn) (upBytes, downBytes int64, err error) {
	var wg sync.WaitGroup
	var once sync.Once
	fail := func(e error) {
		once.Do(func() {
			err = e
			down.Close()
			up.Close()
		})
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		var e error
		if upBytes, e = s.copy(up, down); e != nil {
			fail(fmt.Errorf("client to upstream: %w", e))
			return
		}
		up.CloseWrite()
	}()
	go func() {
		defer wg.Done()
		var e error
		if downBytes, e = s.copy(down, up); e != nil {
			fail(fmt.Errorf("upstream to client: %w", e))
			return
		}
		down.CloseWrite()
	}()
	wg.Wait()
	down.Close()
	up.Close()
	return upBytes, downBytes, err
}

func (s *sidecar) copy(dst, src *net.TCPConn) (int64, error) {
	if s.splice {
		// *net.TCPConn.ReadFrom from another *net.TCPConn uses splice(2).
		return io.Copy(dst, src)
	}
	return plainCopy(dst, src)
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func (s *sidecar) record(ev wire.SidecarEvent) {
	ev.Time = time.Now()
	if err := s.events.Write(ev); err != nil {
		log.Print(err)
	}
}

// flagSet helpers shared by the subcommands.

func newFlagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet("podbin "+name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	return fs
}

// errUsage marks errors that deserve exit code 2 and the usage text.
var errUsage = errors.New("usage")

func usageError(fs *flag.FlagSet, format string, args ...any) error {
	fmt.Fprintf(fs.Output(), "podbin: "+format+"\n", args...)
	fs.Usage()
	return errUsage
}
