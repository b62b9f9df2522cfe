package main

import (
	"math"
	"slices"
	"testing"
)

func TestSummarize(t *testing.T) {
	s := summarize([]float64{2, 4, 4, 4, 5, 5, 7, 9})
	if s.N != 8 || s.Mean != 5 || s.Min != 2 || s.Max != 9 {
		t.Fatalf("summary %+v", s)
	}
	// Sample standard deviation: sqrt(32/7).
	if math.Abs(s.Stddev-math.Sqrt(32.0/7)) > 1e-12 {
		t.Fatalf("stddev %g, want %g", s.Stddev, math.Sqrt(32.0/7))
	}
	if one := summarize([]float64{3}); one.Stddev != 0 || one.Mean != 3 {
		t.Fatalf("one value: %+v", one)
	}
}

// figures must average per mode, leave failed runs out and divide by the
// iptables and direct means of the same workload.
func TestFigures(t *testing.T) {
	wl := workload{Kind: kindKeepalive, Target: targetB, Conns: 8}
	run := func(mode string, rps float64, err string) Run {
		return Run{Mode: mode, Workload: wl.Name(), Kind: wl.Kind, Err: err,
			Wrk: &WrkResult{Requests: 1, RequestsSec: rps}}
	}
	runs := []Run{
		run(modeDirect, 50, ""), run(modeDirect, 70, ""),
		run(modeIptables, 20, ""), run(modeIptables, 30, ""),
		run(modeMeshlane, 40, ""), run(modeMeshlane, 60, ""), run(modeMeshlane, 1e9, "wrk counted errors"),
	}
	figs := figures(runs, []workload{wl}, []string{modeDirect, modeIptables, modeMeshlane, modeSockmap})
	i := slices.IndexFunc(figs, func(f Figure) bool { return f.Metric == "requests/s" })
	if i < 0 {
		t.Fatalf("no requests/s figure in %+v", figs)
	}
	f := figs[i]
	if m := f.Modes[modeMeshlane]; m.N != 2 || m.Mean != 50 {
		t.Fatalf("meshlane %+v: want the 2 good runs, mean 50", m)
	}
	if _, ok := f.Modes[modeSockmap]; ok {
		t.Fatal("a mode without runs has a figure")
	}
	if f.VsIptables[modeMeshlane] != 2 || f.VsDirect[modeMeshlane] != 50.0/60 || f.VsIptables[modeIptables] != 1 {
		t.Fatalf("ratios to iptables %v, to direct %v", f.VsIptables, f.VsDirect)
	}
}

func TestRotate(t *testing.T) {
	modes := []string{"a", "b", "c"}
	for round, want := range [][]string{{"a", "b", "c"}, {"b", "c", "a"}, {"c", "a", "b"}, {"a", "b", "c"}} {
		if got := rotate(modes, round); !slices.Equal(got, want) {
			t.Errorf("round %d: %v, want %v", round, got, want)
		}
	}
	if !slices.Equal(modes, []string{"a", "b", "c"}) {
		t.Fatalf("rotate changed its input: %v", modes)
	}
}

// The accounting's cost per run, as each hook's no-op measured it, comes
// off every datapath run on that hook; programs on hooks without a no-op
// keep their whole run time.
func TestNetRunNs(t *testing.T) {
	progs := map[string]ProgStat{
		"connect4": {Runs: 10, RunNs: 1200},
		"sockops":  {Runs: 90, RunNs: 5400},
		"sendmsg4": {Runs: 2, RunNs: 300},
	}
	noops := map[string]ProgStat{
		"connect4": {Runs: 10, RunNs: 500},  // 50 ns a run
		"sockops":  {Runs: 90, RunNs: 4050}, // 45 ns a run
	}
	if got, want := netRunNs(progs, noops), float64(1200-500+5400-4050+300); got != want {
		t.Fatalf("net run time %g ns, want %g", got, want)
	}
	r := Run{Kind: kindConnect, Connect: &ConnectResult{Connects: 10}, Programs: progs, NoopPrograms: noops}
	if got, ok := bpfNetPerRequest(r); !ok || got != 235 {
		t.Fatalf("net per connect %g (%v), want 235", got, ok)
	}
	if got, ok := bpfPerRequest(r); !ok || got != 690 {
		t.Fatalf("gross per connect %g (%v), want 690", got, ok)
	}
	r.NoopPrograms = nil
	if _, ok := bpfNetPerRequest(r); ok {
		t.Fatal("a net figure from a run without no-op programs")
	}
}

// The paired tax drops the highest and lowest tenth of the ratios, so one
// slice hit by a neighbour does not move it.
func TestPairedTax(t *testing.T) {
	ratios := []float64{3.0, 0.2} // the outliers, one each way
	for range 9 {
		ratios = append(ratios, 1.01, 1.03)
	}
	pct, se, ok := pairedTax(ratios)
	if !ok || math.Abs(pct-2) > 1e-9 {
		t.Fatalf("tax %g%% (%v), want 2%%: the outliers were not dropped", pct, ok)
	}
	if se <= 0 || se > 1.1 {
		t.Fatalf("2 s.e. %g points, want about 0.9", se)
	}
	if _, _, ok := pairedTax([]float64{1.02}); ok {
		t.Fatal("a tax from a single pair")
	}
	if got, ok := abTax(Run{AB: &ABResult{Ratios: ratios}}); !ok || math.Abs(got-2) > 1e-9 {
		t.Fatalf("abTax %g (%v), want 2", got, ok)
	}
}
