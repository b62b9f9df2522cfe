package testenv

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Bridge is a Linux bridge in the host network namespace that pods plug
// into. Its first address in each prefix is the pods' gateway.
type Bridge struct {
	Name     string
	Prefix4  netip.Prefix // invalid when the bridge has no IPv4
	Prefix6  netip.Prefix // invalid when the bridge has no IPv6
	Gateway4 netip.Addr
	Gateway6 netip.Addr
}

// Test subnets: IPv4 from 198.18.0.0/15 (RFC 2544, set aside for network
// benchmarks, so never a real destination), IPv6 from a ULA /48.
var (
	testNet4 = netip.MustParsePrefix("198.18.0.0/15")
	testNet6 = netip.MustParsePrefix("fd00:6d6c:6e00::/48")
)

// FreeSubnets picks a random /24 and /64 from the test ranges that no
// address on this host overlaps, so parallel runs get their own subnets.
func FreeSubnets() (v4, v6 netip.Prefix, err error) {
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return v4, v6, fmt.Errorf("list host addresses: %w", err)
	}
	inUse := func(p netip.Prefix) bool {
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			ones, _ := a.Mask.Size()
			if p.Overlaps(netip.PrefixFrom(ip.Unmap(), ones)) {
				return true
			}
		}
		return false
	}
	for range 64 {
		var r [4]byte
		if _, err := rand.Read(r[:]); err != nil {
			return v4, v6, fmt.Errorf("random subnet: %w", err)
		}
		b4 := testNet4.Addr().As4()
		b4[1] |= r[0] & 1 // 198.18 or 198.19
		b4[2] = r[1]
		b6 := testNet6.Addr().As16()
		binary.BigEndian.PutUint16(b6[6:8], binary.BigEndian.Uint16(r[2:4]))
		v4 = netip.PrefixFrom(netip.AddrFrom4(b4), 24)
		v6 = netip.PrefixFrom(netip.AddrFrom16(b6), 64)
		if !inUse(v4) && !inUse(v6) {
			return v4, v6, nil
		}
	}
	return netip.Prefix{}, netip.Prefix{}, errors.New("no free test subnet after 64 tries: remove leftover test bridges (ip -br addr | grep 198.1[89])")
}

// Addr returns the n-th address of each prefix (1 is the gateway), invalid
// for a family the bridge lacks.
func (b *Bridge) Addr(n int) (v4, v6 netip.Addr) {
	return nthAddr(b.Prefix4, n), nthAddr(b.Prefix6, n)
}

func nthAddr(p netip.Prefix, n int) netip.Addr {
	if !p.IsValid() {
		return netip.Addr{}
	}
	a := p.Masked().Addr()
	for range n {
		a = a.Next()
	}
	return a
}

// CreateBridge makes a bridge named from label (at most 6 characters, the
// run prefix makes it unique) with the gateway addresses of v4 and v6
// (either may be the zero Prefix for a single-stack bridge), and brings it
// up. IPv6 duplicate address detection is off so addresses work at once.
func CreateBridge(label string, v4, v6 netip.Prefix) (_ *Bridge, err error) {
	if len(label) > 6 || !labelRE.MatchString(label) {
		return nil, fmt.Errorf("bridge label %q: use 1-6 characters a-z, 0-9 and - (link names have 15 at most)", label)
	}
	if v4.IsValid() && (!v4.Addr().Is4() || v4.Bits() > 30) {
		return nil, fmt.Errorf("bridge IPv4 prefix %s: want an IPv4 prefix of /30 or wider", v4)
	}
	if v6.IsValid() && (!v6.Addr().Is6() || v6.Addr().Is4In6() || v6.Bits() > 126) {
		return nil, fmt.Errorf("bridge IPv6 prefix %s: want an IPv6 prefix of /126 or wider", v6)
	}
	if !v4.IsValid() && !v6.IsValid() {
		return nil, errors.New("bridge needs an IPv4 or an IPv6 prefix")
	}
	br := &Bridge{Name: linkRunPrefix() + "b" + label, Prefix4: v4.Masked(), Prefix6: v6.Masked()}
	br.Gateway4, br.Gateway6 = br.Addr(1)

	link := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: br.Name}}
	if err := netlink.LinkAdd(link); err != nil {
		return nil, fmt.Errorf("create bridge %s: %w", br.Name, err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, br.Delete())
		}
	}()
	if v6.IsValid() {
		if err := writeSysctl(filepath.Join("net/ipv6/conf", br.Name, "accept_dad"), "0"); err != nil {
			return nil, err
		}
	}
	for _, gw := range []netip.Prefix{netip.PrefixFrom(br.Gateway4, v4.Bits()), netip.PrefixFrom(br.Gateway6, v6.Bits())} {
		if !gw.Addr().IsValid() {
			continue
		}
		if err := netlink.AddrAdd(link, nlAddr(gw)); err != nil {
			return nil, fmt.Errorf("add %s to bridge %s: %w", gw, br.Name, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("bring up bridge %s: %w", br.Name, err)
	}
	return br, nil
}

// Delete removes the bridge; a bridge already gone is fine.
func (b *Bridge) Delete() error {
	link, err := netlink.LinkByName(b.Name)
	if err != nil {
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			return nil
		}
		return fmt.Errorf("find bridge %s: %w", b.Name, err)
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("delete bridge %s: %w", b.Name, err)
	}
	return nil
}

// NewBridge creates a bridge for the test (see CreateBridge) and deletes it
// on cleanup.
func NewBridge(t testing.TB, label string, v4, v6 netip.Prefix) *Bridge {
	t.Helper()
	br, err := CreateBridge(label, v4, v6)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := br.Delete(); err != nil {
			t.Error(err)
		}
	})
	return br
}

// nlAddr is p as a netlink address; IPv6 ones skip duplicate address
// detection (IFA_F_NODAD) so they are usable at once.
func nlAddr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{IPNet: &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

// writeSysctl writes /proc/sys/<key> for the calling thread's network
// namespace.
func writeSysctl(key, value string) error {
	if err := os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// LinkName returns a fresh interface name carrying this run's ID, for a
// link that something else creates (the CNI bridge plugin's bridge), so
// Leftovers still finds it if it is not removed.
func LinkName() string { return nextLinkName('x') }

// DeleteLink removes a network interface by name; a missing one is fine.
func DeleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := netlink.LinkDel(l); err != nil {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

// retryDump runs a netlink dump again while it comes back interrupted,
// which happens when links or addresses change meanwhile (other tests,
// other processes on the machine).
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	out, err := dump()
	for try := 0; errors.Is(err, netlink.ErrDumpInterrupted) && try < 10; try++ {
		time.Sleep(20 * time.Millisecond)
		out, err = dump()
	}
	return out, err
}
