package main

import (
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	var v []float64
	for i := 100; i >= 1; i-- { // unsorted on purpose
		v = append(v, float64(i))
	}
	for _, c := range []struct{ p, want float64 }{{50, 50}, {90, 90}, {99, 99}, {100, 100}, {0.5, 1}} {
		if got := percentile(v, c.p); got != c.want {
			t.Errorf("p%g of 1..100 = %g, want %g", c.p, got, c.want)
		}
	}
	if v[0] != 100 {
		t.Fatal("percentile sorted its input in place")
	}
	// Nearest rank over 500 calls: p99 is the 495th smallest, so the five
	// slowest calls do not move it and a sixth does.
	var calls []float64
	for i := range 500 {
		calls = append(calls, float64(i+1))
	}
	if got := percentile(calls, 99); got != 495 {
		t.Fatalf("p99 of 1..500 = %g, want 495", got)
	}
	if got := percentile([]float64{7}, 99); got != 7 {
		t.Fatalf("p99 of one call = %g, want 7", got)
	}
}

func TestParseProcStatus(t *testing.T) {
	status := "Name:\tmeshlane-agent\nVmPeak:\t 1787588 kB\nVmHWM:\t   20992 kB\nVmRSS:\t   19764 kB\nThreads:\t9\n"
	m, err := parseProcStatus(status)
	if err != nil {
		t.Fatal(err)
	}
	if m.RSS != 19764<<10 || m.HWM != 20992<<10 {
		t.Fatalf("got RSS %d HWM %d bytes, want %d and %d", m.RSS, m.HWM, 19764<<10, 20992<<10)
	}
	// A zombie has no memory lines; a unit other than kB is not guessed at.
	for _, bad := range []string{"Name:\tx\nState:\tZ (zombie)\n", "VmHWM:\t1 kB\nVmRSS:\t2 MB\n", "VmHWM:\t1 kB\nVmRSS:\tx kB\n"} {
		if _, err := parseProcStatus(bad); err == nil {
			t.Errorf("parseProcStatus(%q) accepted it", bad)
		}
	}
}

func TestParseProcStatTicks(t *testing.T) {
	// The command name may hold spaces and parentheses; utime and stime
	// are fields 14 and 15.
	stat := "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 269 0 0 20 0 9 0 12345 1787588 4941 18446744073709551615\n"
	ticks, err := parseProcStatTicks(stat)
	if err != nil {
		t.Fatal(err)
	}
	if ticks != 731+269 {
		t.Fatalf("ticks %d, want %d", ticks, 731+269)
	}
	for _, bad := range []string{"4242 agent S 1", "4242 (agent) S 1 2 3", "4242 (agent) S 1 4242 4242 0 -1 4194560 1200 0 0 0 x 269"} {
		if _, err := parseProcStatTicks(bad); err == nil {
			t.Errorf("parseProcStatTicks(%q) accepted it", bad)
		}
	}
}

// CPU times must come out in real units: this process, spinning, sees its
// CPU time grow past zero, and stay below its wall time on every CPU.
func TestReadProcCPUSelf(t *testing.T) {
	start := time.Now()
	deadline := start.Add(10 * time.Second)
	for {
		spin := time.Now().Add(10 * time.Millisecond)
		for time.Now().Before(spin) {
		}
		cpu, err := readProcCPU(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if limit := time.Duration(runtime.NumCPU()) * time.Since(start); cpu > limit+time.Second {
			t.Fatalf("own CPU time %s, more than %s of wall time on every CPU: tick rate misread?", cpu, limit)
		}
		if cpu > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("own CPU time still 0 after 10 s of spinning")
		}
	}
}

func TestPrefixBitsFor(t *testing.T) {
	for _, c := range []struct{ pods, bits int }{{1, 24}, {50, 24}, {253, 24}, {254, 23}, {500, 23}, {509, 23}, {510, 22}, {maxPods, 22}} {
		if got := prefixBitsFor(c.pods); got != c.bits {
			t.Errorf("%d pods: /%d, want /%d", c.pods, got, c.bits)
		}
	}
}

func ctlRun(round int, mode string, add, del []float64, agent *AgentUsage, err string) Run {
	return Run{Round: round, Mode: mode, Kind: kindControl, Workload: controlName(len(add)), Err: err,
		Control: &ControlResult{Pods: len(add), AddMs: add, DelMs: del, Agent: agent}}
}

// figureNamed returns the figure of that metric, failing the test without
// one.
func figureNamed(t *testing.T, figs []Figure, metric string) Figure {
	t.Helper()
	i := slices.IndexFunc(figs, func(f Figure) bool { return f.Metric == metric })
	if i < 0 {
		t.Fatalf("no figure %q in %+v", metric, figs)
	}
	return figs[i]
}

// meshlaneOnly checks a figure only primary+meshlane has, with no
// difference between the modes, and its mean.
func meshlaneOnly(t *testing.T, f Figure, mean float64) {
	t.Helper()
	if _, ok := f.Modes[modePrimary]; ok || f.Added != nil {
		t.Fatalf("%s has a baseline or a difference: %+v", f.Metric, f)
	}
	if s := f.Modes[modePrimaryMeshlane]; s.Mean != mean {
		t.Fatalf("%s %+v, want mean %g", f.Metric, s, mean)
	}
}

// The added latency pairs the modes within each round, failed runs do not
// count, and agent figures exist only where an agent ran.
func TestControlFigures(t *testing.T) {
	agent := &AgentUsage{RSSIdle: 10 * mib, RSSPods: 20 * mib, HWMPods: 21 * mib, CPUMs: 300}
	runs := []Run{
		ctlRun(0, modePrimary, []float64{1, 2, 3, 4}, []float64{5, 5, 5, 5}, nil, ""),
		ctlRun(0, modePrimaryMeshlane, []float64{2, 4, 6, 8}, []float64{6, 6, 6, 6}, agent, ""),
		ctlRun(1, modePrimaryMeshlane, []float64{3, 5, 7, 9}, []float64{7, 7, 7, 7}, agent, ""),
		ctlRun(1, modePrimary, []float64{2, 3, 4, 5}, []float64{5, 5, 5, 5}, nil, ""),
		// Round 2's baseline failed: its meshlane run counts for its own
		// figures but has nothing to be paired with.
		ctlRun(2, modePrimary, []float64{100, 100, 100, 100}, nil, nil, "CNI ADD failed"),
		ctlRun(2, modePrimaryMeshlane, []float64{4, 6, 8, 10}, []float64{8, 8, 8, 8}, agent, ""),
	}
	figs := controlFigures(runs, 4)
	get := func(metric string) Figure { return figureNamed(t, figs, metric) }
	p50 := get("CNI ADD p50")
	if s := p50.Modes[modePrimary]; s.N != 2 || s.Mean != 2.5 {
		t.Fatalf("primary ADD p50 %+v: want the 2 good rounds, mean 2.5", s)
	}
	if s := p50.Modes[modePrimaryMeshlane]; s.N != 3 || s.Mean != 5 {
		t.Fatalf("meshlane ADD p50 %+v: want 3 rounds, mean 5", s)
	}
	if a := p50.Added; a == nil || a.N != 2 || !slices.Equal(a.Values, []float64{2, 2}) {
		t.Fatalf("added ADD p50 %+v: want 4-2 and 5-3 from rounds 0 and 1", a)
	}
	if a := get("CNI DEL max").Added; a == nil || !slices.Equal(a.Values, []float64{1, 2}) {
		t.Fatalf("added DEL max %+v", a)
	}
	meshlaneOnly(t, get("agent RSS, 4 pods"), 20)
	if s := get("agent CPU time, 4 ADDs + 4 DELs").Modes[modePrimaryMeshlane]; s.Mean != 300 {
		t.Fatalf("agent CPU %+v, want 300 ms", s)
	}
	if figs := controlFigures(runs, 5); figs != nil {
		t.Fatalf("figures for a pod count no run had: %+v", figs)
	}
}

// Each plugin's own time gets its percentiles per run, in the modes whose
// chain ran it; no difference between modes is made of it.
func TestControlPluginFigures(t *testing.T) {
	base := ctlRun(0, modePrimary, []float64{5, 6, 7, 8}, []float64{5, 5, 5, 5}, nil, "")
	base.Control.PluginAddMs = map[string][]float64{"bridge": {4, 5, 6, 7}}
	meshed := ctlRun(0, modePrimaryMeshlane, []float64{8, 9, 10, 30}, []float64{6, 6, 6, 6}, nil, "")
	meshed.Control.PluginAddMs = map[string][]float64{"bridge": {4, 5, 6, 7}, "meshlane-cni": {3, 1, 2, 22}}
	meshed.Control.PluginDelMs = map[string][]float64{"meshlane-cni": {1, 1, 1, 1}}
	figs := controlFigures([]Run{base, meshed}, 4)
	get := func(metric string) Figure { return figureNamed(t, figs, metric) }
	meshlaneOnly(t, get("CNI ADD p50, meshlane-cni's own process"), 2)
	if s := get("CNI ADD p99, meshlane-cni's own process").Modes[modePrimaryMeshlane]; s.Mean != 22 {
		t.Fatalf("meshlane-cni ADD p99 %+v, want 22", s)
	}
	if s := get("CNI ADD p50, bridge's own process").Modes; s[modePrimary].Mean != 5 || s[modePrimaryMeshlane].Mean != 5 {
		t.Fatalf("bridge ADD p50 %+v, want 5 in both modes", s)
	}
	if s := get("CNI DEL p50, bridge's own process").Modes; len(s) != 0 {
		t.Fatalf("bridge DEL p50 %+v from runs that timed no bridge DEL", s)
	}
}

func TestParseFlagsPods(t *testing.T) {
	for _, c := range []struct {
		args []string
		pods int
	}{{nil, 500}, {[]string{"--quick"}, 50}, {[]string{"--quick", "--pods", "7"}, 7}, {[]string{"--pods", "1000"}, 1000}} {
		cfg, err := parseFlags(c.args)
		if err != nil {
			t.Fatalf("%q: %v", c.args, err)
		}
		if cfg.Pods != c.pods {
			t.Errorf("%q: %d pods, want %d", c.args, cfg.Pods, c.pods)
		}
		if !slices.Contains(cfg.Kinds, kindControl) {
			t.Errorf("%q: the control workload is not in the default set %v", c.args, cfg.Kinds)
		}
	}
	for _, bad := range [][]string{{"--pods", "0"}, {"--pods", "1001"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// A control-only run has no data-path phase, no data-path tables and
// still its own section; a full run has both phases, control last.
func TestControlOnlyReport(t *testing.T) {
	cfg, err := parseFlags([]string{"--workloads", "control", "--pods", "4"})
	if err != nil {
		t.Fatal(err)
	}
	if wls := cfg.workloads(); len(wls) != 0 {
		t.Fatalf("control only, yet data-path workloads %+v", wls)
	}
	if ph := cfg.phases(nil); len(ph) != 1 || !slices.Equal(ph[0].modes, controlModes) {
		t.Fatalf("phases %+v, want the control modes alone", ph)
	}
	full, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if ph := full.phases(nil); len(ph) != 2 || !slices.Equal(ph[0].modes, allModes) || !slices.Equal(ph[1].modes, controlModes) {
		t.Fatalf("default phases %+v: want data path then control", ph)
	}

	agent := &AgentUsage{RSSIdle: 10 * mib, RSSPods: 20 * mib, HWMPods: 21 * mib, CPUMs: 300}
	rep := &Report{Config: cfg, Runs: []Run{
		ctlRun(0, modePrimary, []float64{1, 2, 3, 4}, []float64{5, 5, 5, 5}, nil, ""),
		ctlRun(0, modePrimaryMeshlane, []float64{2, 4, 6, 8}, []float64{6, 6, 6, 6}, agent, ""),
	}}
	rep.Figures = cfg.figures(rep.Runs)
	md := rep.markdown(nil)
	for _, want := range []string{"## Control path", "| figure | primary | primary+meshlane | added by meshlane |", "| CNI ADD p99 (ms, lower is better) | 4.00 | 8.00 | 4.00 |", "| agent RSS, 4 pods (MiB, lower is better) | – | 20.0 | |"} {
		if !strings.Contains(md, want) {
			t.Errorf("results.md lacks %q:\n%s", want, md)
		}
	}
	for _, unwanted := range []string{"Where the CPU went", "sidecar:", "× ipt"} {
		if strings.Contains(md, unwanted) {
			t.Errorf("control-only results.md has data-path text %q:\n%s", unwanted, md)
		}
	}
}
