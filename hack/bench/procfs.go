package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// procMem is a process's resident memory, in bytes.
type procMem struct {
	RSS, HWM uint64
}

func readProcMem(pid int) (procMem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procMem{}, fmt.Errorf("agent memory: %w", err)
	}
	return parseProcStatus(string(b))
}

// parseProcStatus reads VmRSS and VmHWM from /proc/<pid>/status, which
// states them in kB (KiB).
func parseProcStatus(s string) (procMem, error) {
	var m procMem
	found := 0
	for line := range strings.Lines(s) {
		key, val, ok := strings.Cut(line, ":")
		var dst *uint64
		switch key {
		case "VmRSS":
			dst = &m.RSS
		case "VmHWM":
			dst = &m.HWM
		}
		if !ok || dst == nil {
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return m, fmt.Errorf("/proc status line %q: want a number of kB", strings.TrimSpace(line))
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return m, fmt.Errorf("/proc status line %q: %w", strings.TrimSpace(line), err)
		}
		*dst = kb << 10
		found++
	}
	if found != 2 {
		return m, errors.New("/proc status has no VmRSS or VmHWM: is the process a zombie?")
	}
	return m, nil
}

func readProcCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("agent CPU time: %w", err)
	}
	ticks, err := parseProcStatTicks(string(b))
	if err != nil {
		return 0, err
	}
	hz, err := clockTicks()
	if err != nil {
		return 0, err
	}
	return time.Duration(ticks) * time.Second / time.Duration(hz), nil
}

// parseProcStatTicks returns utime+stime of /proc/<pid>/stat, in clock
// ticks: fields 14 and 15, counted after the command name, which is in
// parentheses and may itself hold spaces and parentheses.
func parseProcStatTicks(s string) (uint64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc stat %q: no command name", s)
	}
	// The fields after the name start with field 3 (state).
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat has %d fields after the command name, want at least 13", len(f))
	}
	var sum uint64
	for _, v := range f[11:13] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc stat utime/stime %q: %w", v, err)
		}
		sum += n
	}
	return sum, nil
}

// atClkTck is the auxiliary vector entry with the clock tick rate that
// /proc reports CPU times in (AT_CLKTCK, ELF ABI).
const atClkTck = 17

func clockTicks() (uint64, error) {
	auxv, err := unix.Auxv()
	if err != nil {
		return 0, fmt.Errorf("read the auxiliary vector for the clock tick rate: %w", err)
	}
	for _, kv := range auxv {
		if kv[0] == atClkTck && kv[1] > 0 {
			return uint64(kv[1]), nil
		}
	}
	return 0, errors.New("the auxiliary vector has no clock tick rate (AT_CLKTCK)")
}
