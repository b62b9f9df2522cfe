package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/testenv"
)

// The control path is what meshlane adds to a pod's start and stop: the
// chained plugin's round trip to the agent at CNI ADD and DEL, and the
// agent's memory and CPU. It runs on its own simulated node
// (test/cninode: the reference bridge and host-local plugins through
// libcni, as containerd calls them), built anew per mode and round.

// kindControl is the control-path workload: pods added one after the
// other through the CNI chain, then deleted.
const kindControl = "control"

// Control-path modes: the primary network alone, and the same conflist
// with meshlane-cni chained last and the agent running.
const (
	modePrimary         = "primary"
	modePrimaryMeshlane = "primary+meshlane"
)

var controlModes = []string{modePrimary, modePrimaryMeshlane}

// cniTimeout bounds one ADD or DEL through the chain: meshlane-cni gives up
// on the agent after 5 s, the bridge plugin waits at most a few seconds
// for its port.
const cniTimeout = 30 * time.Second

// controlName labels the control workload in reports.
func controlName(pods int) string { return fmt.Sprintf("CNI ADD and DEL, %d pods", pods) }

// ControlResult is one control-path run: its pods added one after the
// other, then deleted in the same order.
type ControlResult struct {
	Pods int `json:"pods"`
	// Meshed pods carry the Istio injection marker; the others carry no
	// mesh annotation, so the agent decides they are not in the mesh.
	Meshed int `json:"meshedPods"`
	// AddMs and DelMs are each pod's AddNetworkList and DelNetworkList
	// through libcni, in ms, in call order; creating and removing the
	// pod's network namespace is not part of them.
	AddMs []float64 `json:"addMs"`
	DelMs []float64 `json:"delMs"`
	// PluginAddMs and PluginDelMs split each call by plugin: the plugin
	// process's own time within it, ms, in call order (bridge's includes
	// the host-local IPAM it runs). meshlane-cni's is what meshlane adds
	// to the call, measured within the call itself.
	PluginAddMs map[string][]float64 `json:"pluginAddMs,omitempty"`
	PluginDelMs map[string][]float64 `json:"pluginDelMs,omitempty"`
	// Agent is the agent's footprint (primary+meshlane only).
	Agent *AgentUsage `json:"agent,omitempty"`
}

// AgentUsage is what the agent process used during a run.
type AgentUsage struct {
	// RSSIdle is VmRSS once the agent is ready with no pod; RSSPods and
	// HWMPods are VmRSS and VmHWM (peak RSS so far) after the last ADD.
	RSSIdle uint64 `json:"rssIdleBytes"`
	RSSPods uint64 `json:"rssPodsBytes"`
	HWMPods uint64 `json:"hwmPodsBytes"`
	// CPUMs is the agent's user and system CPU time from before the first
	// ADD to after the last DEL.
	CPUMs float64 `json:"cpuMs"`
}

// controlRun is one mode's node during one round.
type controlRun struct {
	node *cninode.Node
	res  ControlResult
	// alive are the pods added and not deleted yet, in order.
	alive []*cninode.Pod
	undo  cleanups
}

// runControl measures the control path of mode for one round. A run whose
// pods failed to come up or go away is kept with its Err set; only a
// set-up failure, an interruption or an incomplete teardown is returned
// as an error (the run that came with a teardown error still counts).
func (n *node) runControl(ctx context.Context, round int, mode string, cfg config) (runs []Run, err error) {
	c, err := n.startControl(round, mode)
	if err != nil {
		return nil, fmt.Errorf("set up %s: %w", mode, err)
	}
	defer func() {
		if cerr := c.undo.run(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("tear down %s: %w", mode, cerr))
		}
	}()
	run := Run{Round: round, Mode: mode, Workload: controlName(cfg.Pods), Kind: kindControl, Start: time.Now().UTC(), LoadAvg: loadAvg()}
	before, err := readCPUTimes()
	if err != nil {
		return nil, err
	}
	merr := c.measure(ctx, round, mode, cfg.Pods)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	after, err := readCPUTimes()
	if err != nil {
		return nil, err
	}
	run.CPU = cpuShare(before, after)
	run.Control = &c.res
	if merr != nil {
		run.Err = merr.Error()
	}
	return []Run{run}, nil
}

// startControl starts mode's node: a fresh directory, bridge name and
// subnets, and for primary+meshlane an agent with a fresh pin directory,
// so that every run starts from nothing. On error it has undone what it
// made.
func (n *node) startControl(round int, mode string) (_ *controlRun, err error) {
	c := &controlRun{}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.undo.run())
		}
	}()
	tag := fmt.Sprintf("%d-%s", round, slug(mode))
	dir := filepath.Join(n.controlDir, tag)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("node directory: %w", err)
	}
	c.undo.add("remove node directory", func() error { return os.RemoveAll(dir) })
	v4, v6, err := podSubnets(n.cfg.Pods)
	if err != nil {
		return nil, err
	}
	// The bridge plugin creates the bridge at the first ADD.
	bridge := testenv.LinkName()
	c.undo.add("delete bridge "+bridge, func() error { return testenv.DeleteLink(bridge) })
	opts := cninode.Options{Bin: n.cniBin, Dir: dir, Bridge: bridge, Subnet4: v4, Subnet6: v6, Unchained: mode == modePrimary,
		AgentArgs: []string{"--inbound-hooks", n.cfg.Inbound}}
	if mode == modePrimaryMeshlane {
		// The agent leaves its pins when it stops (a restart keeps
		// them); removing them detaches its programs from the cgroup.
		pins := filepath.Join(n.bpffs, "control-"+tag)
		c.undo.add("remove agent pins", func() error { return os.RemoveAll(pins) })
		log, err := os.Create(n.logPath(tag + "-agent"))
		if err != nil {
			return nil, fmt.Errorf("agent log: %w", err)
		}
		c.undo.add("close agent log", log.Close)
		opts.Cgroup, opts.BPFFS, opts.AgentLog = n.controlCg, pins, log
		opts.PodCgroups = n.cfg.CgroupScope == datapath.ScopePod
	}
	if c.node, err = cninode.Start(opts); err != nil {
		return nil, fmt.Errorf("%w (agent log: %s)", err, n.logPath(tag+"-agent"))
	}
	c.undo.add("stop agent", c.node.Close)
	c.undo.add("delete pods left", c.deleteAlive)
	return c, nil
}

// measure adds pods pods, half of them Istio-injected, then deletes them,
// timing each chain call and reading the agent's footprint.
func (c *controlRun) measure(ctx context.Context, round int, mode string, pods int) error {
	c.res = ControlResult{Pods: pods, PluginAddMs: map[string][]float64{}, PluginDelMs: map[string][]float64{}}
	pid := c.node.AgentPid()
	var cpu0 time.Duration
	if pid != 0 {
		mem, err := readProcMem(pid)
		if err != nil {
			return err
		}
		if cpu0, err = readProcCPU(pid); err != nil {
			return err
		}
		c.res.Agent = &AgentUsage{RSSIdle: mem.RSS}
	}
	for i := range pods {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// Alternate, so both kinds spread over the whole run.
		ann := map[string]string{}
		if i%2 == 0 {
			ann[mesh.Istio.Marker] = "{}"
			c.res.Meshed++
		}
		name := fmt.Sprintf("ctl%d-%s-%d", round, slug(mode), i)
		opCtx, cancel := context.WithTimeout(ctx, cniTimeout)
		p, err := c.node.AddPod(opCtx, "bench", name, ann)
		cancel()
		if err != nil {
			return fmt.Errorf("CNI ADD of pod %d of %d (%s): %w", i+1, pods, name, err)
		}
		c.alive = append(c.alive, p)
		c.res.AddMs = append(c.res.AddMs, ms(p.AddTook))
		for plugin, d := range p.AddPlugins {
			c.res.PluginAddMs[plugin] = append(c.res.PluginAddMs[plugin], ms(d))
		}
	}
	if pid != 0 {
		mem, err := readProcMem(pid)
		if err != nil {
			return err
		}
		c.res.Agent.RSSPods, c.res.Agent.HWMPods = mem.RSS, mem.HWM
	}
	for len(c.alive) > 0 {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		p := c.alive[0]
		opCtx, cancel := context.WithTimeout(ctx, cniTimeout)
		err := c.node.DelPod(opCtx, p)
		cancel()
		// The namespace is gone even when DEL failed: never retry it.
		c.alive = c.alive[1:]
		if err != nil {
			return fmt.Errorf("CNI DEL of pod %s: %w", p.Name, err)
		}
		c.res.DelMs = append(c.res.DelMs, ms(p.DelTook))
		for plugin, d := range p.DelPlugins {
			c.res.PluginDelMs[plugin] = append(c.res.PluginDelMs[plugin], ms(d))
		}
	}
	if pid != 0 {
		cpu1, err := readProcCPU(pid)
		if err != nil {
			return err
		}
		c.res.Agent.CPUMs = ms(cpu1 - cpu0)
	}
	return nil
}

// deleteAlive deletes the pods a failed or interrupted run left, newest
// first, as a runtime tearing a node down would.
func (c *controlRun) deleteAlive() error {
	var errs []error
	for i := len(c.alive) - 1; i >= 0; i-- {
		ctx, cancel := context.WithTimeout(context.Background(), cniTimeout)
		errs = append(errs, c.node.DelPod(ctx, c.alive[i]))
		cancel()
	}
	c.alive = nil
	return errors.Join(errs...)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// podSubnets picks a control run's subnets: testenv's free /24 and /64,
// the IPv4 one widened until host-local has an address for every pod (it
// hands out all of the range but the network, gateway and broadcast
// addresses) and checked again against the host's addresses.
func podSubnets(pods int) (v4, v6 netip.Prefix, err error) {
	bits := prefixBitsFor(pods)
	for range 16 {
		if v4, v6, err = testenv.FreeSubnets(); err != nil {
			return v4, v6, err
		}
		v4 = netip.PrefixFrom(v4.Addr(), bits).Masked()
		used, err := hostAddrIn(v4)
		if err != nil {
			return v4, v6, err
		}
		if !used {
			return v4, v6, nil
		}
	}
	return v4, v6, fmt.Errorf("no free IPv4 /%d for %d pods after 16 tries: remove leftover test bridges (ip -br addr | grep 198.1[89])", bits, pods)
}

// prefixBitsFor is the longest IPv4 prefix, /24 at most, whose host-local
// range holds pods addresses.
func prefixBitsFor(pods int) int {
	bits := 24
	for bits > 0 && 1<<(32-bits)-3 < pods {
		bits--
	}
	return bits
}

// hostAddrIn tells whether an address of this host overlaps p.
func hostAddrIn(p netip.Prefix) (bool, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return false, fmt.Errorf("list host addresses: %w", err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		if p.Overlaps(netip.PrefixFrom(ip.Unmap(), ones)) {
			return true, nil
		}
	}
	return false, nil
}

// slug makes a mode name fit file and pod names.
func slug(mode string) string { return strings.ReplaceAll(mode, "+", "-") }
