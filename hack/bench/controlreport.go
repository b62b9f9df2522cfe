package main

import (
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/meshlane/meshlane/daemon/datapath"
)

// percentile is the nearest-rank p-th percentile of v (0 < p <= 100): the
// smallest value that at least p % of the values do not exceed.
func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Sorted(slices.Values(v))
	k := int(math.Ceil(p / 100 * float64(len(s))))
	return s[min(max(k, 1), len(s))-1]
}

// controlMetric extracts one number from a good control run.
type controlMetric struct {
	name, unit string
	lowerWins  bool
	// added: the report also gives primary+meshlane minus primary.
	added bool
	get   func(Run) (float64, bool)
}

const mib = 1 << 20

// chainPlugins are the plugins libcni runs for a pod, in chain order; the
// bridge plugin runs host-local itself.
var chainPlugins = []string{"bridge", "meshlane-cni"}

// controlMetrics are the control figures, for runs of pods pods.
func controlMetrics(pods int) []controlMetric {
	var out []controlMetric
	for _, op := range []struct {
		name string
		get  func(*ControlResult) []float64
	}{{"CNI ADD", func(c *ControlResult) []float64 { return c.AddMs }}, {"CNI DEL", func(c *ControlResult) []float64 { return c.DelMs }}} {
		for _, p := range []struct {
			name string
			p    float64
		}{{"p50", 50}, {"p90", 90}, {"p99", 99}, {"max", 100}} {
			out = append(out, controlMetric{op.name + " " + p.name, "ms", true, true, func(r Run) (float64, bool) {
				v := op.get(r.Control)
				return percentile(v, p.p), len(v) > 0
			}})
		}
	}
	// Each plugin's own process time, within the same calls: meshlane-cni's
	// is what meshlane adds to every ADD and DEL, free of the noise that
	// the difference of two modes' totals carries.
	for _, op := range []struct {
		name string
		get  func(*ControlResult) map[string][]float64
	}{{"CNI ADD", func(c *ControlResult) map[string][]float64 { return c.PluginAddMs }}, {"CNI DEL", func(c *ControlResult) map[string][]float64 { return c.PluginDelMs }}} {
		for _, plugin := range chainPlugins {
			for _, p := range []struct {
				name string
				p    float64
			}{{"p50", 50}, {"p99", 99}} {
				out = append(out, controlMetric{fmt.Sprintf("%s p%s, %s's own process", op.name, strings.TrimPrefix(p.name, "p"), plugin), "ms", true, false, func(r Run) (float64, bool) {
					v := op.get(r.Control)[plugin]
					return percentile(v, p.p), len(v) > 0
				}})
			}
		}
	}
	agent := func(f func(*AgentUsage) float64) func(Run) (float64, bool) {
		return func(r Run) (float64, bool) {
			if r.Control.Agent == nil {
				return 0, false
			}
			return f(r.Control.Agent), true
		}
	}
	return append(out,
		controlMetric{"agent RSS, 0 pods", "MiB", true, false, agent(func(a *AgentUsage) float64 { return float64(a.RSSIdle) / mib })},
		controlMetric{fmt.Sprintf("agent RSS, %d pods", pods), "MiB", true, false, agent(func(a *AgentUsage) float64 { return float64(a.RSSPods) / mib })},
		controlMetric{fmt.Sprintf("agent peak RSS (VmHWM), %d pods", pods), "MiB", true, false, agent(func(a *AgentUsage) float64 { return float64(a.HWMPods) / mib })},
		controlMetric{fmt.Sprintf("agent CPU time, %d ADDs + %d DELs", pods, pods), "ms", true, false, agent(func(a *AgentUsage) float64 { return a.CPUMs })},
		controlMetric{"machine idle", "%", false, false, func(r Run) (float64, bool) { return r.CPU.Idle, true }},
	)
}

// controlFigures turns the good control runs of pods pods into figures;
// none when there are no such runs. "Added by meshlane" pairs the two
// modes within each round, so a round's outside load weighs on both sides
// of its difference.
func controlFigures(runs []Run, pods int) []Figure {
	name := controlName(pods)
	var good []Run
	for _, r := range runs {
		if r.Kind == kindControl && r.Workload == name && r.Err == "" && r.Control != nil {
			good = append(good, r)
		}
	}
	if len(good) == 0 {
		return nil
	}
	var out []Figure
	for _, m := range controlMetrics(pods) {
		f := Figure{Workload: name, Kind: kindControl, Conns: pods, Metric: m.name, Unit: m.unit, LowerWins: m.lowerWins,
			Modes: map[string]Stat{}}
		byRound := map[string]map[int]float64{}
		for _, mode := range controlModes {
			byRound[mode] = map[int]float64{}
			var vals []float64
			for _, r := range good {
				if r.Mode != mode {
					continue
				}
				if v, ok := m.get(r); ok {
					vals = append(vals, v)
					byRound[mode][r.Round] = v
				}
			}
			if len(vals) > 0 {
				f.Modes[mode] = summarize(vals)
			}
		}
		if m.added {
			var diffs []float64
			for _, round := range sortedRounds(byRound[modePrimaryMeshlane]) {
				if base, ok := byRound[modePrimary][round]; ok {
					diffs = append(diffs, byRound[modePrimaryMeshlane][round]-base)
				}
			}
			if len(diffs) > 0 {
				s := summarize(diffs)
				f.Added = &s
			}
		}
		out = append(out, f)
	}
	return out
}

func sortedRounds(m map[int]float64) []int {
	var rounds []int
	for r := range m {
		rounds = append(rounds, r)
	}
	slices.Sort(rounds)
	return rounds
}

// controlSection is the control path's part of results.md; empty when the
// run measured none.
func (rep *Report) controlSection() string {
	var figs []Figure
	for _, f := range rep.Figures {
		if f.Kind == kindControl {
			figs = append(figs, f)
		}
	}
	if len(figs) == 0 {
		return ""
	}
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("## Control path: CNI ADD and DEL, agent footprint")
	p("")
	p("%d pods added one after the other through libcni (AddNetworkList, as containerd calls it), then deleted in the same order (DelNetworkList); creating and removing each pod's network namespace is not timed. "+
		"`%s`: the conflist of the reference bridge + host-local plugins alone, no agent. `%s`: the same with meshlane-cni chained last and meshlane-agent running (defaults: Istio profile, short-circuit off, log level info; --inbound-hooks %s: a meshed pod's ADD attaches the inbound steering program, to its eth0 with tcx or tc, to its network namespace with sk_lookup; --cgroup-scope %s). "+
		"Every other pod is annotated as Istio-injected (`sidecar.istio.io/status`, so the agent meshes it); the rest carry no mesh annotation. "+
		"Each mode and round gets a fresh node (directory, bridge, agent and pins); the two modes swap order every round.",
		rep.Config.Pods, modePrimary, modePrimaryMeshlane, inboundFlag(rep.Config.Inbound), scopeFlag(rep.Config.CgroupScope))
	p("")
	p("Cells: mean (min–max) over the good rounds of each run's percentile (nearest rank over the run's %d calls); \"added by meshlane\" is %s minus %s within each round. "+
		"Agent memory is VmRSS and VmHWM from /proc/<pid>/status, its CPU time utime+stime from /proc/<pid>/stat.", rep.Config.Pods, modePrimaryMeshlane, modePrimary)
	p("")
	p("| figure | %s | %s | added by meshlane |", modePrimary, modePrimaryMeshlane)
	p("|---|---:|---:|---:|")
	for _, f := range figs {
		row := fmt.Sprintf("| %s (%s%s) |", f.Metric, f.Unit, betterHint(f.LowerWins))
		for _, mode := range controlModes {
			row += " " + statCell(f.Modes, mode) + " |"
		}
		if f.Added != nil {
			row += " " + statCell(map[string]Stat{"": *f.Added}, "") + " |"
		} else {
			row += " |"
		}
		p("%s", row)
	}
	return b.String()
}

// statCell prints mode's mean (min–max), or "–" when it has none.
func statCell(stats map[string]Stat, mode string) string {
	s, ok := stats[mode]
	if !ok {
		return "–"
	}
	cell := fmtValue(s.Mean)
	if s.N > 1 {
		cell += fmt.Sprintf(" (%s–%s)", fmtValue(s.Min), fmtValue(s.Max))
	}
	return cell
}

// scopeFlag is the --cgroup-scope value a report names, with what it
// means for a meshed pod's ADD; results.json files written before the flag
// ran node scope.
func scopeFlag(v string) string {
	if v == datapath.ScopePod {
		return "pod: every pod has a cgroup of its own, passed as cgroupPath, and a meshed pod's ADD attaches the eight cgroup programs to it"
	}
	return "node: the cgroup programs are attached once, at the agent's start"
}

// inboundFlag is the --inbound-hooks value a report names; results.json
// files written before the flag do not say.
func inboundFlag(v string) string {
	if v == "" {
		return "(not recorded)"
	}
	return v
}
