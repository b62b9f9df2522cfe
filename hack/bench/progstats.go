package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/meshlane/meshlane/test/testenv"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The kernel's own accounting of BPF program run time is the one measure
// of the datapath's cost that a busy, shared machine cannot blur: it times
// each program run, not the wall clock around it. It is on for the whole
// bench (two clock reads per program run, charged to the meshlane modes
// only, so it can only make them look slower) and off again when the
// returned closer is closed or the process exits.
func enableProgramStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF run time statistics: %w (needs Linux 5.8)", err)
	}
	return c, nil
}

// ProgStat is one program's runs and run time during a run.
type ProgStat struct {
	Runs  uint64 `json:"runs"`
	RunNs uint64 `json:"runNs"`
}

// pinnedLink is a pinned link's program and what the link says of itself.
type pinnedLink struct {
	name string
	prog *ebpf.Program
	info *link.Info
}

// openPinnedLink opens the program behind the link pinned at path; the pin
// keeps the link, only our descriptor of it is closed.
func openPinnedLink(path string) (pinnedLink, error) {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return pinnedLink{}, fmt.Errorf("open pinned link %s: %w", path, err)
	}
	info, err := l.Info()
	l.Close()
	if err != nil {
		return pinnedLink{}, fmt.Errorf("link %s info: %w", path, err)
	}
	p, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return pinnedLink{}, fmt.Errorf("program of link %s: %w", path, err)
	}
	return pinnedLink{filepath.Base(path), p, info}, nil
}

// pinnedLinks opens every link pinned in dir (the datapath's loader pins
// one per attachment under <bpffs>/links).
func pinnedLinks(dir string) ([]pinnedLink, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list the datapath's pinned links: %w", err)
	}
	var out []pinnedLink
	for _, e := range entries {
		pl, err := openPinnedLink(filepath.Join(dir, e.Name()))
		if err != nil {
			for _, o := range out {
				o.prog.Close()
			}
			return nil, err
		}
		out = append(out, pl)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no pinned link under %s: has the datapath's pin layout changed?", dir)
	}
	return out, nil
}

// datapathPrograms opens the programs behind the datapath's pinned links,
// keyed by the link's name.
func datapathPrograms(linksDir string) (map[string]*ebpf.Program, error) {
	links, err := pinnedLinks(linksDir)
	if err != nil {
		return nil, err
	}
	progs := map[string]*ebpf.Program{}
	for _, l := range links {
		progs[l.name] = l.prog
	}
	return progs, nil
}

// tcPrograms opens the tc program on a meshed pod's eth0, keyed
// "tc-ingress": every meshed pod runs the same one, on every packet it
// receives, so its run time belongs with the datapath's. tcx hooks are
// found through the links the datapath pins per pod, classic filters
// through netlink in the pod's namespace.
func tcPrograms(bpffs string, pod *testenv.Pod) (map[string]*ebpf.Program, error) {
	ids := map[string]ebpf.ProgramID{}
	pins, err := filepath.Glob(filepath.Join(bpffs, "inbound", "*", "*"))
	if err != nil {
		return nil, err
	}
	for _, pin := range pins {
		pl, err := openPinnedLink(pin)
		if err != nil {
			return nil, err
		}
		pl.prog.Close()
		ids["tc-"+pl.name] = pl.info.Program
	}
	if len(ids) == 0 {
		err := testenv.InNetns(pod.NetnsPath, func() error {
			eth, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			filters, err := netlink.FilterList(eth, netlink.HANDLE_MIN_INGRESS)
			if err != nil {
				return fmt.Errorf("list ingress filters: %w", err)
			}
			for _, f := range filters {
				if bf, ok := f.(*netlink.BpfFilter); ok && bf.Id != 0 {
					ids["tc-ingress"] = ebpf.ProgramID(bf.Id)
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("tc filters of pod %s: %w", pod.Name, err)
		}
	}
	if len(ids) != 1 {
		return nil, fmt.Errorf("found tc programs %v on pod %s, want the ingress one: has the datapath's hook layout changed?", ids, pod.Name)
	}
	progs := map[string]*ebpf.Program{}
	for name, id := range ids {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			closePrograms(progs)
			return nil, fmt.Errorf("program %s: %w", name, err)
		}
		progs[name] = p
	}
	return progs, nil
}

func readProgStats(progs map[string]*ebpf.Program) (map[string]ProgStat, error) {
	out := make(map[string]ProgStat, len(progs))
	for name, p := range progs {
		s, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("run time of program %s: %w", name, err)
		}
		out[name] = ProgStat{Runs: s.RunCount, RunNs: uint64(s.Runtime)}
	}
	return out, nil
}

func progDeltas(before, after map[string]ProgStat) map[string]ProgStat {
	if after == nil {
		return nil
	}
	out := make(map[string]ProgStat, len(after))
	for k, a := range after {
		b := before[k]
		out[k] = ProgStat{Runs: a.Runs - b.Runs, RunNs: a.RunNs - b.RunNs}
	}
	return out
}

// totalRunNs sums the run time of every program.
func totalRunNs(s map[string]ProgStat) uint64 {
	var t uint64
	for _, p := range s {
		t += p.RunNs
	}
	return t
}

func closePrograms(progs map[string]*ebpf.Program) error {
	var errs []error
	for _, p := range progs {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}

// The accounting's own cost: each program run it times includes a clock
// read, which on this kind of VM is most of what a short program measures
// (a sockops program that only returns measured about 53 ns a run, the
// datapath's about 60). The connect-tax runs attach programs that only
// return to the same hooks, next to the datapath's, so the report can take
// that cost out of the datapath's figure, measured under the same load.
// noopHooks are those hooks, by the name of the datapath link on each.
var noopHooks = map[string]struct {
	typ    ebpf.ProgramType
	attach ebpf.AttachType
	ret    int32
}{
	"sockops":  {ebpf.SockOps, ebpf.AttachCGroupSockOps, 1},
	"connect4": {ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect, 1},
}

// attachNoops attaches one do-nothing program per noopHooks entry to the
// cgroup; the returned func detaches and unloads them.
func attachNoops(cgroupPath string) (map[string]*ebpf.Program, func() error, error) {
	progs := map[string]*ebpf.Program{}
	var undo cleanups
	for name, h := range noopHooks {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:         "noop_" + name,
			Type:         h.typ,
			AttachType:   h.attach,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, h.ret), asm.Return()},
			License:      "GPL",
		})
		if err != nil {
			return nil, nil, errors.Join(fmt.Errorf("load no-op %s program: %w", name, err), undo.run())
		}
		undo.add("unload no-op "+name, p.Close)
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: h.attach, Program: p})
		if err != nil {
			return nil, nil, errors.Join(fmt.Errorf("attach no-op %s program: %w", name, err), undo.run())
		}
		undo.add("detach no-op "+name, l.Close)
		progs[name] = p
	}
	return progs, undo.run, nil
}

// netRunNs is the datapath's run time less the accounting's own cost: for
// each hook with a no-op program, the no-op's mean run time is taken off
// every datapath run there.
func netRunNs(progs, noops map[string]ProgStat) float64 {
	net := float64(totalRunNs(progs))
	for name, n := range noops {
		if n.Runs == 0 {
			continue
		}
		net -= float64(n.RunNs) / float64(n.Runs) * float64(progs[name].Runs)
	}
	return net
}
