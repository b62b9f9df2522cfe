package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/meshlane/meshlane/test/testenv"
)

// Workload kinds.
const (
	kindKeepalive = "keepalive" // HTTP keep-alive, wrk
	kindClose     = "close"     // a new connection per request, wrk
	kindBulk      = "bulk"      // one connection fetching a large body, wrk
	kindConnect   = "connect"   // connect+close loop between non-meshed pods
)

// Targets: the pod an app in A talks to (C talks to R for the connect tax).
const (
	targetB = "B" // same node, meshed in sidecar modes
	targetR = "R" // never meshed: only A's sidecar is in the path
)

// workload is one measurement, run once per mode and round.
type workload struct {
	Kind   string
	Target string
	Conns  int
	// Warmup marks the unrecorded run that precedes a mode's measurements.
	Warmup bool
}

// Name labels the workload in reports, e.g. "keep-alive A→B, 8 conns".
func (w workload) Name() string {
	switch w.Kind {
	case kindKeepalive:
		return fmt.Sprintf("keep-alive A→%s, %d conns", w.Target, w.Conns)
	case kindClose:
		return fmt.Sprintf("new conn per request A→%s, %d conns", w.Target, w.Conns)
	case kindBulk:
		return fmt.Sprintf("bulk A→%s, %d conn", w.Target, w.Conns)
	}
	return "connect+close C→R (non-meshed)"
}

// slug names the workload's log files.
func (w workload) slug() string {
	s := fmt.Sprintf("%s-%s-c%d", w.Kind, strings.ToLower(w.Target), w.Conns)
	if w.Warmup {
		s = "warmup-" + s
	}
	return s
}

// Run is one measurement as recorded in results.json.
type Run struct {
	Round    int       `json:"round"`
	Mode     string    `json:"mode"`
	Workload string    `json:"workload"`
	Kind     string    `json:"kind"`
	Target   string    `json:"target"`
	Conns    int       `json:"conns"`
	Start    time.Time `json:"start"`
	// Wrk and WrkOutput are set for wrk workloads, Connect for the
	// connect tax, Control for the control path.
	Wrk       *WrkResult     `json:"wrk,omitempty"`
	WrkOutput string         `json:"wrkOutput,omitempty"`
	Connect   *ConnectResult `json:"connect,omitempty"`
	// AB is the paired connect-tax probe's result (meshlane modes) with the
	// programs on the probe's own cgroup, as node scope puts them on every
	// process; ABPod with the programs on another cgroup only, as pod scope
	// puts them on meshed pods and the probe plays a pod that is not.
	AB      *ABResult      `json:"ab,omitempty"`
	ABPod   *ABResult      `json:"abPod,omitempty"`
	Control *ControlResult `json:"control,omitempty"`
	// CPU is the machine's CPU split during the run; GroupCPU the CPU time
	// (µs) each process group of the bench cgroup used.
	CPU      CPUShare          `json:"cpu"`
	GroupCPU map[string]uint64 `json:"groupCpuUsec"`
	// Counters are the datapath's counter increments and Programs its
	// programs' runs and run time (meshlane modes).
	Counters map[string]uint64   `json:"counters,omitempty"`
	Programs map[string]ProgStat `json:"programs,omitempty"`
	// NoopPrograms are the do-nothing programs' runs and run time, on
	// the same hooks as the datapath's during a connect-tax run: the
	// accounting's own cost (see attachNoops).
	NoopPrograms map[string]ProgStat `json:"noopPrograms,omitempty"`
	// Profile is where the machine's CPU went during the run, by kernel
	// path, with --profile (wrk runs).
	Profile *Profile `json:"profile,omitempty"`
	// Err says why the run does not count; empty for a good run.
	Err string `json:"err,omitempty"`
	// Iptables names the iptables-restore that loaded the rules.
	Iptables string `json:"iptables,omitempty"`
	// LoadAvg is /proc/loadavg at the start: the machine is shared.
	LoadAvg string `json:"loadAvg"`
}

// requests is how many requests or connects the run completed.
func (r Run) requests() int64 {
	switch {
	case r.Wrk != nil:
		return r.Wrk.Requests
	case r.Connect != nil:
		return r.Connect.Connects
	}
	return 0
}

// snapshot is what is read before and after each run.
type snapshot struct {
	cpu      cpuTimes
	groups   map[string]uint64
	counters map[string]uint64
	progs    map[string]ProgStat
	noops    map[string]ProgStat
}

func (w *world) snapshot() (snapshot, error) {
	var s snapshot
	var err error
	if s.cpu, err = readCPUTimes(); err != nil {
		return s, err
	}
	s.groups = map[string]uint64{}
	for name, g := range w.n.groups {
		if s.groups[name], err = cgroupUsage(g.Path); err != nil {
			return s, fmt.Errorf("cgroup %s: %w", name, err)
		}
	}
	if w.dp != nil {
		if s.counters, err = w.dp.Counters(); err != nil {
			return s, err
		}
		if s.progs, err = readProgStats(w.progs); err != nil {
			return s, err
		}
		if w.noops != nil {
			if s.noops, err = readProgStats(w.noops); err != nil {
				return s, err
			}
		}
	}
	return s, nil
}

func deltas(before, after map[string]uint64) map[string]uint64 {
	if after == nil {
		return nil
	}
	out := make(map[string]uint64, len(after))
	for k, v := range after {
		out[k] = v - before[k]
	}
	return out
}

// measure runs one workload and records it; problems with the run itself
// end up in Run.Err, only an interruption is returned as an error. The
// kernel's BPF run-time accounting is on only for connect-tax runs (where
// no-op programs beside the datapath's measure its cost, see attachNoops),
// and for the others with --bpf-stats.
func (w *world) measure(ctx context.Context, round int, wl workload, cfg config) (Run, error) {
	if w.dp == nil || (wl.Kind != kindConnect && cfg.BPFStats) {
		return w.measureRun(ctx, round, wl, cfg)
	}
	if wl.Kind != kindConnect {
		// The accounting would add its clock reads to every program run,
		// a cost the modes without programs do not pay.
		var run Run
		err := w.n.withoutProgramStats(func() (err error) {
			run, err = w.measureRun(ctx, round, wl, cfg)
			return err
		})
		run.Programs = nil
		return run, err
	}
	noops, detach, err := attachNoops(w.n.cg.Path)
	if err != nil {
		run := w.newRun(round, wl)
		run.Err = err.Error()
		return run, nil
	}
	w.noops = noops
	run, err := w.measureRun(ctx, round, wl, cfg)
	w.noops = nil
	if derr := detach(); derr != nil && run.Err == "" {
		run.Err = derr.Error()
	}
	if err != nil || run.Err != "" {
		return run, err
	}
	err = w.n.withoutProgramStats(func() (err error) {
		if run.AB, err = w.measureAB(ctx, round, cfg, w.n.taxCg, "node"); err != nil {
			return err
		}
		run.ABPod, err = w.measureAB(ctx, round, cfg, w.n.meshedPodCg, "pod")
		return err
	})
	if ctx.Err() != nil {
		return run, ctx.Err()
	}
	if err != nil {
		run.Err = fmt.Sprintf("paired probe: %v", err)
	}
	return run, nil
}

// abSlice is one slice of the paired probe; abPairsPerSecond of --duration
// sets how many pairs it runs (100 for the default 5 s).
const (
	abSlice          = 100 * time.Millisecond
	abPairsPerSecond = 20
)

// measureAB runs the paired connect-tax probe in pod C against pod R's
// listener in the tax cgroup, both pinned to one CPU so the pairs compare
// the same scheduling; the probe attaches the programs to attachTo in its
// "on" slices (scope names the case in the log file).
func (w *world) measureAB(ctx context.Context, round int, cfg config, attachTo *testenv.Cgroup, scope string) (*ABResult, error) {
	pairs := max(1, int(cfg.Duration.Seconds())*abPairsPerSecond)
	name := fmt.Sprintf("%d-%s-connect-ab-%s", round, strings.ReplaceAll(w.mode, "+", "-"), scope)
	out, err := w.execAs(ctx, w.c, name, 0, w.n.taxCg, time.Duration(2*pairs+1)*abSlice,
		slices.Concat(pinned(), []string{w.n.probe, connectABArg,
			"--to", netip.AddrPortFrom(w.r.IPv4, abPort).String(),
			"--links", filepath.Join(w.n.bpffs, "meshlane", "links"), "--cgroup", attachTo.Path,
			"--pairs", fmt.Sprint(pairs), "--slice", abSlice.String()})...)
	if err != nil {
		return nil, err
	}
	r, err := parseResultLine[ABResult]("paired probe", out)
	if err != nil {
		return nil, err
	}
	if len(r.Ratios) != pairs {
		return nil, fmt.Errorf("paired probe gave %d pairs, want %d", len(r.Ratios), pairs)
	}
	return &r, nil
}

// pinned prefixes a command so it runs on the machine's last CPU only.
func pinned() []string {
	return []string{"taskset", "-c", fmt.Sprint(runtime.NumCPU() - 1)}
}

func (w *world) newRun(round int, wl workload) Run {
	return Run{Round: round, Mode: w.mode, Workload: wl.Name(), Kind: wl.Kind, Target: wl.Target, Conns: wl.Conns, Start: time.Now().UTC(), Iptables: w.iptables, LoadAvg: loadAvg()}
}

// measureRun is measure without the connect-tax runs' no-op programs.
func (w *world) measureRun(ctx context.Context, round int, wl workload, cfg config) (Run, error) {
	run := w.newRun(round, wl)
	before, err := w.snapshot()
	if err != nil {
		run.Err = err.Error()
		return run, nil
	}
	name := fmt.Sprintf("%d-%s-%s", round, strings.ReplaceAll(w.mode, "+", "-"), wl.slug())
	var perf *perfRecording
	if cfg.Profile && wl.Kind != kindConnect && !wl.Warmup {
		if perf, err = startPerf(filepath.Join(w.n.logs, name+"-perf.data"), w.n.logPath(name+"-perf")); err != nil {
			run.Err = err.Error()
			return run, nil
		}
	}
	var out string
	if wl.Kind == kindConnect {
		out, err = w.exec(ctx, w.c, name, cfg.Duration, w.n.probe, connectLoopArg,
			"--to", netip.AddrPortFrom(w.r.IPv4, taxPort).String(), "--duration", cfg.Duration.String())
	} else {
		out, err = w.exec(ctx, w.a, name, cfg.Duration, wrkArgs(wl, w.url(wl), cfg)...)
	}
	after, serr := w.snapshot()
	var perr error
	if perf != nil {
		var prof Profile
		if prof, perr = perf.stop(ctx); perr == nil {
			run.Profile = &prof
		}
	}
	if ctx.Err() != nil {
		return run, ctx.Err()
	}
	run.CPU = cpuShare(before.cpu, after.cpu)
	run.GroupCPU = deltas(before.groups, after.groups)
	run.Counters = deltas(before.counters, after.counters)
	run.Programs = progDeltas(before.progs, after.progs)
	run.NoopPrograms = progDeltas(before.noops, after.noops)

	var problems []error
	if err != nil {
		problems = append(problems, err)
	}
	if wl.Kind == kindConnect {
		if r, perr := parseConnectResult(out); perr == nil {
			run.Connect = &r
		} else {
			problems = append(problems, perr)
		}
	} else {
		run.WrkOutput = out
		if r, perr := parseWrk(out); perr == nil {
			run.Wrk = &r
			if n := r.Errors(); n > 0 {
				problems = append(problems, fmt.Errorf("wrk counted %d errors (connect %d, read %d, write %d, timeout %d, non-2xx %d)",
					n, r.ConnectErrors, r.ReadErrors, r.WriteErrors, r.Timeouts, r.Non2xx3xx))
			}
		} else {
			problems = append(problems, perr)
		}
	}
	problems = append(problems, serr, perr)
	if run.requests() == 0 {
		problems = append(problems, errors.New("no request completed"))
	} else {
		problems = append(problems, checkPath(run)...)
	}
	if err := errors.Join(problems...); err != nil {
		run.Err = err.Error()
	}
	return run, nil
}

// checkPath makes sure the traffic took the mode's path, so that a broken
// redirect can never pass for a fast one: every sidecar on the path spent
// CPU on every request, and the datapath counted the redirects and the
// short-circuited messages it was meant to make.
func checkPath(r Run) []error {
	var errs []error
	n := uint64(r.requests())
	if hasSidecars(r.Mode) && r.Kind != kindConnect {
		path := []string{groupSidecarA}
		if r.Target == targetB {
			path = append(path, groupSidecarB)
		}
		for _, g := range path {
			// Relaying a request costs tens of µs; 1 µs each is a floor
			// that only an idle sidecar stays under.
			if used := r.GroupCPU[g]; used < n {
				errs = append(errs, fmt.Errorf("%s used %d µs of CPU for %d requests: traffic did not pass through it", g, used, n))
			}
		}
	}
	if r.Counters == nil {
		return errs
	}
	c := r.Counters
	switch r.Kind {
	case kindConnect:
		// Every connect of the loop must have met the programs.
		if c["pass_not_meshed"] < n {
			errs = append(errs, fmt.Errorf("connect4 passed %d non-meshed connects of %d: are the programs attached?", c["pass_not_meshed"], n))
		}
	default:
		if c["redirect_outbound"] == 0 || (r.Target == targetB && c["redirect_inbound"] == 0) {
			errs = append(errs, fmt.Errorf("datapath redirected %d outbound and %d inbound connects: traffic did not take the redirect", c["redirect_outbound"], c["redirect_inbound"]))
		}
		if r.Mode == modeSockmap && c["msg_redirected"] == 0 {
			errs = append(errs, errors.New("sockmap mode but sk_msg redirected no message"))
		}
	}
	return errs
}

// url is where wrk in pod A sends its requests.
func (w *world) url(wl workload) string {
	dst, port := w.b.IPv4, appPort
	if wl.Target == targetR {
		dst = w.r.IPv4
	}
	if wl.Kind == kindBulk {
		port = bulkPort
	}
	return fmt.Sprintf("http://%s/", netip.AddrPortFrom(dst, uint16(port)))
}

// wrkArgs builds the wrk command line for a workload.
func wrkArgs(wl workload, url string, cfg config) []string {
	threads := min(wl.Conns, cfg.Threads)
	args := []string{"wrk", "-t", fmt.Sprint(threads), "-c", fmt.Sprint(wl.Conns),
		"-d", fmt.Sprintf("%ds", int(cfg.Duration.Seconds())), "--latency", "--timeout", "5s"}
	if wl.Kind == kindClose {
		args = append(args, "-H", "Connection: close")
	}
	return append(args, url)
}

// execGrace is how long a load process may run past its duration (start,
// connection set-up, final report) before it is killed.
const execGrace = 20 * time.Second

// exec runs args as the app uid in pod's network namespace inside the load
// group and returns what it printed.
func (w *world) exec(ctx context.Context, pod *testenv.Pod, name string, dur time.Duration, args ...string) (string, error) {
	return w.execAs(ctx, pod, name, appUID, w.n.groups[groupLoad], dur, args...)
}

// execAs is exec as uid in group.
func (w *world) execAs(ctx context.Context, pod *testenv.Pod, name string, uid uint32, group *testenv.Cgroup, dur time.Duration, args ...string) (string, error) {
	p, err := w.n.start(pod, name, uid, group, args...)
	if err != nil {
		return "", err
	}
	t := time.NewTimer(dur + execGrace)
	defer t.Stop()
	select {
	case <-p.exited:
		err = p.exitErr
	case <-ctx.Done():
		err = errors.Join(ctx.Err(), p.Kill())
	case <-t.C:
		err = errors.Join(fmt.Errorf("%s did not finish within %s", args[0], dur+execGrace), p.Kill())
	}
	out, rerr := os.ReadFile(w.n.logPath(name))
	if err != nil {
		err = fmt.Errorf("%q: %w", args, err)
	}
	return string(out), errors.Join(err, rerr)
}

// runMode builds mode's world, warms it up, measures every workload and
// tears the world down.
func (n *node) runMode(ctx context.Context, round int, mode string, wls []workload, cfg config) (runs []Run, err error) {
	w, err := n.newWorld(ctx, round, mode)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := w.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("tear down %s: %w", mode, cerr))
		}
	}()
	// Warm up (and prove) the path before the first measurement.
	warm := cfg
	warm.Duration = cfg.Warmup
	wr, err := w.measure(ctx, round, workload{Kind: kindKeepalive, Target: targetB, Conns: 8, Warmup: true}, warm)
	if err != nil {
		return nil, err
	}
	if wr.Err != "" {
		return nil, fmt.Errorf("%s warm-up: %s", mode, wr.Err)
	}
	for _, wl := range wls {
		r, err := w.measure(ctx, round, wl, cfg)
		if err != nil {
			return runs, err
		}
		runs = append(runs, r)
	}
	return runs, nil
}

// rotate returns modes starting at round's position, so each mode takes
// every place in the order over the rounds.
func rotate(modes []string, round int) []string {
	k := round % len(modes)
	return append(slices.Clone(modes[k:]), modes[:k]...)
}

// sortedKeys returns m's keys in order, for stable reports.
func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
