package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/meshlane/meshlane/bpf"
)

// Read-only views of the loaded datapath for the agent's status and debug
// endpoints. None of them writes a map.

// LinkInfo is one attached program.
type LinkInfo struct {
	// Name is the hook: connect4, connect6, sockops, getsockopt, sk_msg.
	Name string
	// LinkID is the bpf link's id; 0 when the program is attached without
	// a link (sk_msg on kernels before 6.10).
	LinkID uint32
	// ProgramID is the id of the program running in the hook, as
	// `bpftool prog show id N` lists it.
	ProgramID uint32
	// Pin is the link's pin file, empty without a link.
	Pin string
	// Error says why the ids could not be read.
	Error string
}

// Feature is an optional kernel capability and whether this node has it.
type Feature struct {
	Name      string
	Available bool
	Detail    string
}

// Info describes the running datapath.
type Info struct {
	CgroupPath string
	// Scope is ScopeNode or ScopePod.
	Scope   string
	BPFFS   string
	MapsDir string
	Sockmap bool
	// Inbound is how the tc program sits on pod interfaces: tcx or tc.
	Inbound  string
	Links    []LinkInfo
	Features []Feature
}

// Info reports where the datapath is attached and pinned, the ids of its
// links and programs, and the optional kernel features it found.
func (d *Datapath) Info() Info {
	info := Info{
		CgroupPath: d.opts.CgroupPath,
		Scope:      d.opts.Scope,
		BPFFS:      d.opts.BPFFS,
		MapsDir:    d.opts.mapsDir(),
		Sockmap:    d.opts.Sockmap,
		Inbound:    d.InboundMode(),
	}
	for _, name := range []string{linkConnect4, linkConnect6, linkSendmsg4, linkSendmsg6, linkRecvmsg4, linkRecvmsg6, linkSockops, linkGetsockopt, linkSkMsg} {
		l, ok := d.links[name]
		if !ok {
			if name == linkSkMsg && d.opts.Sockmap {
				info.Links = append(info.Links, skMsgWithoutLink(d.objs.MeshlaneSkMsg))
			}
			continue
		}
		li := LinkInfo{Name: name, Pin: filepath.Join(d.opts.linksDir(), name)}
		if i, err := l.Info(); err != nil {
			li.Error = err.Error()
		} else {
			li.LinkID, li.ProgramID = uint32(i.ID), uint32(i.Program)
		}
		info.Links = append(info.Links, li)
	}

	info.Features = append(info.Features, Feature{
		Name: "cgroup connect/getsockopt, sockops, sk_msg, socket storage, netns cookies (Linux >= 5.15)", Available: true,
		Detail: "required: probed at load",
	})
	if d.opts.Sockmap {
		_, linked := d.links[linkSkMsg]
		f := Feature{Name: "sk_msg bpf link (Linux >= 6.10)", Available: linked, Detail: "sk_msg attached with a pinned, updatable link"}
		if !linked {
			f.Detail = "sk_msg attached to the pinned sockhash directly; it stays while the sockhash is pinned"
		}
		info.Features = append(info.Features, f)
	}
	tcx := Feature{Name: "tcx links for the inbound tc program (Linux >= 6.6)", Available: true,
		Detail: "in use: pinned per pod under " + inboundRoot(d.opts.BPFFS)}
	switch info.Inbound {
	case InboundTC:
		tcx.Available = false
		tcx.Detail = "not in use (no tcx on this kernel, or --inbound-hooks tc): a classic clsact filter carries the same program; uninstall finds it by walking the network namespaces"
	case InboundSkLookup:
		tcx.Detail = "the fallback for pods whose inbound listener sk_lookup cannot hold (MPTCP), pinned per pod under " + inboundRoot(d.opts.BPFFS)
		if d.device != InboundTCX {
			tcx.Available = false
			tcx.Detail = "not on this kernel: the fallback for pods whose inbound listener sk_lookup cannot hold (MPTCP) is a classic clsact filter"
		}
		info.Features = append(info.Features, Feature{Name: "sk_lookup links on pod network namespaces, TCP listener iterator (Linux >= 5.9 with BTF)",
			Available: true, Detail: "in use: pinned per pod under " + inboundRoot(d.opts.BPFFS)})
	}
	info.Features = append(info.Features, tcx)
	f := Feature{Name: "connections view (socket storage iterator, Linux >= 5.9 with BTF)", Available: true, Detail: "meshlanectl conns works"}
	if err := connsSupported(); err != nil {
		f.Available, f.Detail = false, err.Error()
	}
	info.Features = append(info.Features, f)
	return info
}

func skMsgWithoutLink(p *ebpf.Program) LinkInfo {
	li := LinkInfo{Name: linkSkMsg}
	pi, err := p.Info()
	if err != nil {
		li.Error = err.Error()
		return li
	}
	if id, ok := pi.ID(); ok {
		li.ProgramID = uint32(id)
	}
	return li
}

// ReadPod returns the pod with netns cookie netns as the maps hold it: its
// settings from meshlane_pods, its rules from meshlane_ports and
// meshlane_cidrs, and as IPs the addresses in meshlane_podips that point at
// it. Lists are sorted. found is false when meshlane_pods has no entry;
// the rules and IPs are still returned, since leftovers are what a
// self-check looks for.
func (d *Datapath) ReadPod(netns uint64) (p Pod, found bool, err error) {
	p.NetnsCookie = netns
	var v bpf.MeshlaneMlPod
	switch err := d.objs.MeshlanePods.Lookup(netns, &v); {
	case err == nil:
		found = true
		p.ProxyUID, p.ProxyGID = v.ProxyUid, v.ProxyGid
		p.OutboundPort, p.InboundPort = v.OutboundPort, v.InboundPort
		p.InboundAll = v.Flags&uint32(bpf.MeshlaneMlPodFlagsML_POD_INBOUND_ALL) != 0
		p.OutboundAllCIDRs = v.Flags&uint32(bpf.MeshlaneMlPodFlagsML_POD_OUTBOUND_ALL_CIDRS) != 0
		p.ProxyLoopbackInbound = v.Flags&uint32(bpf.MeshlaneMlPodFlagsML_POD_PROXY_LOOPBACK_INBOUND) != 0
		if v.Flags&uint32(bpf.MeshlaneMlPodFlagsML_POD_DNS_CAPTURE) != 0 {
			p.DNSCapture, p.DNSPort = true, v.DnsPort
		}
	case errors.Is(err, ebpf.ErrKeyNotExist):
	default:
		return Pod{}, false, fmt.Errorf("datapath: read meshlane_pods: %w", err)
	}

	var (
		addr  bpf.MeshlaneMlAddr
		owner uint64
	)
	it := d.objs.MeshlanePodips.Iterate()
	for it.Next(&addr, &owner) {
		if owner == netns {
			p.IPs = append(p.IPs, addrFromML(addr))
		}
	}
	if err := it.Err(); err != nil {
		return Pod{}, false, fmt.Errorf("datapath: read meshlane_podips: %w", err)
	}
	slices.SortFunc(p.IPs, netip.Addr.Compare)

	var (
		pk    bpf.MeshlaneMlPortKey
		flags uint32
	)
	it = d.objs.MeshlanePorts.Iterate()
	for it.Next(&pk, &flags) {
		if pk.Netns != netns {
			continue
		}
		inc, exc := flags&uint32(bpf.MeshlaneMlPortFlagsML_PORT_INCLUDE) != 0, flags&uint32(bpf.MeshlaneMlPortFlagsML_PORT_EXCLUDE) != 0
		switch bpf.MeshlaneMlPortDir(pk.Dir) {
		case bpf.MeshlaneMlPortDirML_DIR_INBOUND:
			appendIf(&p.InboundInclude, inc, pk.Port)
			appendIf(&p.InboundExclude, exc, pk.Port)
		case bpf.MeshlaneMlPortDirML_DIR_OUTBOUND:
			appendIf(&p.OutboundIncludePorts, inc, pk.Port)
			appendIf(&p.OutboundExcludePorts, exc, pk.Port)
		}
	}
	if err := it.Err(); err != nil {
		return Pod{}, false, fmt.Errorf("datapath: read meshlane_ports: %w", err)
	}
	for _, l := range [][]uint16{p.InboundInclude, p.InboundExclude, p.OutboundIncludePorts, p.OutboundExcludePorts} {
		slices.Sort(l)
	}

	var ck bpf.MeshlaneMlCidrKey
	it = d.objs.MeshlaneCidrs.Iterate()
	for it.Next(&ck, &flags) {
		if ck.Netns != netns {
			continue
		}
		pfx := prefixFromKey(ck)
		switch bpf.MeshlaneMlCidrKind(ck.Kind) {
		case bpf.MeshlaneMlCidrKindML_CIDR_INCLUDE:
			p.OutboundIncludeCIDRs = append(p.OutboundIncludeCIDRs, pfx)
		case bpf.MeshlaneMlCidrKindML_CIDR_EXCLUDE:
			p.OutboundExcludeCIDRs = append(p.OutboundExcludeCIDRs, pfx)
		}
	}
	if err := it.Err(); err != nil {
		return Pod{}, false, fmt.Errorf("datapath: read meshlane_cidrs: %w", err)
	}
	slices.SortFunc(p.OutboundIncludeCIDRs, netip.Prefix.Compare)
	slices.SortFunc(p.OutboundExcludeCIDRs, netip.Prefix.Compare)
	return p, found, nil
}

func appendIf(l *[]uint16, ok bool, port uint16) {
	if ok {
		*l = append(*l, port)
	}
}

// prefixFromKey undoes cidrKey.
func prefixFromKey(k bpf.MeshlaneMlCidrKey) netip.Prefix {
	a := addrFromML(k.Addr)
	bits := int(k.Prefixlen) - 32 - 64
	if a.Is4() {
		bits -= 96
	}
	return netip.PrefixFrom(a, bits)
}

// PodIPOwner returns the netns cookie meshlane_podips maps ip to.
func (d *Datapath) PodIPOwner(ip netip.Addr) (netns uint64, found bool, err error) {
	err = d.objs.MeshlanePodips.Lookup(mlAddr(ip), &netns)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("datapath: read meshlane_podips: %w", err)
	}
	return netns, true, nil
}
