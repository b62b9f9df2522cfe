package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// cpuTimes is the machine-wide first line of /proc/stat, in clock ticks.
type cpuTimes struct {
	Total, Idle, Softirq, Steal uint64
}

func readCPUTimes() (cpuTimes, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	// cpu user nice system idle iowait irq softirq steal [guest guest_nice]
	if len(f) < 9 || f[0] != "cpu" {
		return cpuTimes{}, fmt.Errorf("/proc/stat starts with %q, want the cpu line", line)
	}
	var v [8]uint64
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return cpuTimes{}, fmt.Errorf("/proc/stat cpu field %d: %w", i+1, err)
		}
	}
	// Guest time is already part of user time, so it is left out.
	var t cpuTimes
	for _, x := range v {
		t.Total += x
	}
	t.Idle = v[3] + v[4]
	t.Softirq = v[6]
	t.Steal = v[7]
	return t, nil
}

// CPUShare is how the machine's CPU time was spent during a run, in
// percent of all CPUs.
type CPUShare struct {
	Idle    float64 `json:"idlePct"`
	Softirq float64 `json:"softirqPct"`
	Steal   float64 `json:"stealPct"`
}

func cpuShare(before, after cpuTimes) CPUShare {
	total := float64(after.Total - before.Total)
	if total <= 0 {
		return CPUShare{}
	}
	pct := func(a, b uint64) float64 { return 100 * float64(a-b) / total }
	return CPUShare{
		Idle:    pct(after.Idle, before.Idle),
		Softirq: pct(after.Softirq, before.Softirq),
		Steal:   pct(after.Steal, before.Steal),
	}
}

// cgroupUsage reads usage_usec from a cgroup's cpu.stat, which cgroup v2
// keeps even with no controller enabled.
func cgroupUsage(dir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, fmt.Errorf("read cpu.stat: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "usage_usec "); ok {
			return strconv.ParseUint(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat has no usage_usec", dir)
}

// Machine describes where the bench ran.
type Machine struct {
	CPUs     int    `json:"cpus"`
	CPUModel string `json:"cpuModel"`
	MemTotal string `json:"memTotal"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
	Wrk      string `json:"wrk"`
	Commit   string `json:"commit"`
}

func describeMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = strings.Join([]string{unix.ByteSliceToString(u.Sysname[:]), unix.ByteSliceToString(u.Release[:]),
			unix.ByteSliceToString(u.Version[:]), unix.ByteSliceToString(u.Machine[:])}, " ")
	}
	m.CPUModel = procField("/proc/cpuinfo", "model name")
	m.MemTotal = procField("/proc/meminfo", "MemTotal")
	// wrk -v prints its version and usage, and exits 1.
	out, _ := exec.Command("wrk", "-v").CombinedOutput()
	first, _, _ := strings.Cut(string(out), "\n")
	first, _, _ = strings.Cut(first, " Copyright")
	m.Wrk = strings.TrimSpace(first)
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	return m
}

// procField returns the value of the first "key: value" line of a /proc
// file, or "" when there is none.
func procField(path, key string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// loadAvg returns the first three fields of /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return strings.TrimSpace(string(b))
	}
	return strings.Join(f[:3], " ")
}
