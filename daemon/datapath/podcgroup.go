package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/cilium/ebpf/link"
)

// Where the cgroup programs attach.
const (
	// ScopeNode attaches them once, to Options.CgroupPath: every process
	// below it runs them on connect(), sendmsg() and socket events, meshed
	// or not. An empty scope means the same.
	ScopeNode = "node"
	// ScopePod attaches them to each meshed pod's own cgroup (Pod.Cgroup,
	// from the runtime's cgroupPath): processes of other pods and of the
	// host never run them. Connections into a meshed pod from those take
	// the tc path, as connections from other nodes do.
	ScopePod = "pod"
)

func checkScope(scope string) error {
	switch scope {
	case "", ScopeNode, ScopePod:
		return nil
	}
	return fmt.Errorf("datapath: unknown cgroup scope %q: use %q or %q", scope, ScopeNode, ScopePod)
}

// podCgroupRoot holds, in pod scope, one directory of pinned cgroup links
// per meshed pod; removing a directory detaches that pod's programs.
func podCgroupRoot(bpffs string) string { return filepath.Join(bpffs, "cgroups") }

func (o Options) podCgroupDir(cookie uint64) string {
	return filepath.Join(podCgroupRoot(o.BPFFS), strconv.FormatUint(cookie, 10))
}

// attachPodCgroup puts the cgroup programs on the pod's cgroup, or swaps
// this datapath's programs into the links already pinned for it.
func (d *Datapath) attachPodCgroup(p Pod) error {
	if d.opts.Scope != ScopePod {
		return nil
	}
	if p.Cgroup == "" {
		return fmt.Errorf("datapath: pod %d has no cgroup: with the pod cgroup scope the runtime must pass cgroupPath (containerd >= 1.7, CRI-O >= 1.28), or run the agent with --cgroup-scope node", p.NetnsCookie)
	}
	id, err := cgroupID(p.Cgroup)
	if err != nil {
		return err
	}
	dir := d.opts.podCgroupDir(p.NetnsCookie)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("datapath: create pin directory %s: %w", dir, err)
	}
	for _, h := range d.cgroupHooks() {
		l, err := d.attachCgroup(filepath.Join(dir, h.name), p.Cgroup, id, h)
		if err != nil {
			return err
		}
		l.Close() // the pin holds it
	}
	return nil
}

// detachPodCgroup removes the pod's pinned cgroup links, which detaches
// its programs. A pod whose cgroup is gone took them along already; the
// pins are removed all the same.
func (d *Datapath) detachPodCgroup(p Pod) error {
	if err := os.RemoveAll(d.opts.podCgroupDir(p.NetnsCookie)); err != nil {
		return fmt.Errorf("datapath: remove the cgroup links of pod %d: %w", p.NetnsCookie, err)
	}
	return nil
}

// removeNodeCgroupLinks unpins the node-scope cgroup links a previous agent
// left, once the pods' own links are in place (scope changed to pod).
func (d *Datapath) removeNodeCgroupLinks() error {
	var errs []error
	for _, h := range d.cgroupHooks() {
		pin := filepath.Join(d.opts.linksDir(), h.name)
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("datapath: remove the node-scope %s link %s: %w", h.name, pin, err))
		}
	}
	return errors.Join(errs...)
}

// CgroupHooks checks, in pod scope, that every cgroup program of the pod is
// pinned and attached to the pod's cgroup. The error says what is missing.
func (d *Datapath) CgroupHooks(p Pod) error {
	if d.opts.Scope != ScopePod {
		return nil
	}
	id, err := cgroupID(p.Cgroup)
	if err != nil {
		return err
	}
	for _, h := range d.cgroupHooks() {
		pin := filepath.Join(d.opts.podCgroupDir(p.NetnsCookie), h.name)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("%s link of cgroup %s: %w", h.name, p.Cgroup, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return fmt.Errorf("%s link of cgroup %s: %w", h.name, p.Cgroup, err)
		}
		if cg := info.Cgroup(); cg == nil || cg.CgroupId != id {
			return fmt.Errorf("%s link is pinned but not attached to cgroup %s", h.name, p.Cgroup)
		}
	}
	return nil
}
