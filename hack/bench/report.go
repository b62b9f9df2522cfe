package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The sidecars --sidecar chooses from.
const (
	sidecarC  = "c"
	sidecarGo = "go"
)

// Names the report gives the programs it measures with: each sidecar, and
// the load generator.
var sidecarNames = map[string]string{
	sidecarC:  "meshlane test sidecar (L4, C, epoll): `hack/bench/csidecar`, an Envoy-like L4 proxy that reads SO_ORIGINAL_DST and relays with read/write on one thread; Envoy itself is not installable here",
	sidecarGo: "meshlane test sidecar (L4, Go): `podbin sidecar --copy buffer`, an Envoy-like L4 proxy that reads SO_ORIGINAL_DST and relays; Envoy itself is not installable here",
}

const loadGenName = "wrk, run in pod A's network namespace as uid 1000 inside the bench cgroup"

// Report is results.json.
type Report struct {
	Started      time.Time `json:"started"`
	Finished     time.Time `json:"finished"`
	Interrupted  bool      `json:"interrupted"`
	Command      []string  `json:"command"`
	Config       config    `json:"config"`
	Machine      Machine   `json:"machine"`
	LoadAvgStart string    `json:"loadAvgStart"`
	LoadAvgEnd   string    `json:"loadAvgEnd"`
	Sidecar      string    `json:"sidecar"`
	LoadGen      string    `json:"loadGenerator"`
	Runs         []Run     `json:"runs"`
	Figures      []Figure  `json:"figures"`
	Problems     []string  `json:"problems,omitempty"`
}

// charts are the SVG files of a report: keep-alive requests/s and p99
// against connections, for both targets.
var charts = []struct {
	file, target, metric, title, ylabel string
	logY                                bool
}{
	{"bench-rps.svg", targetB, "requests/s", "HTTP keep-alive, pod A → pod B (same node)", "requests/s", false},
	{"bench-p99.svg", targetB, "p99", "HTTP keep-alive p99 latency, pod A → pod B", "p99 latency (µs, log scale)", true},
	{"bench-remote-rps.svg", targetR, "requests/s", "HTTP keep-alive, pod A → non-meshed pod R", "requests/s", false},
	{"bench-remote-p99.svg", targetR, "p99", "HTTP keep-alive p99 latency, pod A → pod R", "p99 latency (µs, log scale)", true},
}

// write stores results.json, results.md and the charts in dir.
func (rep *Report) write(dir string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results.json: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results.json: %w", err)
	}
	var written []string
	for _, c := range charts {
		chart := rep.chart(c.target, c.metric, c.title, c.ylabel)
		chart.LogY = c.logY
		if len(chart.Series) == 0 {
			continue
		}
		svg, err := chart.SVG()
		if err != nil {
			return fmt.Errorf("%s: %w", c.file, err)
		}
		if err := os.WriteFile(filepath.Join(dir, c.file), svg, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", c.file, err)
		}
		written = append(written, c.file)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(rep.markdown(written)), 0o644); err != nil {
		return fmt.Errorf("write results.md: %w", err)
	}
	return nil
}

// chart plots a keep-alive metric against connections, one line per mode
// with at least one point.
func (rep *Report) chart(target, metric, title, ylabel string) Chart {
	c := Chart{Title: title, XLabel: "concurrent connections (log scale)", YLabel: ylabel, LogX: true}
	for _, mode := range rep.Config.Modes {
		s := Series{Name: mode}
		for _, f := range rep.Figures {
			st, ok := f.Modes[mode]
			if f.Kind != kindKeepalive || f.Target != target || f.Metric != metric || !ok {
				continue
			}
			s.Points = append(s.Points, Point{X: float64(f.Conns), Y: st.Mean, Lo: st.Min, Hi: st.Max})
		}
		if len(s.Points) > 0 {
			c.Series = append(c.Series, s)
		}
	}
	return c
}

func (rep *Report) markdown(chartFiles []string) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("# meshlane benchmark, %s", rep.Started.Format("2006-01-02 15:04 UTC"))
	p("")
	if rep.Interrupted {
		p("**Interrupted before the end: partial results.**")
		p("")
	}
	p("- command: `%s`", shellJoin(rep.Command))
	m := rep.Machine
	p("- machine: %d CPUs (%s), memory %s, kernel `%s`", m.CPUs, m.CPUModel, m.MemTotal, m.Kernel)
	p("- load average at start: %s; at end: %s; 1-minute load at the start of each run: %s", rep.LoadAvgStart, rep.LoadAvgEnd, rep.loadRange())
	p("- commit %s, %s, load generator `%s`", m.Commit, m.Go, m.Wrk)
	if len(rep.Config.workloads()) > 0 {
		rep.dataPathSection(&b, chartFiles)
	}
	if ctl := rep.controlSection(); ctl != "" {
		p("")
		b.WriteString(ctl)
	}
	if len(rep.Problems) > 0 || rep.failedRuns() > 0 {
		p("")
		p("## Problems")
		p("")
		for _, pr := range rep.Problems {
			p("- %s", pr)
		}
		for _, r := range rep.Runs {
			if r.Err != "" {
				p("- round %d, %s, %s: %s", r.Round, r.Mode, r.Workload, oneLine(r.Err))
			}
		}
	}
	return b.String()
}

// dataPathSection writes the data-path part of results.md: the run's
// set-up, the tables, the connect tax, the counters and the charts.
func (rep *Report) dataPathSection(b *strings.Builder, chartFiles []string) {
	p := func(format string, args ...any) { fmt.Fprintf(b, format+"\n", args...) }
	p("- sidecar: %s", rep.Sidecar)
	p("- load generator: %s", loadGenName)
	if tool := rep.iptablesTool(); tool != "" {
		p("- iptables mode: Istio-style nat rules (IPv4) loaded with `%s` in pods A and B", tool)
	}
	c := rep.Config
	p("- meshlane's inbound steering on each meshed pod (its eth0 with tcx or tc, its network namespace with sk_lookup): --inbound-hooks %s", inboundFlag(c.Inbound))
	p("- %d round(s) of %s per run, modes rotated each round (%s); warm-up %s per mode", c.Rounds, c.Duration, strings.Join(c.Modes, ", "), c.Warmup)
	if rep.wrkRunsAccounted() {
		p("- the kernel's BPF run-time accounting on during every run: its clock reads slow the meshlane modes' programs, which the other modes do not have")
	} else {
		p("- the kernel's BPF run-time accounting on during the connect-tax runs only (which take its cost off); wrk runs go without it, as the modes without programs do")
	}
	p("")
	p("Cells: mean (min–max) over the good rounds; below, the ratio of the means to iptables and to direct measured in this same run.")
	p("")
	rep.table(b, tableMain)
	if tax := rep.connectTax(); tax != "" {
		p("")
		p("## Connect tax on non-meshed pods")
		p("")
		p("%s", tax)
	}
	p("")
	p("## Where the CPU went")
	p("")
	p("Machine idle share during each run (from /proc/stat, all CPUs, other users of the machine included) and CPU time per request of each process group of the bench cgroup (cgroup cpu.stat; softirq work is charged to whichever process was running).")
	p("")
	rep.table(b, tableCPU)
	if rep.Config.Profile {
		p("")
		p("## Where the CPU went, by kernel path (perf)")
		p("")
		p("Every measured wrk run sampled machine-wide by `perf record -e cpu-clock -F %d -a -g`; a sample of a process outside the bench (not wrk, the sidecars, the app servers or a kernel thread) counts as such, any other is put on the path of the innermost frame of its call chain that belongs to one (a conntrack lookup inside tcp_sendmsg is netfilter, a wake-up inside the sockmap's sendmsg is the scheduler). µs of CPU per request: samples × 1/%d s ÷ requests. `logs/*-perf.txt` has each run's top functions.", perfHz, perfHz)
		p("")
		rep.table(b, tablePerf)
	}
	if counters := rep.counterTotals(); len(counters) > 0 {
		p("")
		p("## Datapath counters, summed over the measured runs")
		p("")
		var modes []string
		for _, mode := range rep.Config.Modes {
			if _, ok := counters[mode]; ok {
				modes = append(modes, mode)
			}
		}
		p("| counter | %s |", strings.Join(modes, " | "))
		p("|---|%s", strings.Repeat("---:|", len(modes)))
		names := map[string]bool{}
		for _, c := range counters {
			for k, v := range c {
				if v > 0 {
					names[k] = true
				}
			}
		}
		for _, name := range sortedKeys(names) {
			row := "| " + name + " |"
			for _, mode := range modes {
				row += fmt.Sprintf(" %d |", counters[mode][name])
			}
			p("%s", row)
		}
	}
	if len(chartFiles) > 0 {
		p("")
		p("## Charts")
		p("")
		for _, f := range chartFiles {
			p("![%s](%s)", f, f)
		}
	}
}

// wrkRunsAccounted reports whether the wrk runs had the kernel's BPF
// run-time accounting on: --bpf-stats, or a run from before the flag.
func (rep *Report) wrkRunsAccounted() bool {
	for _, r := range rep.Runs {
		if r.Wrk != nil && r.Programs != nil {
			return true
		}
	}
	return false
}

// table writes one of the report's tables; only the main one has ratios.
func (rep *Report) table(b *strings.Builder, t table) {
	modes := rep.Config.Modes
	cpu := t != tableMain
	fmt.Fprintf(b, "| figure | %s |\n|---|%s\n", strings.Join(modes, " | "), strings.Repeat("---:|", len(modes)))
	for _, f := range rep.Figures {
		if f.Table != t || f.Kind == kindControl {
			continue
		}
		row := fmt.Sprintf("| %s: %s (%s%s) |", f.Workload, f.Metric, f.Unit, betterHint(f.LowerWins))
		for _, mode := range modes {
			// A mode without figures has no ratios either.
			cell := statCell(f.Modes, mode)
			var ratios []string
			if mode != modeIptables && !cpu {
				if r, ok := f.VsIptables[mode]; ok {
					ratios = append(ratios, fmt.Sprintf("%.2f× ipt", r))
				}
			}
			if mode != modeDirect && !cpu {
				if r, ok := f.VsDirect[mode]; ok {
					ratios = append(ratios, fmt.Sprintf("%.2f× direct", r))
				}
			}
			if len(ratios) > 0 {
				cell += "<br>" + strings.Join(ratios, ", ")
			}
			row += " " + cell + " |"
		}
		b.WriteString(row + "\n")
	}
}

func betterHint(lowerWins bool) string {
	if lowerWins {
		return ", lower is better"
	}
	return ""
}

// connectTax compares, for the connect+close loop between non-meshed pods,
// the run time the kernel measured for the attached programs with the
// wall time of a cycle with no programs attached (modes direct and
// iptables): exact where the wall-time difference drowns in noise.
//
// The kernel's accounting adds its own clock read to every run it times;
// no-op programs on the same hooks measure that cost in the same runs, and
// the second figure takes it off. Neither counts the kernel's dispatch to
// the programs, which no-op and datapath programs pay alike; the paired
// probe's figure does.
func (rep *Report) connectTax() string {
	var cycle, bpf, net *Figure
	for i, f := range rep.Figures {
		if f.Kind != kindConnect {
			continue
		}
		switch f.Metric {
		case "connect+close":
			cycle = &rep.Figures[i]
		case "BPF run time per request":
			bpf = &rep.Figures[i]
		case metricBPFNet:
			net = &rep.Figures[i]
		}
	}
	if cycle == nil || bpf == nil {
		return ""
	}
	var detached []float64
	for _, mode := range []string{modeDirect, modeIptables} {
		detached = append(detached, cycle.Modes[mode].Values...)
	}
	if len(detached) == 0 {
		return ""
	}
	base := summarize(detached).Mean
	var lines []string
	lines = append(lines, fmt.Sprintf("A connect+close cycle with no programs attached (direct and iptables runs together) took %s ns on average.", fmtValue(base)))
	for _, mode := range rep.Config.Modes {
		s, ok := bpf.Modes[mode]
		if !ok {
			continue
		}
		line := fmt.Sprintf("- %s: the programs ran %s ns per connect (%s–%s) by the kernel's accounting, a tax of %.2f%% on that cycle",
			mode, fmtValue(s.Mean), fmtValue(s.Min), fmtValue(s.Max), 100*s.Mean/base)
		if net != nil {
			if n, ok := net.Modes[mode]; ok {
				line += fmt.Sprintf("; less the accounting's own cost (no-op programs on the same hooks, same runs) %s ns (%s–%s), %.2f%%",
					fmtValue(n.Mean), fmtValue(n.Min), fmtValue(n.Max), 100*n.Mean/base)
			}
		}
		lines = append(lines, line+fmt.Sprintf("; wall time per cycle %s ns.", fmtValue(cycle.Modes[mode].Mean)))
		var ratios, podRatios []float64
		for _, r := range rep.Runs {
			if r.Mode == mode && r.Kind == kindConnect && r.Err == "" && r.AB != nil && r.ABPod != nil {
				ratios = append(ratios, r.AB.Ratios...)
				podRatios = append(podRatios, r.ABPod.Ratios...)
			}
		}
		if pct, se, ok := pairedTax(ratios); ok {
			lines = append(lines, fmt.Sprintf("  Paired in one process (probe and listener pinned to one CPU, the programs attached and detached between slices of %s, %d pairs over the rounds, the kernel's accounting off): with the programs on the probe's own cgroup, as `--cgroup-scope node` puts them on every process below its cgroup, they add **%.1f %% ± %.1f** (2 standard errors, trimmed mean) to a connect+close, the kernel's dispatch to them included.",
				abSlice, len(ratios), pct, se))
		}
		if pct, se, ok := pairedTax(podRatios); ok {
			lines = append(lines, fmt.Sprintf("  With the programs on another cgroup only, as `--cgroup-scope pod` puts them on meshed pods' cgroups while the probe plays a pod that is not meshed (%d pairs): **%+.1f %% ± %.1f**, what the kernel's hooks cost once some cgroup has a program.",
				len(podRatios), pct, se))
		}
	}
	return strings.Join(lines, "\n")
}

// counterTotals sums each meshlane mode's counter increments over its good
// measured runs.
func (rep *Report) counterTotals() map[string]map[string]uint64 {
	out := map[string]map[string]uint64{}
	for _, r := range rep.Runs {
		if r.Counters == nil || r.Err != "" {
			continue
		}
		if out[r.Mode] == nil {
			out[r.Mode] = map[string]uint64{}
		}
		for k, v := range r.Counters {
			out[r.Mode][k] += v
		}
	}
	return out
}

// loadRange is the lowest and highest 1-minute load average seen at the
// start of a run.
func (rep *Report) loadRange() string {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, r := range rep.Runs {
		f := strings.Fields(r.LoadAvg)
		if len(f) == 0 {
			continue
		}
		if v, err := strconv.ParseFloat(f[0], 64); err == nil {
			lo, hi = min(lo, v), max(hi, v)
		}
	}
	if lo > hi {
		return "unknown"
	}
	return fmt.Sprintf("%.2f to %.2f", lo, hi)
}

func (rep *Report) iptablesTool() string {
	for _, r := range rep.Runs {
		if r.Iptables != "" {
			return r.Iptables
		}
	}
	return ""
}

func (rep *Report) failedRuns() int {
	n := 0
	for _, r := range rep.Runs {
		if r.Err != "" {
			n++
		}
	}
	return n
}

// fmtValue prints three significant digits or so: 22912 is "22.9k".
func fmtValue(v float64) string {
	switch a := max(v, -v); {
	case a >= 1e5:
		return fmt.Sprintf("%.0fk", v/1e3)
	case a >= 1e4:
		return fmt.Sprintf("%.1fk", v/1e3)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// shellJoin quotes args the way a shell would need them.
func shellJoin(args []string) string {
	var out []string
	for _, a := range args {
		if a != "" && !strings.ContainsAny(a, " \t\n'\"\\$`*?[]{}()<>|&;#~!") {
			out = append(out, a)
			continue
		}
		out = append(out, "'"+strings.ReplaceAll(a, "'", `'\''`)+"'")
	}
	return strings.Join(out, " ")
}
