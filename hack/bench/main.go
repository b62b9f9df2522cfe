// Command bench measures meshlane's data path against the iptables
// redirect it replaces: HTTP through two sidecars between pods on one node,
// through one sidecar to a non-meshed pod, new connections per second,
// bulk throughput, and the connect() tax on pods outside the mesh. Its
// control-path workload measures what meshlane adds to CNI ADD and DEL
// and what the agent costs in memory and CPU.
//
// Every mode runs on the same topology (a bridge; pods A, B, R and C in
// network namespaces; every process in one cgroup), built anew per mode and
// round, and rounds rotate the mode order so a noisy neighbour hits every
// mode alike; the control path does the same with its own two modes. It
// needs root, and wrk for the data path; results go to
// results/bench-<time>/. See docs/benchmarks.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshlane/meshlane/daemon/datapath"
)

// settleTime separates one mode's teardown from the next mode's set-up.
const settleTime = 2 * time.Second

// config is what a run measures; it is recorded in results.json.
type config struct {
	Rounds   int           `json:"rounds"`
	Duration time.Duration `json:"duration"`
	Warmup   time.Duration `json:"warmup"`
	Quick    bool          `json:"quick"`
	Modes    []string      `json:"modes"`
	// Conns and RemoteConns are the keep-alive connection counts to B and
	// to R; CloseConns those of the connection-per-request workload.
	Conns       []int `json:"conns"`
	RemoteConns []int `json:"remoteConns"`
	CloseConns  int   `json:"closeConns"`
	// Kinds are the workload kinds to run (all by default).
	Kinds []string `json:"kinds"`
	// Sidecar is the sidecar in pods A and B: sidecarC or sidecarGo.
	Sidecar string `json:"sidecar"`
	// Inbound is how the inbound steering attaches to meshed pods (the
	// agent's --inbound-hooks), in the data-path worlds and for the
	// control path's agent.
	Inbound string `json:"inboundHooks,omitempty"`
	// CgroupScope is the control path agent's --cgroup-scope: in pod scope
	// every pod gets a cgroup passed as cgroupPath, and a meshed pod's ADD
	// attaches the cgroup programs to it.
	CgroupScope string `json:"cgroupScope,omitempty"`
	// Pods is how many pods the control workload adds and deletes.
	Pods      int `json:"pods"`
	BulkBytes int `json:"bulkBytes"`
	Threads   int `json:"wrkThreads"`
	// Profile samples every measured wrk run with perf (see profile.go).
	Profile bool `json:"profile,omitempty"`
	// BPFStats keeps the kernel's BPF run-time accounting on during wrk
	// runs.
	BPFStats bool   `json:"bpfStats,omitempty"`
	Out      string `json:"out"`
	// Rerender names an earlier run's directory whose report is to be
	// written again from its results.json; nothing is measured.
	Rerender string `json:"-"`
}

// workloads lists what each mode runs, in order.
func (c config) workloads() []workload {
	var wls []workload
	for _, n := range c.Conns {
		wls = append(wls, workload{Kind: kindKeepalive, Target: targetB, Conns: n})
	}
	for _, n := range c.RemoteConns {
		wls = append(wls, workload{Kind: kindKeepalive, Target: targetR, Conns: n})
	}
	wls = append(wls,
		workload{Kind: kindClose, Target: targetB, Conns: c.CloseConns},
		workload{Kind: kindBulk, Target: targetB, Conns: 1},
		workload{Kind: kindConnect, Target: targetR, Conns: 1})
	return slices.DeleteFunc(wls, func(w workload) bool { return !slices.Contains(c.Kinds, w.Kind) })
}

var allKinds = []string{kindKeepalive, kindClose, kindBulk, kindConnect, kindControl}

// needsSidecars reports whether a data-path mode of the run has sidecars.
func (c config) needsSidecars() bool {
	return len(c.workloads()) > 0 && slices.ContainsFunc(c.Modes, hasSidecars)
}

// maxPods bounds --pods: a Linux bridge takes 1024 ports, and the pods'
// IPv4 subnet is widened from a /24 for them (see podSubnets).
const maxPods = 1000

// phase is a set of modes that take turns within each round, and how one
// mode's runs of a round are measured.
type phase struct {
	modes []string
	run   func(ctx context.Context, round int, mode string) ([]Run, error)
}

// phases are what each round runs, in order: the data-path modes, then
// the control-path ones.
func (c config) phases(n *node) []phase {
	var out []phase
	if wls := c.workloads(); len(wls) > 0 {
		out = append(out, phase{c.Modes, func(ctx context.Context, round int, mode string) ([]Run, error) {
			return n.runMode(ctx, round, mode, wls, c)
		}})
	}
	if slices.Contains(c.Kinds, kindControl) {
		out = append(out, phase{controlModes, func(ctx context.Context, round int, mode string) ([]Run, error) {
			return n.runControl(ctx, round, mode, c)
		}})
	}
	return out
}

// figures turns a run's measurements into the report's figures.
func (c config) figures(runs []Run) []Figure {
	return append(figures(runs, c.workloads(), c.Modes), controlFigures(runs, c.Pods)...)
}

func main() {
	if len(os.Args) > 1 {
		probes := map[string]func([]string) error{connectLoopArg: runConnectLoop, acceptLoopArg: runAcceptLoop, connectABArg: runConnectAB}
		if probe, ok := probes[os.Args[1]]; ok {
			if err := probe(os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "bench %s: %v\n", os.Args[1], err)
				os.Exit(1)
			}
			return
		}
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(2)
	}
	if cfg.Rerender != "" {
		if err := rerender(cfg.Rerender); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: bench [flags]   (as root, from the repository root)\n\n")
		fs.PrintDefaults()
	}
	rounds := fs.Int("rounds", 3, "rounds: every mode runs every workload once per round")
	dur := fs.Duration("duration", 5*time.Second, "length of each measured run, whole seconds (wrk's unit)")
	warmup := fs.Duration("warmup", time.Second, "unrecorded keep-alive run before each mode's measurements, whole seconds")
	quick := fs.Bool("quick", false, "smoke run under 3 minutes: 1 round of 1s, fewer points and pods; checks the bench works, not the numbers")
	modes := fs.String("modes", strings.Join(allModes, ","), "data-path modes to compare, comma separated (the control workload always runs both of its own)")
	kinds := fs.String("workloads", strings.Join(allKinds, ","), "workload kinds to run, comma separated (a focused re-measurement)")
	pods := fs.Int("pods", 500, "pods the control workload adds, then deletes, per mode and round")
	conns := fs.String("conns", "1,8,64", "keep-alive connection counts, pod A to pod B")
	remote := fs.String("remote-conns", "1,8,64", "keep-alive connection counts, pod A to pod R")
	closeConns := fs.Int("close-conns", 8, "connections of the new-connection-per-request workload")
	bulk := fs.Int("bulk-bytes", 4<<20, "response body size of the bulk workload")
	sidecar := fs.String("sidecar", sidecarC, "sidecar in pods A and B: c (the C epoll one, lighter) or go (podbin sidecar)")
	inbound := fs.String("inbound-hooks", datapath.InboundAuto, "how meshlane's inbound steering attaches to meshed pods: auto, tcx, tc or sk_lookup (meshlane-agent's flag of the same name)")
	scope := fs.String("cgroup-scope", datapath.ScopeNode, "the control workload agent's --cgroup-scope: node, or pod (each pod gets a cgroup, passed as cgroupPath; a meshed pod's ADD attaches the cgroup programs to it)")
	profile := fs.Bool("profile", false, "sample every measured wrk run machine-wide with perf and report the CPU per request of each kernel path (netfilter, BPF, sockmap, TCP/IP, scheduler, ...); needs perf (make deps)")
	bpfStats := fs.Bool("bpf-stats", false, "keep the kernel's BPF run-time accounting on during wrk runs too, for each program's run time per request; it adds clock reads to every program run, which only the meshlane modes pay, so by default it is on for the connect-tax runs only (which take its cost off)")
	threads := fs.Int("wrk-threads", 2, "most wrk threads (never more than connections)")
	out := fs.String("out", "results", "directory under which results/bench-<time>/ is made")
	rerender := fs.String("rerender", "", "measure nothing: rewrite results.md and the charts in this earlier run's directory from its results.json")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg := config{Rounds: *rounds, Duration: *dur, Warmup: *warmup, Quick: *quick, CloseConns: *closeConns,
		BulkBytes: *bulk, Threads: *threads, Out: *out, Rerender: *rerender, Pods: *pods, Sidecar: *sidecar, Inbound: *inbound, CgroupScope: *scope, Profile: *profile, BPFStats: *bpfStats}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if cfg.Quick {
		// Explicit flags still win over the quick defaults.
		if !set["rounds"] {
			cfg.Rounds = 1
		}
		if !set["duration"] {
			cfg.Duration = time.Second
		}
		if !set["conns"] {
			*conns = "1,64"
		}
		if !set["remote-conns"] {
			*remote = "8"
		}
		if !set["pods"] {
			cfg.Pods = 50
		}
	}
	var err error
	if cfg.Conns, err = parseInts("conns", *conns); err != nil {
		return cfg, err
	}
	if cfg.RemoteConns, err = parseInts("remote-conns", *remote); err != nil {
		return cfg, err
	}
	if cfg.Modes, err = parseChoice("modes", *modes, allModes); err != nil {
		return cfg, err
	}
	if cfg.Kinds, err = parseChoice("workloads", *kinds, allKinds); err != nil {
		return cfg, err
	}
	switch {
	case cfg.Rounds < 1 || cfg.Rounds > 100:
		return cfg, fmt.Errorf("--rounds %d: want 1 to 100", cfg.Rounds)
	case !wholeSeconds(cfg.Duration) || cfg.Duration > time.Hour:
		return cfg, fmt.Errorf("--duration %s: want whole seconds, 1s to 1h", cfg.Duration)
	case !wholeSeconds(cfg.Warmup) || cfg.Warmup > time.Minute:
		return cfg, fmt.Errorf("--warmup %s: want whole seconds, 1s to 1m", cfg.Warmup)
	case cfg.CloseConns < 1 || cfg.CloseConns > 10000:
		return cfg, fmt.Errorf("--close-conns %d: want 1 to 10000", cfg.CloseConns)
	case cfg.BulkBytes < 1 || cfg.BulkBytes > 1<<30:
		return cfg, fmt.Errorf("--bulk-bytes %d: want 1 to 1 GiB", cfg.BulkBytes)
	case cfg.Threads < 1:
		return cfg, fmt.Errorf("--wrk-threads %d: want at least 1", cfg.Threads)
	case sidecarNames[cfg.Sidecar] == "":
		return cfg, fmt.Errorf("--sidecar %q: want %s or %s", cfg.Sidecar, sidecarC, sidecarGo)
	case cfg.Pods < 1 || cfg.Pods > maxPods:
		return cfg, fmt.Errorf("--pods %d: want 1 to %d", cfg.Pods, maxPods)
	}
	if cfg.Profile {
		if _, err := exec.LookPath("perf"); err != nil {
			return cfg, fmt.Errorf("--profile needs perf: %w (make deps installs linux-perf)", err)
		}
	}
	if cfg.CgroupScope != datapath.ScopeNode && cfg.CgroupScope != datapath.ScopePod {
		return cfg, fmt.Errorf("--cgroup-scope %q: want %s or %s", cfg.CgroupScope, datapath.ScopeNode, datapath.ScopePod)
	}
	switch cfg.Inbound {
	case datapath.InboundAuto, datapath.InboundTCX, datapath.InboundTC, datapath.InboundSkLookup:
	default:
		return cfg, fmt.Errorf("--inbound-hooks %q: want auto, %s, %s or %s", cfg.Inbound, datapath.InboundTCX, datapath.InboundTC, datapath.InboundSkLookup)
	}
	return cfg, nil
}

func wholeSeconds(d time.Duration) bool { return d >= time.Second && d%time.Second == 0 }

// parseChoice reads a comma separated list of distinct names from valid,
// keeping the given order.
func parseChoice(name, list string, valid []string) ([]string, error) {
	var out []string
	for v := range strings.SplitSeq(list, ",") {
		v = strings.TrimSpace(v)
		if !slices.Contains(valid, v) {
			return nil, fmt.Errorf("--%s: unknown value %q, want some of %s", name, v, strings.Join(valid, ", "))
		}
		if slices.Contains(out, v) {
			return nil, fmt.Errorf("--%s: %q given twice", name, v)
		}
		out = append(out, v)
	}
	return out, nil
}

func parseInts(name, list string) ([]int, error) {
	var out []int
	for s := range strings.SplitSeq(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > 10000 {
			return nil, fmt.Errorf("--%s: %q is not a connection count from 1 to 10000", name, s)
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, nil
}

// rerender rewrites the report of the run in dir from its raw runs, with
// this binary's figures and charts.
func rerender(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		return fmt.Errorf("read the earlier run: %w", err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		return fmt.Errorf("decode %s/results.json: %w", dir, err)
	}
	rep.Figures = rep.Config.figures(rep.Runs)
	return rep.write(dir)
}

// preflight checks what a run needs before anything is built.
func preflight(cfg config) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, cgroups, bpffs, iptables): run it with sudo")
	}
	if _, err := os.Stat("test/podbin"); err != nil {
		return errors.New("run from the repository root: ./test/podbin is not here")
	}
	// The control path alone needs neither wrk nor iptables.
	if len(cfg.workloads()) == 0 {
		return nil
	}
	if _, err := exec.LookPath("wrk"); err != nil {
		return errors.New("wrk not found: install it with `make deps` (Debian package wrk)")
	}
	if cfg.Sidecar == sidecarC && cfg.needsSidecars() {
		if _, err := cCompiler(); err != nil {
			return err
		}
	}
	if slices.Contains(cfg.Modes, modeIptables) {
		if _, err := exec.LookPath("iptables-restore"); err != nil {
			return errors.New("iptables-restore not found: install it with `make deps` (Debian package iptables)")
		}
	}
	return nil
}

func run(cfg config) error {
	if err := preflight(cfg); err != nil {
		return err
	}
	rep := &Report{Started: time.Now().UTC(), Command: os.Args, Config: cfg, LoadAvgStart: loadAvg(),
		Machine: describeMachine(), Sidecar: sidecarNames[cfg.Sidecar], LoadGen: loadGenName}
	dir := filepath.Join(cfg.Out, "bench-"+rep.Started.Format("20060102-150405"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("results directory: %w", err)
	}
	cfg.Out = dir
	rep.Config.Out = dir

	// The first SIGINT or SIGTERM stops the run and tears everything down;
	// after that the signals act as usual again, so a second one ends the
	// process at once should the teardown ever hang.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop()
	}()

	n, err := setupNode(dir, cfg)
	if err != nil {
		return err
	}
	phases := cfg.phases(n)
	total := 0
	for _, ph := range phases {
		total += cfg.Rounds * len(ph.modes)
	}
	done := 0
	if wls := cfg.workloads(); len(wls) > 0 {
		fmt.Printf("bench: data path: %d rounds × %d modes × %d workloads of %s\n", cfg.Rounds, len(cfg.Modes), len(wls), cfg.Duration)
	}
	if slices.Contains(cfg.Kinds, kindControl) {
		fmt.Printf("bench: control path: %d rounds × %d modes × %d pods added and deleted\n", cfg.Rounds, len(controlModes), cfg.Pods)
	}
	fmt.Printf("bench: results in %s\n", dir)
rounds:
	for round := range cfg.Rounds {
		for _, ph := range phases {
			for _, mode := range rotate(ph.modes, round) {
				if ctx.Err() != nil {
					break rounds
				}
				start := time.Now()
				runs, err := ph.run(ctx, round, mode)
				rep.Runs = append(rep.Runs, runs...)
				done++
				bad := 0
				for _, r := range runs {
					if r.Err != "" {
						bad++
					}
				}
				fmt.Printf("bench: [%d/%d] round %d %-17s %d runs, %d bad, %s\n", done, total, round+1, mode, len(runs), bad, time.Since(start).Round(time.Second))
				if err != nil {
					if ctx.Err() != nil {
						break rounds
					}
					rep.Problems = append(rep.Problems, fmt.Sprintf("round %d, %s: %v", round, mode, oneLine(err.Error())))
					fmt.Fprintf(os.Stderr, "bench: round %d, %s: %v\n", round, mode, err)
				}
				// The kernel frees a deleted pod's network namespace (its
				// sockets, TIME_WAIT ones included) in a worker after the
				// fact; let that finish before the next mode measures.
				select {
				case <-ctx.Done():
				case <-time.After(settleTime):
				}
			}
		}
	}
	rep.Interrupted = ctx.Err() != nil
	terr := n.teardown()
	if terr != nil {
		rep.Problems = append(rep.Problems, "teardown: "+oneLine(terr.Error()))
	}
	rep.Finished = time.Now().UTC()
	rep.LoadAvgEnd = loadAvg()
	rep.Figures = cfg.figures(rep.Runs)
	if err := rep.write(dir); err != nil {
		return errors.Join(err, terr)
	}
	fmt.Printf("bench: wrote %s/results.md and results.json in %s\n", dir, rep.Finished.Sub(rep.Started).Round(time.Second))
	switch {
	case rep.Interrupted:
		return errors.Join(errors.New("interrupted: partial results written, everything torn down"), terr)
	case terr != nil:
		return terr
	case len(rep.Problems) > 0 || rep.failedRuns() > 0:
		return fmt.Errorf("%d problems and %d failed runs: see the Problems section of %s/results.md", len(rep.Problems), rep.failedRuns(), dir)
	}
	return nil
}
