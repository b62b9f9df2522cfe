package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

// The modes, in their default order.
const (
	modeDirect   = "direct"
	modeIptables = "iptables"
	modeMeshlane = "meshlane"
	modeSockmap  = "meshlane+sockmap"
)

var allModes = []string{modeDirect, modeIptables, modeMeshlane, modeSockmap}

func hasSidecars(mode string) bool { return mode != modeDirect }

// Identities and ports of the pods' processes.
const (
	appUID   = 1000
	appPort  = 8080 // 1 KiB answers
	bulkPort = 8081 // --bulk-bytes answers
)

// Fixed host numbers on the bridge, so every mode sees the same addresses.
const (
	hostA = 11 // client pod, meshed in sidecar modes
	hostB = 12 // server pod, meshed in sidecar modes
	hostR = 13 // "remote" server pod, never meshed
	hostC = 14 // client of the connect-tax loop, never meshed
)

// readyTimeout bounds how long a started server or sidecar may take to
// listen.
const readyTimeout = 10 * time.Second

// world is one mode set up on the node: pods A, B, R and C with their
// processes, and the mode's redirect (rules or datapath).
type world struct {
	n       *node
	mode    string
	a, b, r *testenv.Pod
	c       *testenv.Pod
	dp      *datapath.Datapath
	progs   map[string]*ebpf.Program // the datapath's programs, for their run time
	noops   map[string]*ebpf.Program // no-op programs beside them during a connect-tax run
	// iptables names the iptables-restore variant used (iptables mode).
	iptables string
	undo     cleanups
}

// newWorld builds mode's world for one round. On error it has undone what
// it made.
func (n *node) newWorld(ctx context.Context, round int, mode string) (_ *world, err error) {
	w := &world{n: n, mode: mode}
	defer func() {
		if err != nil {
			err = errors.Join(fmt.Errorf("set up %s: %w", mode, err), w.undo.run())
		}
	}()
	slug := strings.ReplaceAll(mode, "+", "-")
	for _, p := range []struct {
		dst  **testenv.Pod
		name string
		host int
	}{{&w.a, "a", hostA}, {&w.b, "b", hostB}, {&w.r, "r", hostR}, {&w.c, "c", hostC}} {
		v4, v6 := n.br.Addr(p.host)
		pod, err := testenv.CreatePod(n.br, fmt.Sprintf("%s%d-%s", p.name, round, slug), v4, v6)
		if err != nil {
			return nil, err
		}
		w.undo.add("delete pod "+p.name, pod.Delete)
		*p.dst = pod
	}

	switch mode {
	case modeIptables:
		if w.iptables, err = n.istioRedirect(ctx, w.a, w.b); err != nil {
			return nil, err
		}
	case modeMeshlane, modeSockmap:
		dp, err := datapath.Load(datapath.Options{
			BPFFS:      filepath.Join(n.bpffs, "meshlane"),
			CgroupPath: n.cg.Path,
			Sockmap:    mode == modeSockmap,
			Inbound:    n.cfg.Inbound,
		})
		if err != nil {
			return nil, err
		}
		w.dp = dp
		w.undo.add("uninstall datapath", dp.Uninstall)
		for _, p := range []*testenv.Pod{w.a, w.b} {
			if err := meshPod(dp, p); err != nil {
				return nil, err
			}
		}
		if w.progs, err = datapathPrograms(filepath.Join(n.bpffs, "meshlane", "links")); err != nil {
			return nil, err
		}
		w.undo.add("close program handles", func() error { return closePrograms(w.progs) })
		tc, err := tcPrograms(filepath.Join(n.bpffs, "meshlane"), w.a)
		if err != nil {
			return nil, err
		}
		maps.Copy(w.progs, tc)
	}

	tag := fmt.Sprintf("%d-%s", round, slug)
	servers := []struct {
		pod         *testenv.Pod
		name        string
		port, bytes int
	}{{w.b, "b-http", appPort, 1024}, {w.b, "b-bulk", bulkPort, n.cfg.BulkBytes}, {w.r, "r-http", appPort, 1024}}
	for _, s := range servers {
		listen := fmt.Sprintf("0.0.0.0:%d,[::]:%d", s.port, s.port)
		err := w.startReady(ctx, s.pod, tag+"-"+s.name, appUID, n.groups[groupApps],
			n.podbin, "http-server", "--listen", listen, "--body-bytes", fmt.Sprint(s.bytes))
		if err != nil {
			return nil, err
		}
	}
	err = w.startReady(ctx, w.r, tag+"-r-accept", appUID, n.groups[groupApps],
		n.probe, acceptLoopArg, "--listen", netip.AddrPortFrom(netip.IPv4Unspecified(), taxPort).String())
	if err != nil {
		return nil, err
	}
	if w.dp != nil && slices.ContainsFunc(n.cfg.workloads(), func(wl workload) bool { return wl.Kind == kindConnect }) {
		// The paired probe's listener: in the tax cgroup, so its
		// accepted sockets meet the programs exactly when the probe
		// has attached them there, and on the probe's CPU.
		err = w.startReady(ctx, w.r, tag+"-r-accept-ab", appUID, n.taxCg,
			slices.Concat(pinned(), []string{n.probe, acceptLoopArg, "--listen", netip.AddrPortFrom(netip.IPv4Unspecified(), abPort).String()})...)
		if err != nil {
			return nil, err
		}
	}
	if hasSidecars(mode) {
		prof := mesh.Istio
		for _, sc := range []struct {
			pod   *testenv.Pod
			name  string
			group string
		}{{w.a, "a-sidecar", groupSidecarA}, {w.b, "b-sidecar", groupSidecarB}} {
			err := w.startReady(ctx, sc.pod, tag+"-"+sc.name, prof.ProxyUID, n.groups[sc.group], n.sidecar...)
			if err != nil {
				return nil, err
			}
		}
	}
	return w, nil
}

// meshPod writes p into the datapath as an Istio-injected pod, as the
// agent does at CNI ADD.
func meshPod(dp *datapath.Datapath, p *testenv.Pod) error {
	d, err := mesh.Decide(map[string]string{mesh.Istio.Marker: "{}"}, mesh.Istio)
	if err != nil {
		return fmt.Errorf("mesh decision for pod %s: %w", p.Name, err)
	}
	if d.Membership != mesh.Meshed {
		return fmt.Errorf("pod %s: decided %v, want meshed", p.Name, d.Membership)
	}
	var ips []netip.Addr
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if a.IsValid() {
			ips = append(ips, a)
		}
	}
	// On eth0 too, as the agent does: the tc programs see every packet
	// the pod sends.
	ifc := datapath.PodInterface{Netns: p.NetnsPath, Name: "eth0"}
	if err := dp.UpsertPod(d.Settings.Pod(p.NetnsCookie, ips, ifc, "")); err != nil {
		return fmt.Errorf("write pod %s into the datapath: %w", p.Name, err)
	}
	return nil
}

// startReady starts a command that takes --ready (podbin's or the C
// sidecar) in pod as uid, in group, logging to the run's log directory, and
// waits until it listens. The world's cleanup kills it.
func (w *world) startReady(ctx context.Context, pod *testenv.Pod, name string, uid uint32, group *testenv.Cgroup, args ...string) error {
	ready := filepath.Join(w.n.scratch, name+".ready")
	args = append(args, "--ready", ready)
	p, err := w.n.start(pod, name, uid, group, args...)
	if err != nil {
		return err
	}
	w.undo.add("stop "+name, p.Kill)
	w.undo.add("remove "+name+" ready file", func() error { return removeIfExists(ready) })
	deadline := time.NewTimer(readyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(ready); err == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before listening (%v): see %s", name, p.exitErr, w.n.logPath(name))
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("%s did not listen within %s: see %s", name, readyTimeout, w.n.logPath(name))
		case <-tick.C:
		}
	}
}

// proc is a started process, a channel closed when it has exited and,
// from then on, how it ended.
type proc struct {
	*testenv.Proc
	exited  chan struct{}
	exitErr error
}

// start runs args in pod (the host when nil) as uid and gid uid, in group,
// with stdout and stderr in the log directory.
func (n *node) start(pod *testenv.Pod, name string, uid uint32, group *testenv.Cgroup, args ...string) (*proc, error) {
	log, err := os.Create(n.logPath(name))
	if err != nil {
		return nil, fmt.Errorf("log file for %s: %w", name, err)
	}
	// The child has its own descriptor; ours is not needed after start.
	defer log.Close()
	netns := ""
	if pod != nil {
		netns = pod.NetnsPath
	}
	tp, err := testenv.StartProc(netns, testenv.ProcOpts{UID: uid, GID: uid, Cgroup: group, Args: args, Stdout: log, Stderr: log})
	if err != nil {
		return nil, err
	}
	p := &proc{Proc: tp, exited: make(chan struct{})}
	go func() {
		// With a timeout it never reaches, Wait returns once the process
		// has exited; every process here is killed at the latest when
		// its world closes, which ends this goroutine.
		p.exitErr = p.Wait(time.Duration(math.MaxInt64))
		close(p.exited)
	}()
	return p, nil
}

// runRoot runs args as root in pod's network namespace, outside the bench
// cgroup, and waits up to timeout for a clean exit.
func (n *node) runRoot(ctx context.Context, pod *testenv.Pod, name string, timeout time.Duration, args ...string) error {
	p, err := n.start(pod, name, 0, nil, args...)
	if err != nil {
		return err
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.exited:
		if err := p.exitErr; err != nil {
			out, _ := os.ReadFile(n.logPath(name))
			return fmt.Errorf("%q: %w: %s", args, err, strings.TrimSpace(string(out)))
		}
		return nil
	case <-ctx.Done():
		return errors.Join(ctx.Err(), p.Kill())
	case <-t.C:
		return errors.Join(fmt.Errorf("%q did not finish within %s", args, timeout), p.Kill())
	}
}

func (n *node) logPath(name string) string { return filepath.Join(n.logs, name+".log") }

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// close tears the world down: processes, datapath, then the pods (their
// network namespaces take any iptables rules with them).
func (w *world) close() error { return w.undo.run() }
