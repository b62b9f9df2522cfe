package testenv

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
)

// Pod is a named network namespace plugged into a Bridge through a veth
// pair, addressed like a Kubernetes pod.
type Pod struct {
	// Name is the netns name; NetnsPath its bind-mounted file, what a
	// runtime hands to CNI plugins.
	Name      string
	NetnsPath string
	IPv4      netip.Addr // invalid for an IPv6-only pod
	IPv6      netip.Addr // invalid for an IPv4-only pod
	// NetnsCookie is SO_NETNS_COOKIE of the namespace.
	NetnsCookie uint64
	// HostVeth is the bridge side of the pod's veth pair.
	HostVeth string
}

// istioPassthrough6 is the address Istio puts on lo for IPv6 inbound
// passthrough (the sidecar connects to the app from it); 127.0.0.6 needs
// nothing since all of 127/8 is local.
var istioPassthrough6 = netip.MustParsePrefix("::6/128")

// CreatePod makes the pod netns named from label, wires eth0 to br with v4
// and/or v6 (either may be the zero Addr) and default routes via the
// bridge's gateways, brings up lo with ::6/128 and turns IPv6 duplicate
// address detection off. On error nothing is left behind.
func CreatePod(br *Bridge, label string, v4, v6 netip.Addr) (_ *Pod, err error) {
	if !v4.IsValid() && !v6.IsValid() {
		return nil, errors.New("pod needs an IPv4 or an IPv6 address")
	}
	if v4.IsValid() && !br.Prefix4.Contains(v4) {
		return nil, fmt.Errorf("pod address %s is not in bridge %s prefix %s", v4, br.Name, br.Prefix4)
	}
	if v6.IsValid() && !br.Prefix6.Contains(v6) {
		return nil, fmt.Errorf("pod address %s is not in bridge %s prefix %s", v6, br.Name, br.Prefix6)
	}
	name, err := objectName(label)
	if err != nil {
		return nil, err
	}
	path, err := createNamedNetns(name)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", label, err)
	}
	pod := &Pod{Name: name, NetnsPath: path, IPv4: v4, IPv6: v6, HostVeth: nextLinkName('h')}
	defer func() {
		if err != nil {
			err = errors.Join(fmt.Errorf("pod %s: %w", label, err), pod.Delete())
		}
	}()

	// Links made in the namespace copy "default"; eth0 then never runs DAD.
	err = InNetns(path, func() error {
		for _, k := range []string{"net/ipv6/conf/default/accept_dad", "net/ipv6/conf/all/accept_dad"} {
			if err := writeSysctl(k, "0"); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	peer, err := pod.plug(br)
	if err != nil {
		return nil, err
	}
	if err := pod.configure(br, peer); err != nil {
		return nil, err
	}
	if pod.NetnsCookie, err = NetnsCookie(path); err != nil {
		return nil, err
	}
	return pod, nil
}

// plug creates the veth pair with its pod end directly inside the netns and
// its host end on the bridge, and returns the pod end's name.
func (p *Pod) plug(br *Bridge) (string, error) {
	brLink, err := netlink.LinkByName(br.Name)
	if err != nil {
		return "", fmt.Errorf("find bridge %s: %w", br.Name, err)
	}
	ns, err := os.Open(p.NetnsPath)
	if err != nil {
		return "", fmt.Errorf("open netns: %w", err)
	}
	defer ns.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth, MasterIndex: brLink.Attrs().Index},
		PeerName:      nextLinkName('p'),
		PeerNamespace: netlink.NsFd(ns.Fd()),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("create veth %s: %w", p.HostVeth, err)
	}
	if err := writeSysctl("net/ipv6/conf/"+p.HostVeth+"/accept_dad", "0"); err != nil {
		return "", err
	}
	host, err := netlink.LinkByName(p.HostVeth)
	if err != nil {
		return "", fmt.Errorf("find veth %s: %w", p.HostVeth, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return "", fmt.Errorf("bring up veth %s: %w", p.HostVeth, err)
	}
	return veth.PeerName, nil
}

// configure names the pod end eth0 and sets addresses and routes, through
// a netlink handle whose sockets were opened inside the namespace.
func (p *Pod) configure(br *Bridge, peer string) error {
	var h *netlink.Handle
	err := InNetns(p.NetnsPath, func() error {
		var err error
		h, err = netlink.NewHandle()
		return err
	})
	if err != nil {
		return fmt.Errorf("netlink in pod netns: %w", err)
	}
	defer h.Close()

	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	if err := h.AddrAdd(lo, nlAddr(istioPassthrough6)); err != nil {
		return fmt.Errorf("add %s to lo: %w", istioPassthrough6, err)
	}
	eth, err := h.LinkByName(peer)
	if err != nil {
		return fmt.Errorf("find pod veth %s: %w", peer, err)
	}
	if err := h.LinkSetName(eth, "eth0"); err != nil {
		return fmt.Errorf("rename pod veth to eth0: %w", err)
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(p.IPv4, br.Prefix4.Bits()), netip.PrefixFrom(p.IPv6, br.Prefix6.Bits())} {
		if !a.Addr().IsValid() {
			continue
		}
		if err := h.AddrAdd(eth, nlAddr(a)); err != nil {
			return fmt.Errorf("add %s to eth0: %w", a, err)
		}
	}
	if err := h.LinkSetUp(eth); err != nil {
		return fmt.Errorf("bring up eth0: %w", err)
	}
	for _, r := range []struct {
		addr, gw netip.Addr
		dst      string
	}{{p.IPv4, br.Gateway4, "0.0.0.0/0"}, {p.IPv6, br.Gateway6, "::/0"}} {
		if !r.addr.IsValid() {
			continue
		}
		_, dst, _ := net.ParseCIDR(r.dst)
		route := &netlink.Route{LinkIndex: eth.Attrs().Index, Dst: dst, Gw: r.gw.AsSlice()}
		if err := h.RouteAdd(route); err != nil {
			return fmt.Errorf("add default route via %s: %w", r.gw, err)
		}
	}
	return nil
}

// Delete removes the veth pair and the netns file. Processes still inside
// keep the namespace alive but unnamed, so kill them first.
func (p *Pod) Delete() error {
	var errs []error
	if link, err := netlink.LinkByName(p.HostVeth); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete veth %s: %w", p.HostVeth, err))
		}
	} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
		errs = append(errs, fmt.Errorf("find veth %s: %w", p.HostVeth, err))
	}
	if err := deleteNamedNetns(p.NetnsPath); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete pod %s: %w", p.Name, err)
	}
	return nil
}

// NewPod creates a pod for the test (see CreatePod) and deletes it on
// cleanup.
func NewPod(t testing.TB, br *Bridge, label string, v4, v6 netip.Addr) *Pod {
	t.Helper()
	pod, err := CreatePod(br, label, v4, v6)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := pod.Delete(); err != nil {
			t.Error(err)
		}
	})
	return pod
}
