package datapath

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/bpf"
)

// skLookupPin is the pin file name of a pod's sk_lookup link, next to
// where a tcx link would be.
const skLookupPin = "sk_lookup"

// attachSkLookup attaches the sk_lookup program to the pod's network
// namespace, or swaps this datapath's program into the link already there;
// unless the pod is fresh (AddPod), it then removes the device hooks of the
// other modes and registers the inbound listeners already open. A netns
// link attaches without the rtnl lock and without waiting for an RCU grace
// period, unlike a tcx link: about 0.06 ms against 12 ms.
func (d *Datapath) attachSkLookup(p Pod, fresh bool) error {
	dir := d.opts.inboundDir(p.NetnsCookie)
	pin := filepath.Join(dir, skLookupPin)
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		err = l.Update(d.objs.MeshlaneSkLookup)
		l.Close()
		if err != nil {
			// The netns is gone under the link, or the link is defunct:
			// attach anew, which fails clearly if the netns is gone.
			if err := os.Remove(pin); err != nil {
				return fmt.Errorf("datapath: unpin defunct sk_lookup hook of pod %d: %w", p.NetnsCookie, err)
			}
			return d.attachSkLookup(p, fresh)
		}
	case errors.Is(err, os.ErrNotExist):
		if err := d.newSkLookupLink(p, dir, pin); err != nil {
			return err
		}
	default:
		return fmt.Errorf("datapath: open pinned sk_lookup hook of pod %d at %s: %w (remove it to re-attach)", p.NetnsCookie, pin, err)
	}
	if fresh {
		return nil
	}
	if err := d.removeDeviceHooks(p); err != nil {
		return err
	}
	// Not a reason to refuse the pod: its outbound and same-node
	// redirection work, `meshlanectl check` names the missing listener.
	if err := d.registerListeners(p); err != nil {
		d.opts.Logger.Warn("inbound listener not registered for sk_lookup", zap.Uint64("netns_cookie", p.NetnsCookie), zap.Error(err))
	}
	return nil
}

func (d *Datapath) newSkLookupLink(p Pod, dir, pin string) error {
	nsf, err := os.Open(p.Interface.Netns)
	if err != nil {
		return fmt.Errorf("datapath: pod netns %s is gone: %w", p.Interface.Netns, err)
	}
	defer nsf.Close()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("datapath: create pin directory %s: %w", dir, err)
	}
	l, err := link.AttachNetNs(int(nsf.Fd()), d.objs.MeshlaneSkLookup)
	if err != nil {
		return fmt.Errorf("datapath: attach sk_lookup to pod netns %s: %w", p.Interface.Netns, err)
	}
	err = l.Pin(pin)
	if cerr := l.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("datapath: pin sk_lookup hook of pod %d: %w", p.NetnsCookie, err)
	}
	return nil
}

// removeDeviceHooks removes what tcx and tc modes put on the pod's
// interface, after a switch to sk_lookup: the new hook is in place first,
// so no connection slips through between the two.
func (d *Datapath) removeDeviceHooks(p Pod) error {
	dir := d.opts.inboundDir(p.NetnsCookie)
	for _, name := range []string{ingressPin, legacyEgress} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("datapath: remove the tcx hook %s of pod %d: %w", name, p.NetnsCookie, err)
		}
	}
	if p.Interface.Name == "" {
		return nil
	}
	h, l, err := tcHandle(p.Interface)
	if err != nil {
		return nil // no such interface (any more), so no filter on it
	}
	defer h.Close()
	qdiscs, err := h.QdiscList(l)
	if err != nil {
		return fmt.Errorf("datapath: list the qdiscs of %s: %w", p.Interface.Name, err)
	}
	if !slices.ContainsFunc(qdiscs, func(q netlink.Qdisc) bool { return q.Type() == "clsact" }) {
		return nil // no clsact qdisc, so no classic filter
	}
	return d.removeTCFilters(h, l.Attrs().Index, p.Interface.Name)
}

// removeSkLookup removes the pod's sk_lookup link after a switch to a
// device hook mode, once that hook is in place.
func (d *Datapath) removeSkLookup(p Pod) error {
	err := os.Remove(filepath.Join(d.opts.inboundDir(p.NetnsCookie), skLookupPin))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("datapath: remove the sk_lookup hook of pod %d: %w", p.NetnsCookie, err)
	}
	return nil
}

// ErrListenersUnsupported means the kernel cannot walk TCP sockets with a
// BPF iterator (Linux >= 5.9 with kernel BTF): listeners open before a pod
// was meshed cannot be registered for sk_lookup.
var ErrListenersUnsupported = errors.New("this kernel has no BPF iterator over TCP sockets (needs Linux >= 5.9 with kernel BTF, CONFIG_DEBUG_INFO_BTF)")

// registerListeners walks the TCP sockets of the pod's network namespace
// and puts its open inbound listeners into meshlane_listeners, which
// sockops fills only as listeners open. A listener the kernel cannot hold
// in a sockhash (MPTCP) is logged: sk_lookup drops the connections from
// other nodes that it would have taken.
func (d *Datapath) registerListeners(p Pod) error {
	d.listenersMu.Lock()
	defer d.listenersMu.Unlock()
	v := d.listeners.ListenersVariables
	for _, set := range []error{v.WantNetns.Set(p.NetnsCookie), v.WantPort.Set(p.InboundPort),
		v.Registered.Set(uint32(0)), v.Failed.Set(uint32(0))} {
		if set != nil {
			return fmt.Errorf("datapath: set the listener iterator's pod: %w", set)
		}
	}
	it, err := link.AttachIter(link.IterOptions{Program: d.listeners.MeshlaneRegisterListeners})
	if err != nil {
		return fmt.Errorf("datapath: attach the listener iterator: %w", err)
	}
	defer it.Close()
	// A TCP iterator walks the network namespace of the task that opens
	// it.
	err = ns.WithNetNSPath(p.Interface.Netns, func(ns.NetNS) error {
		rd, err := it.Open()
		if err != nil {
			return err
		}
		defer rd.Close()
		_, err = io.Copy(io.Discard, rd)
		return err
	})
	if err != nil {
		return fmt.Errorf("datapath: walk the listeners of pod netns %s: %w", p.Interface.Netns, err)
	}
	var failed uint32
	if err := v.Failed.Get(&failed); err != nil {
		return fmt.Errorf("datapath: read the listener iterator's result: %w", err)
	}
	if failed > 0 {
		return fmt.Errorf("datapath: %d inbound listener(s) on port %d of pod %d cannot be registered for sk_lookup "+
			"(an MPTCP socket? Go >= 1.24 listens with MPTCP by default): connections from other nodes to the pod are dropped; "+
			"have the sidecar listen with plain TCP or run the agent with --inbound-hooks tcx or tc",
			failed, p.InboundPort, p.NetnsCookie)
	}
	return nil
}

// loadListeners loads the iterator with the datapath's meshlane_listeners
// in place of its own.
func loadListeners(m *ebpf.Map) (*bpf.ListenersObjects, error) {
	spec, err := bpf.LoadListeners()
	if err != nil {
		return nil, fmt.Errorf("datapath: read the embedded listener iterator: %w", err)
	}
	var opts ebpf.CollectionOptions
	if m != nil {
		opts.MapReplacements = map[string]*ebpf.Map{bpf.ListenersMapMeshlaneListeners: m}
	}
	objs := new(bpf.ListenersObjects)
	err = spec.LoadAndAssign(objs, &opts)
	if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, btf.ErrNotSupported) || errors.Is(err, btf.ErrNotFound) {
		return nil, fmt.Errorf("datapath: %w: %v", ErrListenersUnsupported, err)
	}
	if err != nil {
		return nil, fmt.Errorf("datapath: load the listener iterator: %w", err)
	}
	return objs, nil
}

// listenerKeys are the meshlane_listeners keys a pod's inbound listeners
// can have.
func listenerKeys(p Pod) []bpf.MeshlaneMlListenerKey {
	return []bpf.MeshlaneMlListenerKey{
		{Netns: p.NetnsCookie, Port: p.InboundPort, Family: unix.AF_INET},
		{Netns: p.NetnsCookie, Port: p.InboundPort, Family: unix.AF_INET6},
	}
}

// RegisteredListener says whether a listener of the pod's inbound port is
// in meshlane_listeners, where sk_lookup finds it.
func (d *Datapath) RegisteredListener(p Pod) (bool, error) {
	for _, k := range listenerKeys(p) {
		var cookie uint64
		err := d.objs.MeshlaneListeners.Lookup(&k, &cookie)
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return false, mapErr("meshlane_listeners", err)
		}
	}
	return false, nil
}

// forgetListeners removes the pod's entries from meshlane_listeners; a
// closed listener leaves on its own, this is for a pod that stops being
// meshed while its sidecar still listens.
func (d *Datapath) forgetListeners(p Pod) error {
	var errs []error
	for _, k := range listenerKeys(p) {
		if err := d.objs.MeshlaneListeners.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, mapErr("meshlane_listeners", err))
		}
	}
	return errors.Join(errs...)
}

// ErrListenerNotRegistered: in sk_lookup mode, meshlane_listeners holds
// no inbound listener of the pod.
var ErrListenerNotRegistered = errors.New("no inbound listener registered for sk_lookup")

// skLookupHook checks that the pod's sk_lookup link is pinned and attached
// to a network namespace, and that the sidecar's inbound listener is
// registered for it.
func (d *Datapath) skLookupHook(p Pod) error {
	l, err := link.LoadPinnedLink(filepath.Join(d.opts.inboundDir(p.NetnsCookie), skLookupPin), nil)
	if err != nil {
		return fmt.Errorf("sk_lookup link of the pod netns: %w", err)
	}
	info, err := l.Info()
	l.Close()
	if err != nil {
		return fmt.Errorf("sk_lookup link of the pod netns: %w", err)
	}
	if n := info.NetNs(); n == nil || n.NetnsInode == 0 {
		return errors.New("sk_lookup link is pinned but attached to no network namespace")
	}
	ok, err := d.RegisteredListener(p)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w on port %d (the sidecar is not listening yet, or listens with MPTCP, which cannot be registered): "+
			"connections from other nodes to the pod are dropped", ErrListenerNotRegistered, p.InboundPort)
	}
	return nil
}
