package datapath

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Inbound hook modes: how the program that steers connections from
// outside a pod to its inbound listener attaches: the tc program on the
// pod's interface, or the sk_lookup program on its network namespace.
const (
	// InboundAuto uses sk_lookup where the kernel has a TCP socket
	// iterator (Linux >= 5.9 with BTF), with the tc program as the
	// fallback for listeners sk_lookup cannot hold; else tcx where the
	// kernel has it (6.6), else tc. An empty mode means the same.
	InboundAuto = "auto"
	// InboundTCX attaches with tcx bpf links, pinned per pod so they
	// outlive the agent and take new programs in place.
	InboundTCX = "tcx"
	// InboundTC attaches classic tc filters on a clsact qdisc; they live as
	// long as the interface.
	InboundTC = "tc"
	// InboundSkLookup attaches the sk_lookup program to each meshed pod's
	// network namespace with a pinned netns link (Linux >= 5.9), without
	// the rtnl lock or a device: about 0.06 ms, where a tcx attach waits
	// for an RCU grace period. It hands connections to the listeners
	// registered in meshlane_listeners, which holds plain TCP sockets
	// only; a pod whose listener is an MPTCP socket gets the tc program on
	// its interface as well (the fallback).
	InboundSkLookup = "sk_lookup"
)

// PodInterface is the pod's interface as the CNI plugin reported it: the
// path of its network namespace and its name there.
type PodInterface struct {
	Netns string
	Name  string
}

// tcFilterPrio and tcFilterHandle name meshlane's classic tc filters, so a
// re-attach replaces them and a detach finds them among other filters.
const (
	tcFilterPrio   = 0xc1a0
	tcFilterHandle = 0x1
)

// legacyEgress names the egress hook of layout 3, whose programs rewrote
// every segment of a connection from outside the pod (its tcx pin, and its
// classic filter on the egress side). Layout 4 needs none: a re-attach
// removes it, which breaks the connections from other nodes that layout 3
// had rewritten and that are still open (a one-time cost of that upgrade).
const legacyEgress = "egress"

// inboundRoot holds one directory of pinned tcx links per pod; removing
// it detaches them all.
func inboundRoot(bpffs string) string { return filepath.Join(bpffs, "inbound") }

func (o Options) inboundDir(cookie uint64) string {
	return filepath.Join(inboundRoot(o.BPFFS), strconv.FormatUint(cookie, 10))
}

// ingressPin is the pin file name of a pod's tcx link, and ingressFilter
// the name of its classic filter.
const (
	ingressPin    = "ingress"
	ingressFilter = "meshlane_ingress"
)

// attachInbound puts the inbound steering program on the pod (the tc
// program on its interface, or sk_lookup on its netns), or swaps this
// datapath's program into the one already there (restart, upgrade).
// Without it a connection from another node reaches the app's port and
// skips the sidecar. fresh: see AddPod.
func (d *Datapath) attachInbound(p Pod, fresh bool) error {
	if p.Interface.Name == "" {
		return nil
	}
	if d.inbound == InboundSkLookup {
		return d.attachSkLookup(p, fresh)
	}
	if err := d.attachDevice(p); err != nil {
		return err
	}
	// After a switch from sk_lookup, once the device hook is in place.
	return d.removeSkLookup(p)
}

// attachDevice puts the tc program on the pod's interface the way this
// kernel allows (d.device): as the inbound hook in the tcx and tc modes, as
// the fallback for a listener sk_lookup cannot hold in sk_lookup mode.
func (d *Datapath) attachDevice(p Pod) error {
	if d.device == InboundTC {
		return d.attachTC(p)
	}
	return d.attachTCX(p)
}

// resolveInbound settles the hook mode at load, so that every pod of this
// datapath, its detach and its check use one mode, and how a tc program
// goes on an interface here (device: tcx or tc), for the tcx and tc modes
// and for sk_lookup's fallback. A tcx attach to an interface that does not
// exist tells the two kernels apart: ENODEV where tcx exists,
// ErrNotSupported where it does not.
func resolveInbound(mode string, prog *ebpf.Program) (inbound, device string, err error) {
	switch mode {
	case "", InboundAuto, InboundTCX, InboundSkLookup:
	case InboundTC:
		return InboundTC, InboundTC, nil
	default:
		return "", "", fmt.Errorf("datapath: unknown inbound hook mode %q: use %q, %q, %q or %q", mode, InboundAuto, InboundTCX, InboundTC, InboundSkLookup)
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: 1 << 30, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
	}
	device = InboundTCX
	if errors.Is(err, ebpf.ErrNotSupported) {
		device = InboundTC
	}
	switch {
	case wantsSkLookup(mode):
		return InboundSkLookup, device, nil
	case mode == InboundTCX && device != InboundTCX:
		return "", "", fmt.Errorf("datapath: this kernel has no tcx (Linux >= 6.6): start with --inbound-hooks tc or auto")
	}
	return device, device, nil
}

// wantsSkLookup says whether mode asks for sk_lookup (auto does), which
// the loader needs before it can probe the kernel for the rest.
func wantsSkLookup(mode string) bool {
	return mode == InboundSkLookup || mode == InboundAuto || mode == ""
}

// InboundMode is the hook mode in use: tcx, tc or sk_lookup.
func (d *Datapath) InboundMode() string { return d.inbound }

func (d *Datapath) attachTCX(p Pod) error {
	dir := d.opts.inboundDir(p.NetnsCookie)
	if err := os.Remove(filepath.Join(dir, legacyEgress)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("datapath: remove the layout 3 egress hook of pod %d: %w", p.NetnsCookie, err)
	}
	pin := filepath.Join(dir, ingressPin)
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		if l.Update(d.objs.MeshlaneTcIngress) == nil {
			return l.Close()
		}
		// The interface went away under the link: attach anew, which
		// fails clearly if the netns is gone too.
		err = l.Unpin()
		l.Close()
		if err != nil {
			return fmt.Errorf("datapath: unpin defunct tcx hook of pod %d: %w", p.NetnsCookie, err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("datapath: open pinned tcx hook of pod %d at %s: %w (remove it to re-attach)", p.NetnsCookie, pin, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("datapath: create pin directory %s: %w", dir, err)
	}
	// A tcx attach waits for an RCU grace period under the rtnl lock (the
	// kernel swaps the device's program array, then synchronize_rcu()):
	// about 12 ms on a 2-vCPU VM, added to a meshed pod's ADD. Classic tc
	// filters attach in 0.3 ms (docs/benchmarks.md, control path).
	err = inNetns(p.Interface, func(ifindex int) error {
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: d.objs.MeshlaneTcIngress, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("datapath: attach tcx ingress to %s: %w", p.Interface.Name, err)
		}
		err = l.Pin(pin)
		if cerr := l.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("datapath: pin tcx hook of pod %d: %w", p.NetnsCookie, err)
		}
		return nil
	})
	if err != nil {
		return errors.Join(err, os.RemoveAll(dir))
	}
	return nil
}

// inNetns runs fn inside the pod's network namespace with the interface's
// index there: a tcx attach resolves the index in the caller's namespace.
func inNetns(ifc PodInterface, fn func(ifindex int) error) error {
	err := ns.WithNetNSPath(ifc.Netns, func(ns.NetNS) error {
		i, err := net.InterfaceByName(ifc.Name)
		if err != nil {
			return fmt.Errorf("datapath: pod interface %s: %w", ifc.Name, err)
		}
		if err := ethernetOnly(ifc.Name, i.HardwareAddr); err != nil {
			return err
		}
		return fn(i.Index)
	})
	var nsErr ns.NSPathNotExistErr
	if errors.As(err, &nsErr) {
		return fmt.Errorf("datapath: pod netns %s is gone: %w", ifc.Netns, err)
	}
	return err
}

// ethernetOnly refuses an interface without an Ethernet header (an L3
// device: netkit in L3 mode, ipvlan L3, a tunnel): the programs read IP
// at the Ethernet header's end and would rewrite the wrong bytes there.
// Refusing fails the pod's ADD, rather than meshing it with its inbound
// from other nodes bypassing the sidecar.
func ethernetOnly(name string, mac net.HardwareAddr) error {
	if len(mac) != 6 {
		return fmt.Errorf("datapath: pod interface %s has no Ethernet header; meshlane's inbound tc program supports Ethernet pod interfaces (veth) only", name)
	}
	return nil
}

// tcHandle is a netlink handle inside the pod's network namespace.
func tcHandle(ifc PodInterface) (*netlink.Handle, netlink.Link, error) {
	nsh, err := netns.GetFromPath(ifc.Netns)
	if err != nil {
		return nil, nil, fmt.Errorf("datapath: open pod netns %s: %w", ifc.Netns, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, nil, fmt.Errorf("datapath: netlink in pod netns %s: %w", ifc.Netns, err)
	}
	l, err := h.LinkByName(ifc.Name)
	if err == nil {
		err = ethernetOnly(ifc.Name, l.Attrs().HardwareAddr)
	}
	if err != nil {
		h.Close()
		return nil, nil, fmt.Errorf("datapath: pod interface %s: %w", ifc.Name, err)
	}
	return h, l, nil
}

func (d *Datapath) attachTC(p Pod) error {
	h, l, err := tcHandle(p.Interface)
	if err != nil {
		return err
	}
	defer h.Close()
	idx := l.Attrs().Index
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := h.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("datapath: add clsact qdisc on %s: %w", p.Interface.Name, err)
	}
	f := tcFilter(idx, netlink.HANDLE_MIN_INGRESS)
	f.Fd, f.Name, f.DirectAction = d.objs.MeshlaneTcIngress.FD(), ingressFilter, true
	if err := h.FilterReplace(f); err != nil {
		return fmt.Errorf("datapath: add tc ingress filter on %s: %w", p.Interface.Name, err)
	}
	if err := h.FilterDel(tcFilter(idx, legacyEgressParent)); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("datapath: remove the layout 3 tc egress filter on %s: %w", p.Interface.Name, err)
	}
	return nil
}

// legacyEgressParent is the clsact side of layout 3's egress filter.
const legacyEgressParent = netlink.HANDLE_MIN_EGRESS

func tcFilter(ifindex int, parent uint32) *netlink.BpfFilter {
	return &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: ifindex, Parent: parent, Handle: tcFilterHandle,
		Priority: tcFilterPrio, Protocol: unix.ETH_P_ALL,
	}}
}

// removeTCFilters removes meshlane's classic filters from an interface:
// the ingress one, and layout 3's egress one if it is still there. An
// interface without a clsact qdisc has none (and the kernel answers a
// filter delete there with EINVAL, not ENOENT): in sk_lookup mode only a
// pod with the fallback has one.
func (d *Datapath) removeTCFilters(h *netlink.Handle, l netlink.Link, ifname string) error {
	qdiscs, err := h.QdiscList(l)
	if err != nil {
		return fmt.Errorf("datapath: list the qdiscs of %s: %w", ifname, err)
	}
	if !slices.ContainsFunc(qdiscs, func(q netlink.Qdisc) bool { return q.Type() == "clsact" }) {
		return nil
	}
	var errs []error
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, legacyEgressParent} {
		if err := h.FilterDel(tcFilter(l.Attrs().Index, parent)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("datapath: remove tc filter %x on %s: %w", parent, ifname, err))
		}
	}
	return errors.Join(errs...)
}

// detachInbound removes the pod's inbound hooks: its pinned tcx or
// sk_lookup link (the kernel detaches a link once its last pin and handle
// are gone) or its classic filter while the interface still exists. A pod
// whose netns is gone has lost its interface and its hooks with it.
func (d *Datapath) detachInbound(p Pod) error {
	if d.inbound == InboundSkLookup {
		// No fallback for this pod from here on.
		d.skMu.Lock()
		defer d.skMu.Unlock()
		delete(d.skPods, p.NetnsCookie)
		delete(d.fellBack, p.NetnsCookie)
		delete(d.hadListener, p.NetnsCookie)
	}
	err := os.RemoveAll(d.opts.inboundDir(p.NetnsCookie))
	if err != nil {
		err = fmt.Errorf("datapath: remove the inbound hooks of pod %d: %w", p.NetnsCookie, err)
	}
	// Classic filters: the tc mode's, or sk_lookup's fallback on a kernel
	// without tcx.
	if p.Interface.Name == "" || d.device != InboundTC {
		return err
	}
	h, l, herr := tcHandle(p.Interface)
	if herr != nil {
		return err // the netns or the interface is gone, and the filters with it
	}
	defer h.Close()
	return errors.Join(err, d.removeTCFilters(h, l, p.Interface.Name))
}

// removeLegacyInbound removes the classic tc filters of this datapath from
// every network namespace on the node. Unlike tcx links they have no pin to
// remove, and a filter left behind would keep its program, and with it the
// unpinned maps, steering connections to sidecars by stale rules.
func (d *Datapath) removeLegacyInbound() error {
	return removeTCFiltersUsing(d.objs.MeshlanePodips)
}

// mapID is the kernel's id of a map (meshlane_podips, or layout 3's
// meshlane_flows), by which meshlane's classic tc filters are told from
// another datapath's.
func mapID(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("datapath: read map info: %w", err)
	}
	id, _ := info.ID()
	return id, nil
}

// removeTCFiltersUsing deletes meshlane's classic tc filters whose program
// uses map m, so another meshlane datapath on the same kernel (a test's,
// another bpffs) keeps its own. Network namespaces are found where
// runtimes bind-mount them and through every process.
func removeTCFiltersUsing(m *ebpf.Map) error {
	id, err := mapID(m)
	if err != nil {
		return err
	}
	var errs []error
	seen := map[uint64]bool{}
	paths, _ := filepath.Glob("/run/netns/*")
	more, _ := filepath.Glob("/var/run/netns/*")
	procs, _ := filepath.Glob("/proc/[0-9]*/ns/net")
	for _, path := range append(append(paths, more...), procs...) {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil || seen[st.Ino] {
			continue
		}
		seen[st.Ino] = true
		if err := removeTCFiltersIn(path, id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func removeTCFiltersIn(path string, id ebpf.MapID) error {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return nil // the namespace went away meanwhile
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil
	}
	var errs []error
	for _, l := range links {
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := h.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range filters {
				bf, ok := f.(*netlink.BpfFilter)
				if !ok || bf.Priority != tcFilterPrio || !usesMap(bf.Id, id) {
					continue
				}
				if err := h.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("datapath: remove tc filter on %s in %s: %w", l.Attrs().Name, path, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

func usesMap(progID int, mapID ebpf.MapID) bool {
	prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(progID))
	if err != nil {
		return false
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		return false
	}
	ids, _ := info.MapIDs()
	for _, id := range ids {
		if id == mapID {
			return true
		}
	}
	return false
}

// removePinnedLegacyInbound is removeLegacyInbound for a datapath that is
// only pinned, found by its pinned maps of every layout (layout 3's egress
// program used meshlane_flows only).
func removePinnedLegacyInbound(bpffs string) error {
	return errors.Join(eachPinnedMap(bpffs, "meshlane_podips", removeTCFiltersUsing),
		eachPinnedMap(bpffs, "meshlane_flows", removeTCFiltersUsing))
}

// eachPinnedMap runs fn on the pinned map of this name of every layout.
func eachPinnedMap(bpffs, name string, fn func(*ebpf.Map) error) error {
	pins, err := filepath.Glob(filepath.Join(bpffs, "maps-v*", name))
	if err != nil {
		return err
	}
	var errs []error
	for _, pin := range pins {
		m, err := ebpf.LoadPinnedMap(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("datapath: open pinned map %s: %w", pin, err))
			continue
		}
		errs = append(errs, fn(m))
		m.Close()
	}
	return errors.Join(errs...)
}

// InboundHooks checks that the pod's inbound hook is in place: its pinned
// tcx link attached to an interface, its classic filter on it, or its
// sk_lookup link with the listener registered (or the tc fallback). It
// says what it found, or the error says what is missing.
func (d *Datapath) InboundHooks(p Pod) (string, error) {
	if p.Interface.Name == "" {
		return "", errors.New("no pod interface recorded: connections from other nodes are not redirected")
	}
	if d.inbound == InboundSkLookup {
		return d.skLookupHook(p)
	}
	if err := d.deviceHook(p); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s ingress program on %s", d.device, p.Interface.Name), nil
}

// deviceHook checks for the tc program on the pod's interface, put there
// the way d.device says.
func (d *Datapath) deviceHook(p Pod) error {
	if d.device == InboundTC {
		return d.tcFiltersPresent(p)
	}
	l, err := link.LoadPinnedLink(filepath.Join(d.opts.inboundDir(p.NetnsCookie), ingressPin), nil)
	if err != nil {
		return fmt.Errorf("tcx ingress link of %s: %w", p.Interface.Name, err)
	}
	info, err := l.Info()
	l.Close()
	if err != nil {
		return fmt.Errorf("tcx ingress link of %s: %w", p.Interface.Name, err)
	}
	if tcx := info.TCX(); tcx == nil || tcx.Ifindex == 0 {
		return fmt.Errorf("tcx ingress link of %s is pinned but attached to no interface", p.Interface.Name)
	}
	return nil
}

func (d *Datapath) tcFiltersPresent(p Pod) error {
	id, err := mapID(d.objs.MeshlanePodips)
	if err != nil {
		return err
	}
	h, l, err := tcHandle(p.Interface)
	if err != nil {
		return err
	}
	defer h.Close()
	filters, err := h.FilterList(l, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return fmt.Errorf("tc ingress filters of %s: %w", p.Interface.Name, err)
	}
	if !slices.ContainsFunc(filters, func(f netlink.Filter) bool {
		bf, ok := f.(*netlink.BpfFilter)
		return ok && bf.Priority == tcFilterPrio && usesMap(bf.Id, id)
	}) {
		return fmt.Errorf("no meshlane tc ingress filter on %s", p.Interface.Name)
	}
	return nil
}

// emptyMap deletes every key of m. An uninstall empties meshlane_podips
// this way before the grace period: the tc program finds no pod for a new
// connection and leaves it alone (the connect hooks are gone by then, and
// nothing else reads the map but sockops and the short-circuit).
func emptyMap(m *ebpf.Map) error {
	key := make([]byte, m.KeySize())
	var keys [][]byte
	it := m.Iterate()
	val := make([]byte, m.ValueSize())
	for it.Next(&key, &val) {
		keys = append(keys, slices.Clone(key))
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

func emptyPinnedPodIPs(bpffs string) error {
	return eachPinnedMap(bpffs, "meshlane_podips", emptyMap)
}
