package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/meshlane/meshlane/bpf"
)

// podKeys are the map keys written for one pod.
type podKeys struct {
	ips   map[bpf.MeshlaneMlAddr]struct{}
	ports map[bpf.MeshlaneMlPortKey]struct{}
	cidrs map[bpf.MeshlaneMlCidrKey]struct{}
}

func newPodKeys() *podKeys {
	return &podKeys{
		ips:   map[bpf.MeshlaneMlAddr]struct{}{},
		ports: map[bpf.MeshlaneMlPortKey]struct{}{},
		cidrs: map[bpf.MeshlaneMlCidrKey]struct{}{},
	}
}

// mlAddr turns an address into the map form: 16 bytes in network order,
// IPv4 as IPv4-mapped IPv6.
func mlAddr(a netip.Addr) bpf.MeshlaneMlAddr {
	b := a.As16()
	var m bpf.MeshlaneMlAddr
	for i := range m.W {
		m.W[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return m
}

func addrFromML(m bpf.MeshlaneMlAddr) netip.Addr {
	var b [16]byte
	for i, w := range m.W {
		binary.NativeEndian.PutUint32(b[i*4:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}

// cidrKey is the LPM key of prefix p in a pod's list: kind and netns are
// matched in full, then the address prefix (IPv4 as part of ::ffff:0:0/96).
func cidrKey(netns uint64, kind bpf.MeshlaneMlCidrKind, p netip.Prefix) bpf.MeshlaneMlCidrKey {
	p = p.Masked()
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return bpf.MeshlaneMlCidrKey{
		Prefixlen: uint32(32 + 64 + bits),
		Kind:      uint32(kind),
		Netns:     netns,
		Addr:      mlAddr(p.Addr()),
	}
}

func (p Pod) validate() error {
	if p.NetnsCookie == 0 {
		return errors.New("datapath: pod has no netns cookie")
	}
	if len(p.IPs) == 0 {
		return errors.New("datapath: pod has no IP")
	}
	if p.OutboundPort == 0 || p.InboundPort == 0 {
		return errors.New("datapath: pod has no sidecar outbound or inbound port")
	}
	if p.DNSCapture && p.DNSPort == 0 {
		return errors.New("datapath: pod captures DNS but has no DNS proxy port")
	}
	for _, ip := range p.IPs {
		if !ip.IsValid() {
			return errors.New("datapath: pod has an invalid IP")
		}
	}
	for _, c := range append(append([]netip.Prefix{}, p.OutboundIncludeCIDRs...), p.OutboundExcludeCIDRs...) {
		if !c.IsValid() {
			return fmt.Errorf("datapath: invalid CIDR %v", c)
		}
	}
	return nil
}

func (p Pod) keys() *podKeys {
	k := newPodKeys()
	for _, ip := range p.IPs {
		k.ips[mlAddr(ip)] = struct{}{}
	}
	for _, port := range p.InboundInclude {
		k.ports[bpf.MeshlaneMlPortKey{Netns: p.NetnsCookie, Port: port, Dir: uint16(bpf.MeshlaneMlPortDirML_DIR_INBOUND)}] = struct{}{}
	}
	for _, port := range p.InboundExclude {
		k.ports[bpf.MeshlaneMlPortKey{Netns: p.NetnsCookie, Port: port, Dir: uint16(bpf.MeshlaneMlPortDirML_DIR_INBOUND)}] = struct{}{}
	}
	for _, port := range p.OutboundIncludePorts {
		k.ports[bpf.MeshlaneMlPortKey{Netns: p.NetnsCookie, Port: port, Dir: uint16(bpf.MeshlaneMlPortDirML_DIR_OUTBOUND)}] = struct{}{}
	}
	for _, port := range p.OutboundExcludePorts {
		k.ports[bpf.MeshlaneMlPortKey{Netns: p.NetnsCookie, Port: port, Dir: uint16(bpf.MeshlaneMlPortDirML_DIR_OUTBOUND)}] = struct{}{}
	}
	for _, c := range p.OutboundIncludeCIDRs {
		k.cidrs[cidrKey(p.NetnsCookie, bpf.MeshlaneMlCidrKindML_CIDR_INCLUDE, c)] = struct{}{}
	}
	for _, c := range p.OutboundExcludeCIDRs {
		k.cidrs[cidrKey(p.NetnsCookie, bpf.MeshlaneMlCidrKindML_CIDR_EXCLUDE, c)] = struct{}{}
	}
	return k
}

// portFlags is the value for one port key: a port may be both included and
// excluded, and exclusion wins in the program.
func (p Pod) portFlags() map[bpf.MeshlaneMlPortKey]uint32 {
	out := map[bpf.MeshlaneMlPortKey]uint32{}
	add := func(ports []uint16, dir bpf.MeshlaneMlPortDir, f bpf.MeshlaneMlPortFlags) {
		for _, port := range ports {
			out[bpf.MeshlaneMlPortKey{Netns: p.NetnsCookie, Port: port, Dir: uint16(dir)}] |= uint32(f)
		}
	}
	add(p.InboundInclude, bpf.MeshlaneMlPortDirML_DIR_INBOUND, bpf.MeshlaneMlPortFlagsML_PORT_INCLUDE)
	add(p.InboundExclude, bpf.MeshlaneMlPortDirML_DIR_INBOUND, bpf.MeshlaneMlPortFlagsML_PORT_EXCLUDE)
	add(p.OutboundIncludePorts, bpf.MeshlaneMlPortDirML_DIR_OUTBOUND, bpf.MeshlaneMlPortFlagsML_PORT_INCLUDE)
	add(p.OutboundExcludePorts, bpf.MeshlaneMlPortDirML_DIR_OUTBOUND, bpf.MeshlaneMlPortFlagsML_PORT_EXCLUDE)
	return out
}

func (p Pod) value() bpf.MeshlaneMlPod {
	v := bpf.MeshlaneMlPod{
		ProxyUid:     p.ProxyUID,
		ProxyGid:     p.ProxyGID,
		OutboundPort: p.OutboundPort,
		InboundPort:  p.InboundPort,
	}
	if p.InboundAll {
		v.Flags |= uint32(bpf.MeshlaneMlPodFlagsML_POD_INBOUND_ALL)
	}
	if p.OutboundAllCIDRs {
		v.Flags |= uint32(bpf.MeshlaneMlPodFlagsML_POD_OUTBOUND_ALL_CIDRS)
	}
	if p.ProxyLoopbackInbound {
		v.Flags |= uint32(bpf.MeshlaneMlPodFlagsML_POD_PROXY_LOOPBACK_INBOUND)
	}
	if p.DNSCapture {
		v.Flags |= uint32(bpf.MeshlaneMlPodFlagsML_POD_DNS_CAPTURE)
		v.DnsPort = p.DNSPort
	}
	// Which rule maps hold entries for the pod, so the programs look up
	// only those.
	for _, r := range []struct {
		has  bool
		flag bpf.MeshlaneMlPodFlags
	}{
		{len(p.OutboundIncludePorts)+len(p.OutboundExcludePorts) > 0, bpf.MeshlaneMlPodFlagsML_POD_OUT_PORT_RULES},
		{len(p.InboundInclude)+len(p.InboundExclude) > 0, bpf.MeshlaneMlPodFlagsML_POD_IN_PORT_RULES},
		{len(p.OutboundExcludeCIDRs) > 0, bpf.MeshlaneMlPodFlagsML_POD_OUT_CIDR_EXCLUDES},
		{len(p.OutboundIncludeCIDRs) > 0, bpf.MeshlaneMlPodFlagsML_POD_OUT_CIDR_INCLUDES},
	} {
		if r.has {
			v.Flags |= uint32(r.flag)
		}
	}
	return v
}

// UpsertPod writes a meshed pod, or replaces what was written for it, then
// attaches the tc program to its interface and, in pod scope, the cgroup
// programs to its cgroup (which read the maps, so they come second). Rules are written before the pod's own entry and stale
// rules removed after it, so a concurrent connect() sees either the old
// settings or the new ones, never a pod without its exclusions. A full map
// is an error naming it. A new pod whose hooks cannot be attached is taken
// out of the maps again: half a pod would send the node's own connections
// through the sidecar and other nodes' around it.
func (d *Datapath) UpsertPod(p Pod) error { return d.upsertPod(p, false) }

// AddPod is UpsertPod for a pod whose sandbox the runtime has just made (a
// CNI ADD): none of its containers runs yet, so nothing listens in its
// network namespace and no hook of another mode is on its interface.
// UpsertPod's catch-up for those, after a restart or for a pod meshed
// late, is skipped: in sk_lookup mode a walk of the node's TCP sockets for
// open inbound listeners (about 1 ms) and a look for tc hooks.
func (d *Datapath) AddPod(p Pod) error { return d.upsertPod(p, true) }

func (d *Datapath) upsertPod(p Pod, fresh bool) error {
	if err := p.validate(); err != nil {
		return err
	}
	isNew, err := d.upsertMaps(p)
	if err != nil {
		return err
	}
	if err := errors.Join(d.attachInbound(p, fresh), d.attachPodCgroup(p)); err != nil {
		if isNew {
			err = errors.Join(err, d.DeletePod(p))
		}
		return err
	}
	return nil
}

func (d *Datapath) upsertMaps(p Pod) (isNew bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()

	old := d.written[p.NetnsCookie]
	if old == nil {
		old, isNew = newPodKeys(), true
	}
	want := p.keys()
	defer func() {
		if err != nil {
			// Take back what this call added, so a refused pod leaves no
			// orphan rules behind (the previous version stays in force).
			err = errors.Join(err, d.deleteStale(p.NetnsCookie, want, old))
		}
	}()
	for k, f := range p.portFlags() {
		if err := d.objs.MeshlanePorts.Update(k, f, ebpf.UpdateAny); err != nil {
			return isNew, mapErr("meshlane_ports", err)
		}
	}
	for k := range want.cidrs {
		if err := d.objs.MeshlaneCidrs.Update(k, uint32(1), ebpf.UpdateAny); err != nil {
			return isNew, mapErr("meshlane_cidrs", err)
		}
	}
	for k := range want.ips {
		if err := d.objs.MeshlanePodips.Update(k, p.NetnsCookie, ebpf.UpdateAny); err != nil {
			return isNew, mapErr("meshlane_podips", err)
		}
	}
	if err := d.objs.MeshlanePods.Update(p.NetnsCookie, p.value(), ebpf.UpdateAny); err != nil {
		return isNew, mapErr("meshlane_pods", err)
	}
	d.written[p.NetnsCookie] = want
	return isNew, d.deleteStale(p.NetnsCookie, old, want)
}

// DeletePod removes the pod's cgroup and tc programs, then every map entry
// of the pod. Deleting a pod that is not there is not an error: DEL must be
// idempotent.
func (d *Datapath) DeletePod(p Pod) error {
	if err := errors.Join(d.detachPodCgroup(p), d.detachInbound(p), d.forgetListeners(p)); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()

	if err := d.objs.MeshlanePods.Delete(p.NetnsCookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return mapErr("meshlane_pods", err)
	}
	old := d.written[p.NetnsCookie]
	if old == nil {
		old = newPodKeys()
	}
	// Also the IPs the caller names, in case they were written by an agent
	// whose record is gone.
	for _, ip := range p.IPs {
		old.ips[mlAddr(ip)] = struct{}{}
	}
	if err := d.deleteStale(p.NetnsCookie, old, newPodKeys()); err != nil {
		return err
	}
	delete(d.written, p.NetnsCookie)
	return nil
}

// deleteStale removes the keys in old that are not in want. An IP is only
// removed while it still points at this pod: a new pod may have it already.
func (d *Datapath) deleteStale(netns uint64, old, want *podKeys) error {
	for k := range old.ips {
		if _, ok := want.ips[k]; ok {
			continue
		}
		var owner uint64
		if err := d.objs.MeshlanePodips.Lookup(k, &owner); err == nil && owner == netns {
			if err := d.objs.MeshlanePodips.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return mapErr("meshlane_podips", err)
			}
		}
	}
	for k := range old.ports {
		if _, ok := want.ports[k]; ok {
			continue
		}
		if err := d.objs.MeshlanePorts.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return mapErr("meshlane_ports", err)
		}
	}
	for k := range old.cidrs {
		if _, ok := want.cidrs[k]; ok {
			continue
		}
		if err := d.objs.MeshlaneCidrs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return mapErr("meshlane_cidrs", err)
		}
	}
	return nil
}

func mapErr(name string, err error) error {
	if errors.Is(err, errE2BIG) {
		return fmt.Errorf("datapath: map %s is full: %w (raise its capacity or remove pods)", name, err)
	}
	return fmt.Errorf("datapath: write %s: %w", name, err)
}

// loadWritten rebuilds the per-pod key sets from the pinned maps, so that
// after a restart updates and deletes still remove exactly the stale keys.
func (d *Datapath) loadWritten() error {
	d.written = map[uint64]*podKeys{}
	get := func(netns uint64) *podKeys {
		if d.written[netns] == nil {
			d.written[netns] = newPodKeys()
		}
		return d.written[netns]
	}
	var (
		netns uint64
		pod   bpf.MeshlaneMlPod
	)
	it := d.objs.MeshlanePods.Iterate()
	for it.Next(&netns, &pod) {
		get(netns)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("datapath: read pinned pods: %w", err)
	}
	var addr bpf.MeshlaneMlAddr
	it = d.objs.MeshlanePodips.Iterate()
	for it.Next(&addr, &netns) {
		get(netns).ips[addr] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("datapath: read pinned pod IPs: %w", err)
	}
	var (
		pk    bpf.MeshlaneMlPortKey
		flags uint32
	)
	it = d.objs.MeshlanePorts.Iterate()
	for it.Next(&pk, &flags) {
		get(pk.Netns).ports[pk] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("datapath: read pinned port rules: %w", err)
	}
	var ck bpf.MeshlaneMlCidrKey
	it = d.objs.MeshlaneCidrs.Iterate()
	for it.Next(&ck, &flags) {
		get(ck.Netns).cidrs[ck] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("datapath: read pinned CIDR rules: %w", err)
	}
	return nil
}
