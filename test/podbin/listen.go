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

// listenAll opens one TCP listener per address. IPv6 listeners are
// IPV6_V6ONLY so that 0.0.0.0:P and [::]:P can be bound side by side as two
// sockets, the way Envoy binds them; dualstack instead leaves IPv6 sockets
// open to v4-mapped peers (a single [::]:P for both families).
func listenAll(addrs []netip.AddrPort, dualstack bool) ([]*net.TCPListener, error) {
	var lns []*net.TCPListener
	for _, ap := range addrs {
		ln, err := listenOne(ap, dualstack)
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

func listenOne(ap netip.AddrPort, dualstack bool) (*net.TCPListener, error) {
	network := "tcp4"
	lc := net.ListenConfig{}
	if ap.Addr().Is6() {
		network = "tcp6"
		v6only := 1
		if dualstack {
			v6only = 0
		}
		lc.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only)
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("setsockopt(IPV6_V6ONLY=%d): %w", v6only, serr)
			}
			return nil
		}
	}
	ln, err := lc.Listen(context.Background(), network, ap.String())
	if err != nil {
		if dualstack && errors.Is(err, unix.EADDRINUSE) {
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
