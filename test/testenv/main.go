package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/meshlane/meshlane/daemon/mountinfo"
)

// atExit holds cleanups of resources shared by a whole test binary.
var atExit []func() error

// AtExit registers a cleanup that Main runs after every test, before it
// checks for leftovers: for resources built once per test binary.
func AtExit(f func() error) { atExit = append(atExit, f) }

// Main runs the tests, removes the podbin build and fails the run if
// anything this process created is still there. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	for i := len(atExit) - 1; i >= 0; i-- {
		if err := atExit[i](); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: cleanup at exit: %v\n", err)
			code = max(code, 1)
		}
	}
	if err := removePodbin(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: remove podbin build: %v\n", err)
	}
	left, err := Leftovers()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testenv: check for leftovers: %v\n", err)
		code = max(code, 1)
	}
	if len(left) > 0 {
		fmt.Fprintf(os.Stderr, "testenv: this run left behind (a cleanup is missing or failed):\n  %s\n", strings.Join(left, "\n  "))
		code = max(code, 1)
	}
	os.Exit(code)
}

// Leftovers lists what this process made and did not remove: netns files,
// links, cgroups, temporary directories and mounts carrying its run ID.
func Leftovers() ([]string, error) {
	var left []string
	matches, err := filepath.Glob(filepath.Join(NetnsDir, runPrefix()+"*"))
	if err != nil {
		return nil, err
	}
	left = append(left, matches...)

	links, err := retryDump(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, linkRunPrefix()) {
			left = append(left, "link "+l.Attrs().Name)
		}
	}

	if mnt, err := Cgroup2Mount(); err == nil {
		matches, err := filepath.Glob(filepath.Join(mnt, runPrefix()+"*"))
		if err != nil {
			return nil, err
		}
		left = append(left, matches...)
	}

	matches, err = filepath.Glob(filepath.Join(os.TempDir(), runPrefix()+"*"))
	if err != nil {
		return nil, err
	}
	left = append(left, matches...)

	mounts, err := mountinfo.Read("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	for _, m := range mounts {
		if strings.Contains(m.Point, runPrefix()) {
			left = append(left, "mount "+m.Point)
		}
	}
	slices.Sort(left)
	return slices.Compact(left), nil
}
