package main

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// sockaddrIn builds a struct sockaddr_in the way the kernel lays it out.
func sockaddrIn(family uint16, port uint16, addr []byte, size int) []byte {
	b := make([]byte, size)
	binary.NativeEndian.PutUint16(b[0:2], family)
	binary.BigEndian.PutUint16(b[2:4], port)
	if family == unix.AF_INET6 {
		binary.NativeEndian.PutUint32(b[4:8], 0xdeadbeef) // flowinfo, ignored
		copy(b[8:24], addr)
		binary.NativeEndian.PutUint32(b[24:28], 7) // scope id, ignored
	} else {
		copy(b[4:8], addr)
	}
	return b
}

func TestDecodeSockaddr(t *testing.T) {
	v6 := netip.MustParseAddr("fd00:6d6c::1234").As16()
	mapped := netip.MustParseAddr("::ffff:10.1.2.3").As16()
	tests := []struct {
		name    string
		in      []byte
		want    string
		wantErr string
	}{
		{"ipv4", sockaddrIn(unix.AF_INET, 8080, []byte{10, 1, 2, 3}, 16), "10.1.2.3:8080", ""},
		{"ipv4 high port byte order", sockaddrIn(unix.AF_INET, 0xabcd, []byte{192, 0, 2, 1}, 16), "192.0.2.1:43981", ""},
		{"ipv4 without padding", sockaddrIn(unix.AF_INET, 80, []byte{1, 2, 3, 4}, 16)[:8], "1.2.3.4:80", ""},
		{"ipv6", sockaddrIn(unix.AF_INET6, 443, v6[:], 28), "[fd00:6d6c::1234]:443", ""},
		{"ipv6 v4-mapped", sockaddrIn(unix.AF_INET6, 9, mapped[:], 28), "[::ffff:10.1.2.3]:9", ""},
		{"empty", nil, "", "no family"},
		{"short ipv4", sockaddrIn(unix.AF_INET, 80, []byte{1, 2, 3, 4}, 16)[:7], "", "need at least 8"},
		{"short ipv6", sockaddrIn(unix.AF_INET6, 80, v6[:], 28)[:23], "", "need at least 24"},
		{"unknown family", sockaddrIn(unix.AF_UNIX, 80, []byte{1, 2, 3, 4}, 16), "", "neither AF_INET nor AF_INET6"},
		{"unspecified ipv4", sockaddrIn(unix.AF_INET, 80, []byte{0, 0, 0, 0}, 16), "", "unspecified"},
		{"port zero", sockaddrIn(unix.AF_INET, 0, []byte{1, 2, 3, 4}, 16), "", "unspecified"},
		{"unspecified ipv6", sockaddrIn(unix.AF_INET6, 80, make([]byte, 16), 28), "", "unspecified"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decodeSockaddr(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("decodeSockaddr() = %v, %v; want error containing %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got.String() != tc.want {
				t.Fatalf("decodeSockaddr() = %v, %v; want %s", got, err, tc.want)
			}
		})
	}
}

// TestOriginalDstWithoutRedirect asks a real loopback socket that nothing
// redirected: the kernel must refuse (no conntrack NAT entry, no BPF
// program), at the level matching the socket's family.
func TestOriginalDstWithoutRedirect(t *testing.T) {
	for _, tc := range []struct{ addr, level string }{
		{"127.0.0.1:0", "SOL_IP,"},
		{"[::1]:0", "SOL_IPV6,"},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			lns, err := listenAll([]netip.AddrPort{netip.MustParseAddrPort(tc.addr)}, listenOpts{})
			if err != nil {
				t.Skipf("no loopback for this family here: %v", err)
			}
			ln := lns[0]
			defer ln.Close()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			a, err := ln.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			dst, err := originalDst(a)
			if err == nil {
				t.Fatalf("originalDst() = %v on a connection nothing redirected; want an error", dst)
			}
			if !strings.Contains(err.Error(), tc.level) {
				t.Fatalf("originalDst() error %q does not name %s", err, tc.level)
			}
		})
	}
}

// TestOriginalDstV4MappedTriesBothLevels: a v4 client on a dual-stack IPv6
// listener is asked at SOL_IP first, then at SOL_IPV6.
func TestOriginalDstV4MappedTriesBothLevels(t *testing.T) {
	lns, err := listenAll([]netip.AddrPort{netip.MustParseAddrPort("[::]:0")}, listenOpts{dualstack: true})
	if err != nil {
		t.Skipf("no IPv6 here: %v", err)
	}
	ln := lns[0]
	defer ln.Close()
	_, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp4", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	_, err = originalDst(a)
	if err == nil {
		t.Fatal("originalDst() succeeded on a connection nothing redirected")
	}
	msg := err.Error()
	i4, i6 := strings.Index(msg, "SOL_IP,"), strings.Index(msg, "SOL_IPV6,")
	if i4 < 0 || i6 < 0 || i4 > i6 {
		t.Fatalf("originalDst() error %q: want SOL_IP tried, then SOL_IPV6", msg)
	}
}

func TestListenAllSeparateFamilies(t *testing.T) {
	// Two sockets on the same port, one per family, need IPV6_V6ONLY on
	// the IPv6 one.
	probe, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := probe.Addr().(*net.TCPAddr).Port
	probe.Close()
	addrs, err := parseAddrPorts("0.0.0.0:" + strconv.Itoa(port) + ", [::]:" + strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	lns, err := listenAll(addrs, listenOpts{})
	if err != nil {
		t.Fatalf("listenAll(%v): %v", addrs, err)
	}
	for _, ln := range lns {
		ln.Close()
	}
	if len(lns) != 2 {
		t.Fatalf("got %d listeners, want 2", len(lns))
	}
	if _, err := parseAddrPorts("1.2.3.4"); err == nil {
		t.Fatal("parseAddrPorts accepted an address without port")
	}
}
