package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/containernetworking/plugins/pkg/ns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/bpf"
)

// skLookupPin is the pin file name of a pod's sk_lookup link, next to
// where a tcx link would be.
const skLookupPin = "sk_lookup"

// attachSkLookup attaches the sk_lookup program to the pod's network
// namespace, or swaps this datapath's program into the link already there.
// Unless the pod is fresh (AddPod), it then registers the inbound listeners
// already open and settles the pod's device hook: the tc fallback if a
// listener cannot be registered (MPTCP), none otherwise (a switch from the
// tcx or tc mode leaves one, removed only now, so no connection slips
// through in between). A netns link attaches without the rtnl lock and
// without waiting for an RCU grace period, unlike a tcx link: about 0.06 ms
// against 12 ms.
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
	d.skMu.Lock()
	defer d.skMu.Unlock()
	d.skPods[p.NetnsCookie] = p
	if fresh {
		return nil
	}
	failed, err := d.registerListeners(p)
	switch {
	case err != nil:
		// Not a reason to refuse the pod (its outbound and same-node
		// redirection work); a device hook already there stays.
		d.opts.Logger.Warn("inbound listeners of the pod not registered for sk_lookup", zap.Uint64("netns_cookie", p.NetnsCookie), zap.Error(err))
		return nil
	case failed > 0:
		d.fallback(p)
		return nil
	}
	delete(d.fellBack, p.NetnsCookie)
	return d.removeDeviceHooks(p)
}

// fallback puts the tc program on the interface of a pod whose inbound
// listener sk_lookup cannot be handed (an MPTCP socket: the kernel keeps
// those out of sockmaps); tc looks listeners up by address. Failing that,
// connections from other nodes to the pod stay dropped, never passed to the
// app; the log and `meshlanectl check` say so. Called with skMu held.
func (d *Datapath) fallback(p Pod) {
	log := d.opts.Logger.With(zap.Uint64("netns_cookie", p.NetnsCookie), zap.Uint16("port", p.InboundPort), zap.String("hook", d.device))
	if err := d.attachDevice(p); err != nil {
		log.Error("the pod's inbound listener cannot be registered for sk_lookup (MPTCP?) and its tc fallback failed: connections from other nodes to the pod are dropped",
			zap.Error(err))
		return
	}
	d.fellBack[p.NetnsCookie] = true
	log.Info("the pod's inbound listener cannot be registered for sk_lookup (an MPTCP socket?): its interface got the tc program, which steers to it")
}

// healInterval is how often the datapath looks for meshed pods that lost
// their registered inbound listener: with SO_REUSEPORT only the last
// listener of the group to open is registered, and if it closes while the
// others stay open, connections from other nodes are dropped until a walk
// of the pod's sockets registers one of those. A look is a map lookup per
// pod.
const healInterval = 2 * time.Second

// watchListeners starts the two sk_lookup helpers: the reader of
// meshlane_unregistered, where sockops reports the inbound listeners it
// could not register (their pods get the tc fallback), and the periodic
// walk of the pods left without a registered listener.
func (d *Datapath) watchListeners() error {
	rd, err := ringbuf.NewReader(d.objs.MeshlaneUnregistered)
	if err != nil {
		return fmt.Errorf("datapath: read meshlane_unregistered: %w", err)
	}
	d.unregistered, d.skStop = rd, make(chan struct{})
	d.skWG.Add(2)
	go func() {
		defer d.skWG.Done()
		for {
			rec, err := rd.Read()
			if errors.Is(err, os.ErrClosed) {
				return
			}
			var k bpf.MeshlaneMlListenerKey
			if err == nil {
				_, err = binary.Decode(rec.RawSample, binary.NativeEndian, &k)
			}
			if err != nil {
				d.opts.Logger.Warn("unreadable record in meshlane_unregistered", zap.Error(err))
				continue
			}
			d.skMu.Lock()
			if p, ok := d.skPods[k.Netns]; ok {
				d.fallback(p)
			}
			d.skMu.Unlock()
		}
	}()
	go func() {
		defer d.skWG.Done()
		t := time.NewTicker(healInterval)
		defer t.Stop()
		for {
			select {
			case <-d.skStop:
				return
			case <-t.C:
				d.healListeners()
			}
		}
	}()
	return nil
}

// stopWatchingListeners ends what watchListeners started.
func (d *Datapath) stopWatchingListeners() error {
	if d.skStop == nil {
		return nil
	}
	close(d.skStop)
	err := d.unregistered.Close()
	d.skWG.Wait()
	d.skStop, d.unregistered = nil, nil
	return err
}

// healListeners walks the sockets of each pod that lost its registered
// inbound listener since the last look (a registered SO_REUSEPORT listener
// closed, or the sidecar restarts). A pod whose sidecar is not listening
// yet, or never did, costs a map lookup, not a walk: a walk covers the
// node's whole TCP hash tables (about 1 ms), and sockops registers the
// next listener that opens anyway. One pod at a time, so that a pod's DEL
// never waits for more than one walk.
func (d *Datapath) healListeners() {
	d.skMu.Lock()
	pods := make([]Pod, 0, len(d.skPods))
	for cookie, p := range d.skPods {
		if !d.fellBack[cookie] {
			pods = append(pods, p)
		}
	}
	d.skMu.Unlock()
	for _, p := range pods {
		ok, err := d.RegisteredListener(p)
		if err != nil {
			continue
		}
		d.skMu.Lock()
		_, still := d.skPods[p.NetnsCookie]
		lost := still && !ok && d.hadListener[p.NetnsCookie]
		if still {
			d.hadListener[p.NetnsCookie] = ok
		}
		if lost && !d.fellBack[p.NetnsCookie] {
			failed, err := d.registerListeners(p)
			if err == nil && failed > 0 {
				d.fallback(p)
			}
			if ok, err := d.RegisteredListener(p); err == nil {
				d.hadListener[p.NetnsCookie] = ok
			}
		}
		d.skMu.Unlock()
	}
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

// removeDeviceHooks removes what the tcx and tc modes, or sk_lookup's
// fallback, put on the pod's interface.
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
	return d.removeTCFilters(h, l, p.Interface.Name)
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
// sockops fills only as listeners open. failed counts the listeners the
// kernel refused (MPTCP). Called with skMu held, which also makes the
// iterator's runs (and its variables) one at a time.
func (d *Datapath) registerListeners(p Pod) (failed uint32, err error) {
	v := d.listeners.ListenersVariables
	for _, set := range []error{v.WantNetns.Set(p.NetnsCookie), v.WantPort.Set(p.InboundPort), v.Failed.Set(uint32(0))} {
		if set != nil {
			return 0, fmt.Errorf("datapath: set the listener iterator's pod: %w", set)
		}
	}
	it, err := link.AttachIter(link.IterOptions{Program: d.listeners.MeshlaneRegisterListeners})
	if err != nil {
		return 0, fmt.Errorf("datapath: attach the listener iterator: %w", err)
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
		return 0, fmt.Errorf("datapath: walk the listeners of pod netns %s: %w", p.Interface.Netns, err)
	}
	if err := v.Failed.Get(&failed); err != nil {
		return 0, fmt.Errorf("datapath: read the listener iterator's result: %w", err)
	}
	return failed, nil
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
// no inbound listener of the pod, and no tc fallback is on its interface.
var ErrListenerNotRegistered = errors.New("no inbound listener registered for sk_lookup")

// skLookupHook checks that the pod's sk_lookup link is pinned and attached
// to a network namespace, and that the sidecar's inbound listener is
// registered for it, or else that the tc fallback is on the interface.
func (d *Datapath) skLookupHook(p Pod) (string, error) {
	l, err := link.LoadPinnedLink(filepath.Join(d.opts.inboundDir(p.NetnsCookie), skLookupPin), nil)
	if err != nil {
		return "", fmt.Errorf("sk_lookup link of the pod netns: %w", err)
	}
	info, err := l.Info()
	l.Close()
	if err != nil {
		return "", fmt.Errorf("sk_lookup link of the pod netns: %w", err)
	}
	if n := info.NetNs(); n == nil || n.NetnsInode == 0 {
		return "", errors.New("sk_lookup link is pinned but attached to no network namespace")
	}
	ok, err := d.RegisteredListener(p)
	if err != nil {
		return "", err
	}
	if ok {
		return fmt.Sprintf("sk_lookup program on the pod's network namespace, inbound listener :%d registered", p.InboundPort), nil
	}
	if d.deviceHook(p) == nil {
		return fmt.Sprintf("sk_lookup program on the pod's network namespace; its inbound listener :%d cannot be registered (MPTCP?), "+
			"so the %s ingress program on %s steers to it", p.InboundPort, d.device, p.Interface.Name), nil
	}
	return "", fmt.Errorf("%w on port %d, and no tc fallback (the sidecar is not listening yet, or the fallback for an MPTCP listener failed: "+
		"see the agent's log): connections from other nodes to the pod are dropped", ErrListenerNotRegistered, p.InboundPort)
}
