// Package datapath loads meshlane's eBPF programs, pins their maps and links
// under a bpffs directory so they outlive the agent, attaches them to a
// cgroup v2 with bpf links (which coexist with other programs on the same
// cgroup), and writes pods into the maps.
package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/bpf"
)

// DefaultBPFFS is where the agent pins its state on a node.
const DefaultBPFFS = "/sys/fs/bpf/meshlane"

// LayoutVersion names the pinned maps' directory. Bump it whenever a map's
// key or value layout changes in bpf/meshlane.c: pinned maps are only checked
// for type and sizes on reuse, never for the meaning of their bytes, so a new
// layout must never open an old pin. TestLayoutVersion guards it. Every
// entry can be rebuilt by the agent (pods) or lives on a socket (original
// destinations, sockhash), so an upgrade to a new layout loses no
// connection once it is established; version 3's connections from other
// nodes, which tc rewrote packet by packet, are the exception (see
// legacyEgress).
const LayoutVersion = 7

// Options configure Load.
type Options struct {
	// BPFFS is the pin directory on a bpf filesystem (DefaultBPFFS).
	BPFFS string
	// CgroupPath is the cgroup v2 directory the programs attach to in node
	// scope; every process below it is covered.
	CgroupPath string
	// Scope is ScopeNode (one attachment, at CgroupPath) or ScopePod (one
	// per meshed pod, at Pod.Cgroup).
	Scope string
	// Sockmap turns on the sockops/sk_msg short-circuit.
	Sockmap bool
	// Inbound is how the inbound steering program attaches to meshed
	// pods: InboundAuto (tcx where the kernel has it), InboundTCX,
	// InboundTC (on the pod's interface) or InboundSkLookup (on its
	// network namespace).
	Inbound string
	// Logger may be nil.
	Logger *zap.Logger
}

// Datapath is the loaded, attached and pinned datapath.
type Datapath struct {
	opts  Options
	objs  bpf.MeshlaneObjects
	links map[string]link.Link

	// mu serializes pod writes; written remembers, per netns cookie, the
	// keys written for that pod so an update or delete removes exactly the
	// stale ones. It is rebuilt from the pinned maps at load.
	mu      sync.Mutex
	written map[uint64]*podKeys

	counterNames []string

	// inbound is the hook mode settled at load: InboundTCX, InboundTC or
	// InboundSkLookup; device is how the tc program goes on an interface
	// on this kernel (InboundTCX or InboundTC), in sk_lookup mode for the
	// pods whose listener it cannot hold.
	inbound, device string

	// In sk_lookup mode: listeners is the listener iterator; skMu
	// serializes what follows a pod's link (the listener walk, the
	// fallback, the detach) with watchListeners' goroutines; skPods are
	// the pods with an sk_lookup link, fellBack those of them with the tc
	// fallback, hadListener those whose inbound listener was registered
	// at the last look (healListeners); unregistered, skStop and skWG run
	// watchListeners, from Attach on.
	listeners    *bpf.ListenersObjects
	skMu         sync.Mutex
	skPods       map[uint64]Pod
	fellBack     map[uint64]bool
	hadListener  map[uint64]bool
	unregistered *ringbuf.Reader
	skStop       chan struct{}
	skWG         sync.WaitGroup
}

// Link names, also their pin file names.
const (
	linkConnect4   = "connect4"
	linkConnect6   = "connect6"
	linkSockops    = "sockops"
	linkGetsockopt = "getsockopt"
	linkSkMsg      = "sk_msg"
	linkSendmsg4   = "sendmsg4"
	linkSendmsg6   = "sendmsg6"
	linkRecvmsg4   = "recvmsg4"
	linkRecvmsg6   = "recvmsg6"
)

func (o Options) mapsDir() string {
	return filepath.Join(o.BPFFS, fmt.Sprintf("maps-v%d", LayoutVersion))
}

func (o Options) linksDir() string { return filepath.Join(o.BPFFS, "links") }

// Load is LoadDetached followed by Attach, for callers with no pods to
// restore first.
func Load(opts Options) (*Datapath, error) {
	d, err := LoadDetached(opts)
	if err != nil {
		return nil, err
	}
	if err := d.Attach(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// LoadDetached probes the kernel and loads the programs and maps, reusing
// pinned maps of the same layout (so a restart keeps every pod and
// connection record), without touching what is attached. An agent restores
// its pods into the maps before it calls Attach: after an upgrade that
// changed a map layout the new maps start empty, and swapping the new
// programs in before they are filled would stop redirection for a moment.
func LoadDetached(opts Options) (*Datapath, error) {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.BPFFS == "" {
		opts.BPFFS = DefaultBPFFS
	}
	if err := checkScope(opts.Scope); err != nil {
		return nil, err
	}
	if opts.Scope == "" {
		opts.Scope = ScopeNode
	}
	if opts.Scope == ScopeNode && opts.CgroupPath == "" {
		return nil, errors.New("datapath: no cgroup path given: pass the cgroup v2 directory to attach to (e.g. the cgroup2 mount root)")
	}
	if err := CheckKernel(); err != nil {
		return nil, err
	}
	if err := checkBPFFS(filepath.Dir(filepath.Clean(opts.BPFFS))); err != nil {
		return nil, err
	}
	for _, dir := range []string{opts.mapsDir(), opts.linksDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("datapath: create pin directory %s: %w", dir, err)
		}
	}

	spec, err := bpf.LoadMeshlane()
	if err != nil {
		return nil, fmt.Errorf("datapath: read embedded programs: %w", err)
	}
	if err := spec.Variables["page_size"].Set(uint32(os.Getpagesize())); err != nil {
		return nil, fmt.Errorf("datapath: set page_size: %w", err)
	}
	if err := spec.Variables["enable_sockmap"].Set(boolByte(opts.Sockmap)); err != nil {
		return nil, fmt.Errorf("datapath: set enable_sockmap: %w", err)
	}
	if err := spec.Variables["register_listeners"].Set(boolByte(wantsSkLookup(opts.Inbound))); err != nil {
		return nil, fmt.Errorf("datapath: set register_listeners: %w", err)
	}
	for name, m := range spec.Maps {
		if name == ".rodata" {
			continue
		}
		m.Pinning = ebpf.PinByName
	}
	names, err := counterNames(spec)
	if err != nil {
		return nil, err
	}

	d := &Datapath{opts: opts, links: map[string]link.Link{}, counterNames: names,
		skPods: map[uint64]Pod{}, fellBack: map[uint64]bool{}, hadListener: map[uint64]bool{}}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: opts.mapsDir()},
	})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("datapath: the kernel's verifier rejected a program (kernel too old or unsupported?): %+v", ve)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("datapath: a pinned map under %s has another layout: %w (remove the directory with `meshlane-agent uninstall` or bump LayoutVersion)", opts.mapsDir(), err)
		}
		return nil, fmt.Errorf("datapath: load programs: %w", err)
	}
	if d.inbound, d.device, err = resolveInbound(opts.Inbound, d.objs.MeshlaneTcIngress); err != nil {
		d.Close()
		return nil, err
	}
	switch d.inbound {
	case InboundTC:
		opts.Logger.Info("inbound hooks: classic tc filters (this kernel has no tcx, or --inbound-hooks tc)")
	case InboundSkLookup:
		// Loaded now, so that a kernel without it fails the start (or
		// turns auto to the tc program), not the first pod meshed late.
		if d.listeners, err = loadListeners(d.objs.MeshlaneListeners); err != nil {
			if opts.Inbound == InboundSkLookup {
				d.Close()
				return nil, fmt.Errorf("%w (--inbound-hooks sk_lookup needs it: run with auto, tcx or tc)", err)
			}
			opts.Logger.Warn("inbound hooks: no sk_lookup without a TCP socket iterator; the tc program goes on each meshed pod's interface",
				zap.String("hook", d.device), zap.Error(err))
			d.inbound = d.device
			break
		}
		opts.Logger.Info("inbound hooks: sk_lookup on each meshed pod's network namespace, the tc program where a listener cannot be registered",
			zap.String("fallback", d.device))
	}
	// Listeners registered by an agent in sk_lookup mode keep a psock
	// each for nothing in the other modes: release them.
	if d.inbound != InboundSkLookup {
		if err := emptyMap(d.objs.MeshlaneListeners); err != nil {
			d.Close()
			return nil, fmt.Errorf("datapath: empty meshlane_listeners: %w", err)
		}
	}
	if err := d.loadWritten(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// Attach attaches the programs, or swaps them into the pinned links of a
// previous agent atomically, then removes maps pinned for older layouts,
// which no program uses any more.
func (d *Datapath) Attach() error {
	if err := d.attach(); err != nil {
		return err
	}
	if d.inbound == InboundSkLookup && d.skStop == nil {
		if err := d.watchListeners(); err != nil {
			return err
		}
	}
	old, err := filepath.Glob(filepath.Join(d.opts.BPFFS, "maps-v*"))
	if err != nil {
		return err
	}
	for _, dir := range old {
		if dir == d.opts.mapsDir() {
			continue
		}
		d.opts.Logger.Info("removing maps of an older layout", zap.String("dir", dir))
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("datapath: remove old maps %s: %w", dir, err)
		}
	}
	d.opts.Logger.Info("datapath attached",
		zap.String("cgroup", d.opts.CgroupPath),
		zap.String("scope", d.opts.Scope),
		zap.String("bpffs", d.opts.BPFFS),
		zap.Bool("sockmap", d.opts.Sockmap),
		zap.Int("pods", len(d.written)))
	return nil
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// checkBPFFS makes sure pins land on a bpf filesystem, where they outlive
// the process, and not on a plain directory where pinning fails obscurely.
func checkBPFFS(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		var st unix.Statfs_t
		if err := unix.Statfs(d, &st); err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("datapath: %s is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or pass --bpffs on one", dir)
			}
			return nil
		} else if !errors.Is(err, unix.ENOENT) || d == "/" {
			return fmt.Errorf("datapath: check bpffs at %s: %w", d, err)
		}
	}
}

// cgroupHook is one program the datapath attaches to a cgroup.
type cgroupHook struct {
	name string // link and pin file name
	prog *ebpf.Program
	typ  ebpf.AttachType
}

// cgroupHooks are the programs that go on the node's cgroup (node scope)
// or on each meshed pod's own cgroup (pod scope), sockops last: by then
// the getsockopt program answers for every socket sockops records.
func (d *Datapath) cgroupHooks() []cgroupHook {
	return []cgroupHook{
		{linkGetsockopt, d.objs.MeshlaneGetsockopt, ebpf.AttachCGroupGetsockopt},
		{linkConnect4, d.objs.MeshlaneConnect4, ebpf.AttachCGroupInet4Connect},
		{linkConnect6, d.objs.MeshlaneConnect6, ebpf.AttachCGroupInet6Connect},
		{linkSendmsg4, d.objs.MeshlaneSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{linkSendmsg6, d.objs.MeshlaneSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{linkRecvmsg4, d.objs.MeshlaneRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{linkRecvmsg6, d.objs.MeshlaneRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{linkSockops, d.objs.MeshlaneSockops, ebpf.AttachCGroupSockOps},
	}
}

// attach attaches the sk_msg program to the sockhash and, in node scope,
// every cgroup program to the node's cgroup with a pinned bpf link; where a
// pinned link already exists (agent restart or upgrade) it swaps the
// program in that link atomically so redirection never stops. A scope
// change removes the other scope's links once this one's are in place.
func (d *Datapath) attach() error {
	// sk_msg before sockops: a socket copies the sockhash's programs when it
	// is inserted, so the verdict program must be there first.
	if err := d.attachSkMsg(); err != nil {
		return err
	}
	if d.opts.Scope == ScopePod {
		// Pod links were attached as the agent restored its pods.
		return d.removeNodeCgroupLinks()
	}
	cgroupID, err := cgroupID(d.opts.CgroupPath)
	if err != nil {
		return err
	}
	for _, h := range d.cgroupHooks() {
		l, err := d.attachCgroup(filepath.Join(d.opts.linksDir(), h.name), d.opts.CgroupPath, cgroupID, h)
		if err != nil {
			return err
		}
		d.links[h.name] = l
	}
	if err := os.RemoveAll(podCgroupRoot(d.opts.BPFFS)); err != nil {
		return fmt.Errorf("datapath: remove the pod-scope links under %s: %w", podCgroupRoot(d.opts.BPFFS), err)
	}
	return nil
}

func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("datapath: cgroup %s: %w (pass the cgroup v2 directory to attach to)", path, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("datapath: cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("datapath: %s is not a cgroup v2 directory (look for the cgroup2 mount in /proc/self/mountinfo)", path)
	}
	return st.Ino, nil
}

// attachCgroup attaches h to the cgroup at path with a link pinned at pin,
// or updates the link already pinned there for that cgroup.
func (d *Datapath) attachCgroup(pin, path string, cgroupID uint64, h cgroupHook) (link.Link, error) {
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == cgroupID {
			if err := l.Update(h.prog); err != nil {
				l.Close()
				return nil, fmt.Errorf("datapath: update pinned %s link: %w", pin, err)
			}
			return l, nil
		}
		// Pinned for another cgroup (the flag changed, or the pod's cgroup
		// was made anew): replace it.
		d.opts.Logger.Warn("pinned link is attached to another cgroup; re-attaching", zap.String("link", pin), zap.String("cgroup", path))
		if err := l.Unpin(); err != nil {
			l.Close()
			return nil, fmt.Errorf("datapath: unpin stale %s link: %w", pin, err)
		}
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("datapath: open pinned %s link %s: %w (remove it to re-attach)", h.name, pin, err)
	}

	l, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: h.typ, Program: h.prog})
	if err != nil {
		return nil, fmt.Errorf("datapath: attach %s to cgroup %s: %w", h.name, path, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("datapath: pin %s link at %s: %w", h.name, pin, err)
	}
	return l, nil
}

// attachSkMsg attaches (or, with Sockmap off, removes) the sk_msg program on
// the sockhash. Kernels since 6.10 give it a bpf link that can be pinned and
// updated; older ones fall back to a plain attach, which lives as long as the
// pinned sockhash.
func (d *Datapath) attachSkMsg() error {
	pin := filepath.Join(d.opts.linksDir(), linkSkMsg)
	old, err := link.LoadPinnedLink(pin, nil)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("datapath: open pinned sk_msg link %s: %w (remove it to re-attach)", pin, err)
	}
	if !d.opts.Sockmap {
		if old != nil {
			err := old.Unpin()
			old.Close()
			if err != nil {
				return fmt.Errorf("datapath: remove sk_msg link: %w", err)
			}
		}
		return nil
	}
	if old != nil {
		if err := old.Update(d.objs.MeshlaneSkMsg); err != nil {
			old.Close()
			return fmt.Errorf("datapath: update pinned sk_msg link: %w", err)
		}
		d.links[linkSkMsg] = old
		return nil
	}
	l, err := link.AttachRawLink(link.RawLinkOptions{
		Target:  d.objs.MeshlaneSockh.FD(),
		Program: d.objs.MeshlaneSkMsg,
		Attach:  ebpf.AttachSkMsgVerdict,
	})
	if err != nil {
		// No bpf link for sockmaps before 6.10.
		rerr := link.RawAttachProgram(link.RawAttachProgramOptions{
			Target:  d.objs.MeshlaneSockh.FD(),
			Program: d.objs.MeshlaneSkMsg,
			Attach:  ebpf.AttachSkMsgVerdict,
		})
		if rerr != nil {
			return fmt.Errorf("datapath: attach sk_msg to the sockhash: %w (link: %v); start with the short-circuit off", rerr, err)
		}
		return nil
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return fmt.Errorf("datapath: pin sk_msg link: %w", err)
	}
	d.links[linkSkMsg] = l
	return nil
}

// Close releases this process's handles. Pinned maps and links stay, so the
// datapath keeps redirecting until the next agent takes over: a restart is
// not an uninstall.
func (d *Datapath) Close() error {
	var errs []error
	for _, l := range d.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, d.stopWatchingListeners())
	if d.listeners != nil {
		errs = append(errs, d.listeners.Close())
	}
	errs = append(errs, d.objs.Close())
	return errors.Join(errs...)
}

// Uninstall detaches every program (see detach for the order) and removes
// every pin, then closes. Connections already redirected keep working; new
// ones take the normal path.
func (d *Datapath) Uninstall() error {
	links, errs := loadPinnedLinks(filepath.Join(podCgroupRoot(d.opts.BPFFS), "*", "*"))
	for name, l := range d.links {
		links[filepath.Join(d.opts.linksDir(), name)] = l
	}
	errs = append(errs, detach(links, func() error { return emptyMap(d.objs.MeshlanePodips) })...)
	d.links = map[string]link.Link{}
	errs = append(errs, d.removeLegacyInbound())
	errs = append(errs, d.Close())
	errs = append(errs, os.RemoveAll(d.opts.mapsDir()), os.RemoveAll(d.opts.linksDir()),
		os.RemoveAll(inboundRoot(d.opts.BPFFS)), os.RemoveAll(podCgroupRoot(d.opts.BPFFS)))
	if err := os.Remove(d.opts.BPFFS); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// redirectLinks are the hooks that start redirections; the others serve
// connections already redirected (getsockopt answers their sidecar,
// sockops hands the original destination to the accepted socket, recvmsg
// restores DNS reply sources).
var redirectLinks = []string{linkConnect4, linkConnect6, linkSendmsg4, linkSendmsg6}

// DetachGrace is how long an uninstall keeps serving connections already
// redirected once it has stopped redirecting new ones: a sidecar asks for
// the original destination right after accept(), and a connection may
// still wait in its accept queue. Without it, a request sent at the moment
// of uninstall could reach a sidecar that no longer learns where it was
// going (seen in 5 of 32 uninstalls under traffic).
const DetachGrace = time.Second

// detach unpins and closes links (which detaches them), keyed by their pin
// paths: first the hooks that start redirections (of the node or of any
// pod), and stopNewFlows, which keeps the tc program
// from starting any (they stay, and so do their flows, until the caller
// removes them); then, after DetachGrace, the rest.
func detach(links map[string]link.Link, stopNewFlows func() error) []error {
	var errs []error
	drop := func(pin string, l link.Link) {
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
		}
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", pin, err))
		}
		delete(links, pin)
	}
	stopped := false
	for pin, l := range links {
		if slices.Contains(redirectLinks, filepath.Base(pin)) {
			drop(pin, l)
			stopped = true
		}
	}
	if err := stopNewFlows(); err != nil {
		errs = append(errs, fmt.Errorf("stop the tc program's new redirects: %w", err))
	}
	if stopped && len(links) > 0 {
		time.Sleep(DetachGrace)
	}
	for name, l := range links {
		drop(name, l)
	}
	return errs
}

// RemovePins detaches a pinned datapath without loading it: each pinned
// link is unpinned (which detaches its program once no process holds it)
// and the maps are removed. It is what `meshlane-agent uninstall` runs on a
// node; running it twice is fine.
func RemovePins(bpffs string) error {
	links, errs := loadPinnedLinks(filepath.Join(bpffs, "links", "*"), filepath.Join(podCgroupRoot(bpffs), "*", "*"))
	errs = append(errs, detach(links, func() error { return emptyPinnedPodIPs(bpffs) })...)
	errs = append(errs, removePinnedLegacyInbound(bpffs))
	errs = append(errs, os.RemoveAll(filepath.Join(bpffs, "links")), os.RemoveAll(inboundRoot(bpffs)),
		os.RemoveAll(podCgroupRoot(bpffs)))
	maps, err := filepath.Glob(filepath.Join(bpffs, "maps-v*"))
	if err != nil {
		return err
	}
	for _, dir := range maps {
		errs = append(errs, os.RemoveAll(dir))
	}
	if err := os.Remove(bpffs); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// loadPinnedLinks opens the links pinned at the paths the patterns match,
// keyed by pin path.
func loadPinnedLinks(patterns ...string) (map[string]link.Link, []error) {
	links := map[string]link.Link{}
	var errs []error
	for _, pattern := range patterns {
		pins, err := filepath.Glob(pattern)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, pin := range pins {
			l, err := link.LoadPinnedLink(pin, nil)
			if err != nil {
				errs = append(errs, fmt.Errorf("open pinned link %s: %w", pin, err))
				continue
			}
			links[pin] = l
		}
	}
	return links, errs
}
