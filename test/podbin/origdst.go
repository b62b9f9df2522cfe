package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h;
// x/sys/unix has the IPv4 constant only. Both are 80.
const ip6tSoOriginalDst = 80

// Sizes of struct sockaddr_in and struct sockaddr_in6.
const (
	sizeofSockaddrIn  = 16
	sizeofSockaddrIn6 = 28
)

// originalDst asks the kernel (conntrack, or a cgroup getsockopt BPF program)
// where the accepted connection c was headed before it was redirected to us,
// the way a mesh proxy does.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("raw socket: %w", err)
	}
	var dst netip.AddrPort
	var derr error
	if err := rc.Control(func(fd uintptr) { dst, derr = originalDstFD(int(fd)) }); err != nil {
		return netip.AddrPort{}, fmt.Errorf("raw socket: %w", err)
	}
	return dst, derr
}

// originalDstFD picks the getsockopt level from the socket's family. An
// AF_INET6 socket carrying a v4-mapped connection (a dual-stack listener)
// is asked at SOL_IP first, as Envoy does, and at SOL_IPV6 if that fails.
func originalDstFD(fd int) (netip.AddrPort, error) {
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt(SO_DOMAIN): %w", err)
	}
	switch domain {
	case unix.AF_INET:
		return queryOriginalDst(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, sizeofSockaddrIn, "SOL_IP, SO_ORIGINAL_DST")
	case unix.AF_INET6:
		if v4mapped(fd) {
			dst, err4 := queryOriginalDst(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, sizeofSockaddrIn, "SOL_IP, SO_ORIGINAL_DST")
			if err4 == nil {
				return dst, nil
			}
			dst, err6 := queryOriginalDst(fd, unix.SOL_IPV6, ip6tSoOriginalDst, sizeofSockaddrIn6, "SOL_IPV6, IP6T_SO_ORIGINAL_DST")
			if err6 == nil {
				return dst, nil
			}
			return netip.AddrPort{}, errors.Join(err4, err6)
		}
		return queryOriginalDst(fd, unix.SOL_IPV6, ip6tSoOriginalDst, sizeofSockaddrIn6, "SOL_IPV6, IP6T_SO_ORIGINAL_DST")
	default:
		return netip.AddrPort{}, fmt.Errorf("socket family %d has no original destination", domain)
	}
}

// v4mapped reports whether the socket's local address is ::ffff:a.b.c.d.
func v4mapped(fd int) bool {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return false
	}
	sa6, ok := sa.(*unix.SockaddrInet6)
	return ok && netip.AddrFrom16(sa6.Addr).Is4In6()
}

func queryOriginalDst(fd, level, opt, size int, what string) (netip.AddrPort, error) {
	b, err := getsockoptBytes(fd, level, opt, size)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt(%s): %w", what, err)
	}
	dst, err := decodeSockaddr(b)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt(%s): %w", what, err)
	}
	return dst, nil
}

// getsockoptBytes is a raw getsockopt into a buffer of size bytes; it returns
// the part the kernel (or a BPF program) says it filled.
func getsockoptBytes(fd, level, opt, size int) ([]byte, error) {
	buf := make([]byte, size)
	n := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	if errno != 0 {
		return nil, errno
	}
	if int(n) > size {
		return nil, fmt.Errorf("kernel reported %d bytes for a %d byte buffer", n, size)
	}
	return buf[:n], nil
}

// decodeSockaddr reads a struct sockaddr_in or sockaddr_in6: family in host
// byte order, port in network byte order, then the address (after the
// 4-byte flowinfo for IPv6). An unspecified address or port 0 is refused:
// dialing it would be a bug in whatever answered, not a destination.
func decodeSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("sockaddr of %d bytes has no family", len(b))
	}
	var addr netip.Addr
	switch family := binary.NativeEndian.Uint16(b); family {
	case unix.AF_INET:
		if len(b) < 8 {
			return netip.AddrPort{}, fmt.Errorf("sockaddr_in of %d bytes, need at least 8", len(b))
		}
		addr = netip.AddrFrom4([4]byte(b[4:8]))
	case unix.AF_INET6:
		if len(b) < 24 {
			return netip.AddrPort{}, fmt.Errorf("sockaddr_in6 of %d bytes, need at least 24", len(b))
		}
		addr = netip.AddrFrom16([16]byte(b[8:24]))
	default:
		return netip.AddrPort{}, fmt.Errorf("sockaddr family %d is neither AF_INET nor AF_INET6", family)
	}
	port := binary.BigEndian.Uint16(b[2:4])
	if addr.IsUnspecified() || port == 0 {
		return netip.AddrPort{}, fmt.Errorf("original destination %s is unspecified", netip.AddrPortFrom(addr, port))
	}
	return netip.AddrPortFrom(addr, port), nil
}
