package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// parseAddrPorts parses a comma separated list like "0.0.0.0:15001,[::]:15001".
func parseAddrPorts(list string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for s := range strings.SplitSeq(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			return nil, fmt.Errorf("address %q: %w (want ip:port or [ip6]:port)", s, err)
		}
		out = append(out, ap)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no address in %q", list)
	}
	return out, nil
}

// listenOpts shape the listeners. IPv6 listeners are IPV6_V6ONLY so that
// 0.0.0.0:P and [::]:P can be bound side by side as two sockets, the way
// Envoy binds them; dualstack instead leaves IPv6 sockets open to v4-mapped
// peers (a single [::]:P for both families). reuseport sets SO_REUSEPORT,
// as Envoy does on its listeners by default. mptcp listens with MPTCP, as
// Go's net.Listen does by default since Go 1.24; otherwise listeners are
// plain TCP, as Envoy's and linkerd2-proxy's are.
type listenOpts struct {
	dualstack, reuseport, mptcp bool
}

// listenAll opens one TCP listener per address.
func listenAll(addrs []netip.AddrPort, o listenOpts) ([]*net.TCPListener, error) {
	var lns []*net.TCPListener
	for _, ap := range addrs {
		ln, err := listenOne(ap, o)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

func listenOne(ap netip.AddrPort, o listenOpts) (*net.TCPListener, error) {
	network := "tcp4"
	v6only := -1 // not set
	if ap.Addr().Is6() {
		network, v6only = "tcp6", 1
		if o.dualstack {
			v6only = 0
		}
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			if v6only >= 0 {
				if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
					serr = fmt.Errorf("setsockopt(IPV6_V6ONLY=%d): %w", v6only, err)
					return
				}
			}
			if o.reuseport {
				if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
					serr = fmt.Errorf("setsockopt(SO_REUSEPORT): %w", err)
				}
			}
		}); err != nil {
			return err
		}
		return serr
	}}
	// The kernel never puts an MPTCP socket in a sockmap, so meshlane's
	// sk_lookup mode cannot register such a listener.
	lc.SetMultipathTCP(o.mptcp)
	ln, err := lc.Listen(context.Background(), network, ap.String())
	if err != nil {
		if o.dualstack && errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("listen %s: %w (with --dualstack an IPv6 wildcard also takes the IPv4 port: list only the [::] address)", ap, err)
		}
		return nil, fmt.Errorf("listen %s: %w", ap, err)
	}
	return ln.(*net.TCPListener), nil
}

// writeReady writes the bound addresses, one a line, to path. It writes a
// temporary file and renames it so a waiter never reads half a file.
func writeReady(path string, lns ...[]*net.TCPListener) error {
	var b strings.Builder
	for _, group := range lns {
		for _, ln := range group {
			b.WriteString(ln.Addr().String())
			b.WriteByte('\n')
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".ready-*")
	if err != nil {
		return fmt.Errorf("ready file: %w", err)
	}
	if _, err := tmp.WriteString(b.String()); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("ready file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("ready file: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("ready file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("ready file: %w", err)
	}
	return nil
}
