package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// With --profile every measured wrk run is sampled by perf, machine-wide
// (cpu-clock: this VM has no hardware counters), and each sample is put on
// one kernel path: the path of the innermost frame of its call chain that
// belongs to one. So a conntrack lookup inside tcp_sendmsg counts as
// netfilter, a wake-up inside the sockmap's sendmsg as the scheduler, and
// the sidecar's write system call as TCP/IP or sockmap by what it ran.
// Per request, that says where each mode spends the CPU the others don't.

// perfHz is the sampling rate per CPU: a sample is 1/perfHz s of a CPU.
const perfHz = 499

// Profile is a run's samples per kernel path.
type Profile struct {
	Hz      int            `json:"hz"`
	Samples int            `json:"samples"`
	Paths   map[string]int `json:"paths"`
}

// The paths, in the report's order.
const (
	pathUser      = "user space"
	pathTCPIP     = "TCP/IP stack and sockets"
	pathNetfilter = "netfilter (conntrack, NAT, rules)"
	pathSockmap   = "sockmap (sk_msg hand-over, psock set-up and teardown)"
	pathBPF       = "BPF programs and their hooks"
	pathSched     = "scheduler (switches, wake-ups)"
	pathOther     = "other kernel (syscall entry, epoll, memory, ...)"
	pathIdle      = "idle"
	pathPerf      = "perf itself"
	pathElse      = "processes outside the bench"
)

var profilePaths = []string{pathUser, pathTCPIP, pathNetfilter, pathSockmap, pathBPF, pathSched, pathOther, pathIdle, pathPerf, pathElse}

// benchComms are the commands of the bench's own processes (as the kernel
// shortens them) and the prefixes of kernel threads, which do work for
// them (softirqs, deferred frees) and idle. Samples of any other command
// belong to other users of the machine.
var benchComms = []string{"wrk", "podbin", "meshlane-csidec", "meshlane-bench", "swapper", "ksoftirqd/", "kworker/", "rcu_", "migration/", "cpuhp/", "irq/", "napi/", "kthreadd"}

// pathRules say which kernel functions belong to a path, by name prefix
// (JIT-compiled programs are named bpf_prog_<tag>_<name>). A frame is tried
// against them in this order, so the sockmap's bpf_tcp_ingress is sockmap,
// not BPF, and sk_psock_* not sockets.
var pathRules = []struct {
	path     string
	prefixes []string
}{
	{pathIdle, []string{"do_idle", "default_idle", "pv_native_safe_halt", "cpuidle_", "cpu_startup_entry"}},
	{pathSockmap, []string{"sk_psock", "sock_map_", "sock_hash_", "tcp_bpf_", "sk_msg_", "__sk_msg_", "bpf_tcp_ingress"}},
	{pathBPF, []string{"__cgroup_bpf_run_filter", "bpf_"}},
	{pathNetfilter, []string{"nf_", "__nf_", "nft_", "__nft_", "ipt_", "ip6t_", "xt_", "iptable_", "ip6table_"}},
	{pathSched, []string{"schedule", "__schedule", "try_to_wake_up", "finish_task_switch", "ttwu_"}},
	{pathTCPIP, []string{"tcp_", "__tcp_", "ip_", "__ip_", "ip6_", "__ip6_", "ipv6_", "inet", "__inet", "udp", "__udp",
		"dev_", "__dev_", "netif_", "__netif_", "net_rx_action", "process_backlog", "napi_", "__napi_", "veth_", "br_",
		"loopback_", "skb_", "__skb_", "kfree_skb", "__kfree_skb", "consume_skb", "sk_", "__sk_", "sock_", "__sock_",
		"__sys_connect", "__sys_accept", "__sys_socket", "__sys_bind", "__sys_listen", "__sys_shutdown",
		"__sys_sendto", "__sys_recvfrom", "reqsk_", "neigh_", "__neigh_", "fib_", "dst_", "rt_", "icmp"}},
}

// kernelPath is the path a kernel function belongs to, or "".
func kernelPath(sym string) string {
	for _, r := range pathRules {
		for _, p := range r.prefixes {
			if strings.HasPrefix(sym, p) {
				return r.path
			}
		}
	}
	return ""
}

// samplePath puts one sample on a path from its command and call chain,
// leaf first.
func samplePath(comm string, chain []frame) string {
	if comm == "perf" || comm == "perf-exec" {
		return pathPerf
	}
	if !slices.ContainsFunc(benchComms, func(c string) bool { return strings.HasPrefix(comm, c) }) {
		return pathElse
	}
	if len(chain) == 0 || !chain[0].kernel {
		return pathUser
	}
	for _, f := range chain {
		if !f.kernel {
			break
		}
		if p := kernelPath(f.sym); p != "" {
			return p
		}
	}
	return pathOther
}

type frame struct {
	kernel bool
	sym    string
}

// kernelBase is where x86-64 kernel addresses start.
const kernelBase = 0xffff800000000000

// classify reads `perf script -F comm,ip,sym`: a line with the command,
// then one indented line per frame ("<hex ip> <symbol>"), then a blank
// line.
func classify(r io.Reader) (Profile, error) {
	p := Profile{Hz: perfHz, Paths: map[string]int{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var comm string
	var chain []frame
	inSample := false
	flush := func() {
		if inSample {
			p.Paths[samplePath(comm, chain)]++
			p.Samples++
		}
		inSample, chain = false, chain[:0]
	}
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.TrimSpace(line) == "":
			flush()
		case line[0] == '\t' || line[0] == ' ':
			if !inSample {
				return p, fmt.Errorf("perf script: frame before any sample: %q", line)
			}
			fields := strings.Fields(line)
			ip, err := strconv.ParseUint(fields[0], 16, 64)
			if err != nil {
				return p, fmt.Errorf("perf script: frame %q: %w", line, err)
			}
			sym := ""
			if len(fields) > 1 {
				sym = fields[1]
			}
			chain = append(chain, frame{kernel: ip >= kernelBase, sym: sym})
		default:
			flush()
			comm, inSample = strings.TrimSpace(line), true
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return p, fmt.Errorf("perf script: %w", err)
	}
	return p, nil
}

// perfRecording is a machine-wide perf record running until stopped.
type perfRecording struct {
	cmd  *exec.Cmd
	data string
	log  string
	done chan error
}

// startPerf starts sampling every CPU into data (perf's messages go to
// log).
func startPerf(data, log string) (*perfRecording, error) {
	lf, err := os.Create(log)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	cmd := exec.Command("perf", "record", "-q", "-e", "cpu-clock", "-F", strconv.Itoa(perfHz), "-a", "-g", "-o", data)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start perf (--profile needs it: make deps installs linux-perf): %w", err)
	}
	p := &perfRecording{cmd: cmd, data: data, log: log, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	return p, nil
}

// stoppedBy reports whether a process ended by signal sig.
func stoppedBy(err error, sig syscall.Signal) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// perfStopTimeout bounds how long perf may take to write its data once
// told to stop.
const perfStopTimeout = 30 * time.Second

// stop ends the recording and returns its profile. The samples are
// removed; a short report by symbol (top entries, call chains included)
// is kept beside the log for a closer look.
func (p *perfRecording) stop(ctx context.Context) (Profile, error) {
	defer os.Remove(p.data)
	if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil {
		return Profile{}, fmt.Errorf("stop perf: %w", err)
	}
	select {
	case err := <-p.done:
		// perf ends itself with the signal it was stopped by once its
		// data is written.
		if err != nil && !stoppedBy(err, syscall.SIGINT) {
			return Profile{}, fmt.Errorf("perf record: %w (see %s)", err, p.log)
		}
	case <-time.After(perfStopTimeout):
		return Profile{}, errors.Join(fmt.Errorf("perf record did not stop within %s (see %s)", perfStopTimeout, p.log), p.cmd.Process.Kill())
	}
	script := exec.CommandContext(ctx, "perf", "script", "-i", p.data, "-F", "comm,ip,sym")
	out, err := script.StdoutPipe()
	if err != nil {
		return Profile{}, err
	}
	script.Stderr = io.Discard
	if err := script.Start(); err != nil {
		return Profile{}, fmt.Errorf("perf script: %w", err)
	}
	prof, cerr := classify(out)
	if cerr != nil {
		// Drain so perf script can exit.
		_, _ = io.Copy(io.Discard, out)
	}
	if err := errors.Join(cerr, script.Wait()); err != nil {
		return Profile{}, err
	}
	if prof.Samples == 0 {
		return prof, errors.New("perf recorded no sample")
	}
	report, err := exec.CommandContext(ctx, "perf", "report", "-i", p.data, "--stdio", "--children",
		"--sort", "sym", "-g", "none", "--percent-limit", "1").Output()
	if err == nil {
		err = os.WriteFile(strings.TrimSuffix(p.log, ".log")+".txt", report, 0o644)
	}
	return prof, err
}
