package main

import (
	"math"
	"slices"
)

// Stat summarizes one figure of one mode over the rounds.
type Stat struct {
	N      int       `json:"n"`
	Mean   float64   `json:"mean"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	Stddev float64   `json:"stddev"` // sample standard deviation; 0 for one value
	Values []float64 `json:"values"`
}

func summarize(v []float64) Stat {
	s := Stat{N: len(v), Values: slices.Clone(v)}
	if len(v) == 0 {
		return s
	}
	s.Min, s.Max = slices.Min(v), slices.Max(v)
	for _, x := range v {
		s.Mean += x
	}
	s.Mean /= float64(len(v))
	if len(v) > 1 {
		var ss float64
		for _, x := range v {
			ss += (x - s.Mean) * (x - s.Mean)
		}
		s.Stddev = math.Sqrt(ss / float64(len(v)-1))
	}
	return s
}

// Figure is one number of the report (a metric of a workload) for every
// mode, with each mode's ratio to the iptables and direct means.
type Figure struct {
	Workload   string             `json:"workload"`
	Kind       string             `json:"kind"`
	Target     string             `json:"target"`
	Conns      int                `json:"conns"`
	Metric     string             `json:"metric"`
	Unit       string             `json:"unit"`
	LowerWins  bool               `json:"lowerIsBetter"`
	Table      table              `json:"table"`
	Modes      map[string]Stat    `json:"modes"`
	VsIptables map[string]float64 `json:"ratioToIptables"`
	VsDirect   map[string]float64 `json:"ratioToDirect"`
	// Added is, for control-path latencies, what meshlane adds: the
	// primary+meshlane figure minus the primary one, per round.
	Added *Stat `json:"addedByMeshlane,omitempty"`
}

// table is the report table a figure belongs to.
type table string

const (
	tableMain table = "main" // what each mode achieved
	tableCPU  table = "cpu"  // where the CPU went, by process group
	tablePerf table = "perf" // where the CPU went, by kernel path (--profile)
)

// metric extracts one number from a good run.
type metric struct {
	name      string
	unit      string
	lowerWins bool
	table     table
	kinds     []string
	// get returns the metric, or false when the run has none (the BPF
	// run time of a mode without programs).
	get func(Run) (float64, bool)
}

// always wraps a metric every good run has.
func always(f func(Run) float64) func(Run) (float64, bool) {
	return func(r Run) (float64, bool) { return f(r), true }
}

// perCPUSecond is requests per second of CPU time that every process of
// the bench (load generator, sidecars, apps) used together: what the path
// costs, whatever share of the machine other users took meanwhile.
func perCPUSecond(r Run) (float64, bool) {
	var usec uint64
	for _, v := range r.GroupCPU {
		usec += v
	}
	if usec == 0 {
		return 0, false
	}
	return float64(r.requests()) / (float64(usec) / 1e6), true
}

// bpfPerRequest is the datapath programs' run time per request or
// connect, in ns.
func bpfPerRequest(r Run) (float64, bool) {
	if r.Programs == nil {
		return 0, false
	}
	return float64(totalRunNs(r.Programs)) / float64(r.requests()), true
}

// bpfNetPerRequest is bpfPerRequest less the accounting's own cost, as
// the no-op programs beside the datapath's measured it (connect-tax runs).
func bpfNetPerRequest(r Run) (float64, bool) {
	if r.Programs == nil || r.NoopPrograms == nil {
		return 0, false
	}
	return netRunNs(r.Programs, r.NoopPrograms) / float64(r.requests()), true
}

// pairedTax turns the paired probe's on/off ratios into the tax in per
// cent and twice its standard error: the mean of the ratios with the
// highest and lowest tenth dropped, as single slices on a shared machine
// are sometimes hit by a neighbour either way.
func pairedTax(ratios []float64) (pct, twoSE float64, ok bool) {
	s := slices.Sorted(slices.Values(ratios))
	k := len(s) / 10
	s = s[k : len(s)-k]
	if len(s) < 2 {
		return 0, 0, false
	}
	st := summarize(s)
	return 100 * (st.Mean - 1), 200 * st.Stddev / math.Sqrt(float64(len(s))), true
}

// abTax is one run's paired tax in node scope, in per cent.
func abTax(r Run) (float64, bool) { return abPct(r.AB) }

// abPodTax is one run's paired tax on a pod that is not meshed, in pod
// scope, in per cent.
func abPodTax(r Run) (float64, bool) { return abPct(r.ABPod) }

func abPct(ab *ABResult) (float64, bool) {
	if ab == nil {
		return 0, false
	}
	pct, _, ok := pairedTax(ab.Ratios)
	return pct, ok
}

func us(d float64) float64 { return d / 1e3 } // ns to µs

// perRequest is a process group's CPU time per request or connect, in µs.
func perRequest(groups ...string) func(Run) (float64, bool) {
	return always(func(r Run) float64 {
		var sum uint64
		for _, g := range groups {
			sum += r.GroupCPU[g]
		}
		return float64(sum) / float64(r.requests())
	})
}

// metricBPFNet names the connect-tax figure net of the accounting's cost.
const metricBPFNet = "BPF run time per request, less the accounting's own cost"

// metricPairedTax names the paired probe's figure: how much longer a
// connect+close took with the programs attached than without.
const metricPairedTax = "connect+close time added by the programs, paired slices"

// metricPairedTaxPod is the same with the programs on another cgroup, as
// --cgroup-scope pod leaves a pod that is not meshed.
const metricPairedTaxPod = "connect+close time added to a pod that is not meshed, pod scope, paired slices"

var (
	wrkKinds = []string{kindKeepalive, kindClose, kindBulk}
	metrics  = []metric{
		{"requests/s", "req/s", false, tableMain, []string{kindKeepalive}, always(func(r Run) float64 { return r.Wrk.RequestsSec })},
		{"connections/s", "conn/s", false, tableMain, []string{kindClose}, always(func(r Run) float64 { return r.Wrk.RequestsSec })},
		{"throughput", "MB/s", false, tableMain, []string{kindBulk}, always(func(r Run) float64 { return r.Wrk.BytesSec / 1e6 })},
		{"p50", "µs", true, tableMain, []string{kindKeepalive}, always(func(r Run) float64 { return us(float64(r.Wrk.P50)) })},
		{"p90", "µs", true, tableMain, []string{kindKeepalive}, always(func(r Run) float64 { return us(float64(r.Wrk.P90)) })},
		{"p99", "µs", true, tableMain, []string{kindKeepalive, kindClose}, always(func(r Run) float64 { return us(float64(r.Wrk.P99)) })},
		{"connect+close", "ns", true, tableMain, []string{kindConnect}, always(func(r Run) float64 { return r.Connect.NsPerConnect })},
		{"requests per CPU-second of the bench cgroup", "req/CPU-s", false, tableMain, wrkKinds, perCPUSecond},
		{"BPF run time per request", "ns", true, tableMain, slices.Concat(wrkKinds, []string{kindConnect}), bpfPerRequest},
		{metricBPFNet, "ns", true, tableMain, []string{kindConnect}, bpfNetPerRequest},
		{metricPairedTax, "%", true, tableMain, []string{kindConnect}, abTax},
		{metricPairedTaxPod, "%", true, tableMain, []string{kindConnect}, abPodTax},
		{"machine idle", "%", false, tableCPU, slices.Concat(wrkKinds, []string{kindConnect}), always(func(r Run) float64 { return r.CPU.Idle })},
		{"CPU/req load generator", "µs", true, tableCPU, wrkKinds, perRequest(groupLoad)},
		{"CPU/req sidecars", "µs", true, tableCPU, wrkKinds, perRequest(groupSidecarA, groupSidecarB)},
		{"CPU/req app servers", "µs", true, tableCPU, slices.Concat(wrkKinds, []string{kindConnect}), perRequest(groupApps)},
		{"CPU/connect client", "µs", true, tableCPU, []string{kindConnect}, perRequest(groupLoad)},
	}
)

// perfMetrics are, for runs sampled with --profile, the CPU time per
// request each kernel path took (idle excluded): samples × the sampling
// period, machine-wide.
func perfMetrics() []metric {
	var out []metric
	for _, path := range profilePaths {
		if path == pathIdle {
			continue
		}
		out = append(out, metric{name: "CPU/req " + path, unit: "µs", lowerWins: true, table: tablePerf, kinds: wrkKinds,
			get: func(r Run) (float64, bool) {
				if r.Profile == nil {
					return 0, false
				}
				return float64(r.Profile.Paths[path]) * 1e6 / float64(r.Profile.Hz) / float64(r.requests()), true
			}})
	}
	return out
}

// figures turns the good runs into figures, in workload order then
// metric order. Runs with an Err do not count.
func figures(runs []Run, wls []workload, modes []string) []Figure {
	var out []Figure
	all := slices.Concat(metrics, perfMetrics())
	for _, wl := range wls {
		for _, m := range all {
			if !slices.Contains(m.kinds, wl.Kind) {
				continue
			}
			f := Figure{Workload: wl.Name(), Kind: wl.Kind, Target: wl.Target, Conns: wl.Conns,
				Metric: m.name, Unit: m.unit, LowerWins: m.lowerWins, Table: m.table,
				Modes: map[string]Stat{}, VsIptables: map[string]float64{}, VsDirect: map[string]float64{}}
			for _, mode := range modes {
				var vals []float64
				for _, r := range runs {
					if r.Err != "" || r.Mode != mode || r.Workload != f.Workload {
						continue
					}
					if v, ok := m.get(r); ok {
						vals = append(vals, v)
					}
				}
				if len(vals) > 0 {
					f.Modes[mode] = summarize(vals)
				}
			}
			for mode, s := range f.Modes {
				if base, ok := f.Modes[modeIptables]; ok && base.Mean != 0 {
					f.VsIptables[mode] = s.Mean / base.Mean
				}
				if base, ok := f.Modes[modeDirect]; ok && base.Mean != 0 {
					f.VsDirect[mode] = s.Mean / base.Mean
				}
			}
			// A metric no run has (BPF run time without the accounting,
			// kernel paths without --profile) makes no row.
			if len(f.Modes) > 0 {
				out = append(out, f)
			}
		}
	}
	return out
}
