package datapath

import "net/netip"

// Pod is what the datapath needs to know about one meshed pod on this node.
// The agent builds it from the CNI report and the mesh profile; the loader
// writes it into the pinned maps.
type Pod struct {
	// NetnsCookie identifies the pod's network namespace (SO_NETNS_COOKIE).
	NetnsCookie uint64
	// IPs are the pod's addresses (IPv4 and/or IPv6).
	IPs []netip.Addr
	// Interface is where the tc program goes that steers connections from
	// outside the pod to the inbound listener. Without it (zero value),
	// only the connect hooks redirect.
	Interface PodInterface
	// Cgroup is the pod's cgroup v2 directory, where the cgroup programs
	// go in pod scope (ScopePod); node scope ignores it.
	Cgroup string

	// ProxyUID and ProxyGID identify the sidecar's own processes: their
	// connections are never sent to the pod's outbound listener.
	ProxyUID uint32
	ProxyGID uint32

	// OutboundPort is the sidecar's outbound listener (on loopback).
	OutboundPort uint16
	// InboundPort is the sidecar's inbound listener (on the pod IP).
	InboundPort uint16

	// Inbound: a connection to podIP:port goes to InboundPort when
	// InboundAll is set (Istio "*") or port is in InboundInclude, and port
	// is not in InboundExclude (exclusion wins). The profile's own proxy
	// ports are part of InboundExclude.
	InboundAll     bool
	InboundInclude []uint16
	InboundExclude []uint16

	// Outbound: an app connection goes to OutboundPort unless its port is
	// in OutboundExcludePorts; a port in OutboundIncludePorts is redirected
	// whatever the address; otherwise the address must fall in
	// OutboundIncludeCIDRs (or OutboundAllCIDRs, Istio "*") and not in
	// OutboundExcludeCIDRs.
	OutboundExcludePorts []uint16
	OutboundIncludePorts []uint16
	OutboundAllCIDRs     bool
	OutboundIncludeCIDRs []netip.Prefix
	OutboundExcludeCIDRs []netip.Prefix

	// DNSCapture sends the apps' DNS (UDP and TCP port 53 to any
	// non-loopback address) to the sidecar's DNS proxy on loopback port
	// DNSPort; replies appear to come from the resolver asked.
	DNSCapture bool
	DNSPort    uint16

	// ProxyLoopbackInbound sends the proxy's connections to a loopback
	// address other than 127.0.0.1/::1 to its own inbound listener, as
	// istio-iptables does (Istio's validation init container checks it).
	ProxyLoopbackInbound bool
}
