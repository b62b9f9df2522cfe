package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/testenv"
)

// Process groups below the bench cgroup. The datapath attaches to the
// parent and so covers them all; the split only lets each run charge CPU
// time to the load generator, the sidecars and the app servers separately.
const (
	groupLoad     = "load"
	groupApps     = "apps"
	groupSidecarA = "sidecar-a"
	groupSidecarB = "sidecar-b"
)

var groupNames = []string{groupLoad, groupApps, groupSidecarA, groupSidecarB}

// node is what every mode shares for the whole run: the bench cgroup and
// its groups, a private bpffs, the bridge, the built podbin and a scratch
// directory every uid may write. Pods are made anew for each mode. The
// control path adds its built CNI plugins and agent, and its own cgroup.
type node struct {
	cfg     config
	cg      *testenv.Cgroup
	groups  map[string]*testenv.Cgroup
	bpffs   string
	br      *testenv.Bridge
	podbin  string
	sidecar []string // the command of pods A and B's sidecars, less --ready
	probe   string   // a copy of this binary that the app uid may run
	scratch string
	logs    string
	undo    cleanups
	// taxCg holds the paired connect-tax probe and its listener. It is
	// outside the bench cgroup, so no program reaches it but the ones the
	// probe attaches itself.
	taxCg *testenv.Cgroup
	// meshedPodCg plays a meshed pod's cgroup in pod scope: the paired
	// probe attaches the programs there, beside its own cgroup, and no
	// process runs in it.
	meshedPodCg *testenv.Cgroup
	// stats keeps the kernel's BPF run-time accounting on (see
	// withoutProgramStats).
	stats io.Closer
	// cniBin holds the control path's programs; its agents attach to
	// controlCg, where no process runs, so they never tax the data path.
	// controlDir, a tmpfs, holds each control node's socket, agent state,
	// CNI cache and IPAM data.
	cniBin     cninode.Binaries
	controlCg  *testenv.Cgroup
	controlDir string
}

// setupNode builds the node. On error it has already undone what it made.
func setupNode(outDir string, cfg config) (_ *node, err error) {
	n := &node{cfg: cfg, groups: map[string]*testenv.Cgroup{}, logs: filepath.Join(outDir, "logs")}
	defer func() {
		if err != nil {
			err = errors.Join(err, n.undo.run())
		}
	}()
	if err := os.MkdirAll(n.logs, 0o755); err != nil {
		return nil, fmt.Errorf("log directory: %w", err)
	}
	// The scratch name carries testenv's run prefix, so testenv.Leftovers
	// reports it if a cleanup ever misses it.
	n.scratch, err = os.MkdirTemp("", testenv.NamePrefix+testenv.RunID()+"-bench-*")
	if err != nil {
		return nil, fmt.Errorf("scratch directory: %w", err)
	}
	n.undo.add("remove scratch directory", func() error { return os.RemoveAll(n.scratch) })
	if err := os.Chmod(n.scratch, 0o777|os.ModeSticky); err != nil {
		return nil, fmt.Errorf("scratch directory: %w", err)
	}
	mnt, err := testenv.Cgroup2Mount()
	if err != nil {
		return nil, err
	}
	if n.cg, err = testenv.NewCgroup(mnt, testenv.NamePrefix+testenv.RunID()+"-bench"); err != nil {
		return nil, err
	}
	// Destroy kills whatever is left below and removes the children too.
	n.undo.add("destroy cgroup", n.cg.Destroy)
	dir, unmount, err := testenv.MountBPFFS()
	if err != nil {
		return nil, err
	}
	n.undo.add("unmount bpffs", unmount)
	n.bpffs = dir

	if slices.Contains(cfg.Kinds, kindControl) {
		if n.cniBin, err = cninode.Build(filepath.Join(n.scratch, "cni-bin")); err != nil {
			return nil, err
		}
		if n.controlCg, err = testenv.NewCgroup(n.cg.Path, "control"); err != nil {
			return nil, err
		}
		n.undo.add("destroy cgroup control", n.controlCg.Destroy)
		if n.controlDir, err = mountTmpfs(filepath.Join(n.scratch, "control")); err != nil {
			return nil, err
		}
		n.undo.add("unmount tmpfs", func() error { return unmountDir(n.controlDir) })
	}
	if len(cfg.workloads()) > 0 {
		if err := n.setupDataPath(); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// setupDataPath adds what the data-path modes share to the node.
func (n *node) setupDataPath() (err error) {
	if n.podbin, err = buildPodbin(n.scratch); err != nil {
		return err
	}
	// Neither sidecar splices: io.Copy's splice is a known hazard on
	// sockets fed by sk_msg, hence the Go one's --copy buffer.
	n.sidecar = []string{n.podbin, "sidecar", "--copy", "buffer"}
	if n.cfg.Sidecar == sidecarC && n.cfg.needsSidecars() {
		bin, err := buildCSidecar(csidecarSource, n.scratch)
		if err != nil {
			return err
		}
		n.sidecar = []string{bin}
	}
	if n.probe, err = copySelf(n.scratch); err != nil {
		return err
	}
	for _, g := range groupNames {
		if n.groups[g], err = testenv.NewCgroup(n.cg.Path, g); err != nil {
			return err
		}
		n.undo.add("destroy cgroup "+g, n.groups[g].Destroy)
	}
	mnt, err := testenv.Cgroup2Mount()
	if err != nil {
		return err
	}
	if n.taxCg, err = testenv.NewCgroup(mnt, testenv.NamePrefix+testenv.RunID()+"-bench-tax"); err != nil {
		return err
	}
	n.undo.add("destroy cgroup bench-tax", n.taxCg.Destroy)
	if n.meshedPodCg, err = testenv.NewCgroup(mnt, testenv.NamePrefix+testenv.RunID()+"-bench-meshed-pod"); err != nil {
		return err
	}
	n.undo.add("destroy cgroup bench-meshed-pod", n.meshedPodCg.Destroy)

	if n.stats, err = enableProgramStats(); err != nil {
		return err
	}
	n.undo.add("disable BPF run time statistics", func() error { return n.stats.Close() })

	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		return err
	}
	if n.br, err = testenv.CreateBridge("bench", v4, v6); err != nil {
		return err
	}
	n.undo.add("delete bridge", n.br.Delete)
	return nil
}

// teardown undoes setupNode and reports anything of this run still left.
func (n *node) teardown() error {
	err := n.undo.run()
	left, lerr := testenv.Leftovers()
	if lerr != nil {
		return errors.Join(err, fmt.Errorf("check for leftovers: %w", lerr))
	}
	if len(left) > 0 {
		err = errors.Join(err, fmt.Errorf("left behind, remove by hand: %s", strings.Join(left, ", ")))
	}
	return err
}

// mountTmpfs makes dir and mounts a tmpfs on it. The agent's state files,
// one per pod, written and fsynced at every ADD and removed at every DEL,
// live in /var/run on a real node, which is a tmpfs there; here /tmp may
// be a disk, and its fsyncs would be counted against meshlane.
func mountTmpfs(dir string) (string, error) {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("tmpfs mount point: %w", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
		return "", errors.Join(fmt.Errorf("mount tmpfs on %s: %w", dir, err), os.Remove(dir))
	}
	return dir, nil
}

func unmountDir(dir string) error {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}

// buildPodbin builds ./test/podbin into dir, world-executable: pods run it
// as the proxy and app uids.
func buildPodbin(dir string) (string, error) {
	out := filepath.Join(dir, "podbin")
	cmd := exec.Command("go", "build", "-o", out, "./test/podbin")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build ./test/podbin: %w (run the bench from the repository root)\n%s", err, stderr.Bytes())
	}
	if err := os.Chmod(out, 0o755); err != nil {
		return "", fmt.Errorf("podbin: %w", err)
	}
	return out, nil
}

// csidecarSource is the C sidecar's source, from the repository root.
const csidecarSource = "hack/bench/csidecar/sidecar.c"

// cCompiler finds the compiler the C sidecar is built with: $CC, else cc.
func cCompiler() (string, error) {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "cc"
	}
	if _, err := exec.LookPath(cc); err != nil {
		return "", fmt.Errorf("no C compiler for the C sidecar (%w): install one with `make deps` (Debian package gcc), or run with --sidecar go", err)
	}
	return cc, nil
}

// buildCSidecar compiles the C sidecar at src into dir, world-executable
// like podbin: pods run it as the proxy uid.
func buildCSidecar(src, dir string) (string, error) {
	cc, err := cCompiler()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "meshlane-csidecar")
	cmd := exec.Command(cc, "-std=c11", "-O2", "-Wall", "-Werror", "-o", out, src)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s", cc, src, err, stderr.Bytes())
	}
	if err := os.Chmod(out, 0o755); err != nil {
		return "", fmt.Errorf("C sidecar: %w", err)
	}
	return out, nil
}

// copySelf copies this executable into dir so the app uid may run its
// connect-loop probe; `go run` leaves the original in a root-only directory.
func copySelf(dir string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("find own executable: %w", err)
	}
	src, err := os.Open(self)
	if err != nil {
		return "", fmt.Errorf("copy own executable: %w", err)
	}
	defer src.Close()
	out := filepath.Join(dir, "bench-probe")
	dst, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return "", fmt.Errorf("copy own executable: %w", err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return "", fmt.Errorf("copy own executable: %w", err)
	}
	if err := dst.Close(); err != nil {
		return "", fmt.Errorf("copy own executable: %w", err)
	}
	return out, nil
}

// cleanups is a stack of undo steps, run last in first out.
type cleanups struct {
	steps []cleanupStep
}

type cleanupStep struct {
	name string
	fn   func() error
}

func (c *cleanups) add(name string, fn func() error) {
	c.steps = append(c.steps, cleanupStep{name, fn})
}

// run runs every step even when some fail, and empties the stack.
func (c *cleanups) run() error {
	var errs []error
	for i := len(c.steps) - 1; i >= 0; i-- {
		if err := c.steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.steps[i].name, err))
		}
	}
	c.steps = nil
	return errors.Join(errs...)
}

// withoutProgramStats runs fn with the kernel's BPF run-time accounting
// off: its clock reads on every program run are a cost of the bench, not of
// the datapath, and the paired connect-tax probe measures all costs.
func (n *node) withoutProgramStats(fn func() error) error {
	if err := n.stats.Close(); err != nil {
		return fmt.Errorf("pause BPF run time statistics: %w", err)
	}
	ferr := fn()
	var err error
	if n.stats, err = enableProgramStats(); err != nil {
		// Closing the closed one again is harmless at teardown.
		return errors.Join(ferr, err)
	}
	return ferr
}
