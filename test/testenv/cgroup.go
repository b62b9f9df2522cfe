package testenv

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/daemon/mountinfo"
)

// Cgroup is a cgroup v2 directory this package made, with an open
// descriptor for SysProcAttr.CgroupFD and for attaching BPF programs.
type Cgroup struct {
	Path string
	dir  *os.File
}

// cgroupKillTimeout bounds how long Destroy waits for killed processes to
// leave the cgroup.
const cgroupKillTimeout = 5 * time.Second

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted, read from
// /proc/self/mountinfo (hybrid hosts mount it at /sys/fs/cgroup/unified).
func Cgroup2Mount() (string, error) {
	root, err := mountinfo.First("/proc/self/mountinfo", "cgroup2")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	if root == "" {
		return "", errors.New("no cgroup2 filesystem is mounted: mount one (mount -t cgroup2 none /sys/fs/cgroup) first")
	}
	return root, nil
}

// NewCgroup creates the cgroup parent/name, which must not exist yet, and
// opens it.
func NewCgroup(parent, name string) (*Cgroup, error) {
	if name == "" || strings.Contains(name, "/") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup name %q: want a single path element", name)
	}
	path := filepath.Join(parent, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w (is %s a cgroup2 directory you may write?)", err, parent)
	}
	dir, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	return &Cgroup{Path: path, dir: dir}, nil
}

// TempCgroup creates a uniquely named child of the cgroup2 root, for
// processes and BPF programs of one test; cleanup kills whatever is left in
// it and removes it.
func TempCgroup(t testing.TB) *Cgroup {
	t.Helper()
	mnt, err := Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	name, err := objectName(fmt.Sprintf("cg%d", seq.Add(1)))
	if err != nil {
		t.Fatal(err)
	}
	cg, err := NewCgroup(mnt, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cg.Destroy(); err != nil {
			t.Error(err)
		}
	})
	return cg
}

// FD is the cgroup directory's descriptor, valid until Destroy.
func (c *Cgroup) FD() int { return int(c.dir.Fd()) }

// Procs lists the processes directly in the cgroup.
func (c *Cgroup) Procs() ([]int, error) {
	return readProcs(c.Path)
}

func readProcs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("read cgroup.procs: %w", err)
	}
	var pids []int
	for f := range strings.FieldsSeq(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("cgroup.procs of %s: bad pid %q", dir, f)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// Destroy kills every process in the cgroup and its descendants, waits
// (bounded) until they are gone and removes the directories.
func (c *Cgroup) Destroy() error {
	defer c.dir.Close()
	deadline := time.Now().Add(cgroupKillTimeout)
	for {
		populated, err := c.killAll()
		if err != nil {
			return err
		}
		if !populated {
			break
		}
		if time.Now().After(deadline) {
			pids, _ := c.Procs()
			return fmt.Errorf("cgroup %s still has processes %v after %s: something holds them (D state?); remove it by hand", c.Path, pids, cgroupKillTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Children first: rmdir only removes empty cgroups.
	var dirs []string
	err := filepath.WalkDir(c.Path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("list cgroup %s: %w", c.Path, err)
	}
	for _, d := range slices.Backward(dirs) {
		if err := rmdirRetry(d, deadline); err != nil {
			return fmt.Errorf("remove cgroup: %w", err)
		}
	}
	return nil
}

// killAll sends SIGKILL to the cgroup's subtree (cgroup.kill, or pid by pid
// on kernels before 5.14) and reports whether processes remain.
func (c *Cgroup) killAll() (populated bool, err error) {
	if err := os.WriteFile(filepath.Join(c.Path, "cgroup.kill"), []byte("1"), 0); err == nil {
		return c.populated()
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("kill cgroup %s: %w", c.Path, err)
	}
	err = filepath.WalkDir(c.Path, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		pids, err := readProcs(p)
		if err != nil {
			return err
		}
		for _, pid := range pids {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
				return fmt.Errorf("kill %d: %w", pid, err)
			}
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("kill cgroup %s: %w", c.Path, err)
	}
	return c.populated()
}

// populated reads "populated" from cgroup.events, which covers descendants.
func (c *Cgroup) populated() (bool, error) {
	b, err := os.ReadFile(filepath.Join(c.Path, "cgroup.events"))
	if err != nil {
		return false, fmt.Errorf("read cgroup.events: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "populated "); ok {
			return v != "0", nil
		}
	}
	return false, fmt.Errorf("cgroup.events of %s has no populated line", c.Path)
}

func rmdirRetry(dir string, deadline time.Time) error {
	for {
		err := unix.Rmdir(dir)
		if err == nil || err == unix.ENOENT {
			return nil
		}
		if err != unix.EBUSY || time.Now().After(deadline) {
			return fmt.Errorf("rmdir %s: %w", dir, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
