package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// ProcOpts says how to start a process.
type ProcOpts struct {
	// UID and GID to run as; both zero keeps root.
	UID, GID uint32
	// Cgroup to start the process in (clone3 CLONE_INTO_CGROUP, so it is
	// there before its first instruction). Required for pod processes.
	Cgroup *Cgroup
	// Args is the program and its arguments.
	Args []string
	// Stdout and Stderr receive the output; the testing.TB helpers log
	// both to a file shown when the test fails if left nil.
	Stdout, Stderr *os.File
}

// Proc is a started process.
type Proc struct {
	Cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// procKillTimeout bounds how long Kill waits after SIGKILL.
const procKillTimeout = 5 * time.Second

// StartProc starts opts.Args inside the network namespace at netnsPath (the
// host's when empty) and inside opts.Cgroup when set. The child inherits
// the namespace of the thread that forks it, so the fork runs on a thread
// moved into netnsPath and moved back afterwards. The child gets SIGKILL if
// that thread or the test process dies first.
func StartProc(netnsPath string, opts ProcOpts) (*Proc, error) {
	if len(opts.Args) == 0 {
		return nil, errors.New("start process: no program given")
	}
	cmd := exec.Command(opts.Args[0], opts.Args[1:]...)
	cmd.Stdout, cmd.Stderr = opts.Stdout, opts.Stderr
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if opts.UID != 0 || opts.GID != 0 {
		attr.Credential = &syscall.Credential{Uid: opts.UID, Gid: opts.GID}
	}
	if opts.Cgroup != nil {
		attr.UseCgroupFD = true
		attr.CgroupFD = opts.Cgroup.FD()
	}
	cmd.SysProcAttr = attr
	var err error
	if netnsPath == "" {
		err = cmd.Start()
	} else {
		err = InNetns(netnsPath, cmd.Start)
	}
	if err != nil {
		if cmd.Process != nil {
			// Started, but the thread could not be restored: its death
			// has signalled the child; reap it.
			cmd.Wait()
		}
		return nil, fmt.Errorf("start %q: %w", opts.Args, err)
	}
	p := &Proc{Cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Pid is the process ID.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Wait waits up to timeout for the process to exit and returns how it
// ended (nil for exit status 0). It does not kill on timeout.
func (p *Proc) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%q still running after %s", p.Cmd.Args, timeout)
	}
}

// Kill sends SIGKILL unless the process has exited, and waits for it.
func (p *Proc) Kill() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := p.Cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %q: %w", p.Cmd.Args, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(procKillTimeout):
		return fmt.Errorf("%q (pid %d) did not die within %s of SIGKILL", p.Cmd.Args, p.Pid(), procKillTimeout)
	}
}

// Start runs a process inside the pod's network namespace and in
// opts.Cgroup, which is required: pod processes must be where the cgroup
// BPF programs under test see them. Cleanup kills it.
func (p *Pod) Start(t testing.TB, opts ProcOpts) *Proc {
	t.Helper()
	if opts.Cgroup == nil {
		t.Fatalf("pod %s: ProcOpts.Cgroup is required for pod processes", p.Name)
	}
	return startForTest(t, p.NetnsPath, opts)
}

// Run starts a process in the pod (see Start), waits up to timeout for it to
// exit and returns its standard output and how it ended.
func (p *Pod) Run(t testing.TB, opts ProcOpts, timeout time.Duration) ([]byte, error) {
	t.Helper()
	out, err := os.CreateTemp(t.TempDir(), "stdout-*")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	opts.Stdout = out
	proc := p.Start(t, opts)
	werr := proc.Wait(timeout)
	if werr != nil {
		proc.Kill()
	}
	b, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b, werr
}

// StartHost runs a process in the host network namespace inside
// opts.Cgroup (required): a host process that the test's cgroup programs
// see. Cleanup kills it.
func StartHost(t testing.TB, opts ProcOpts) *Proc {
	t.Helper()
	if opts.Cgroup == nil {
		t.Fatal("StartHost: ProcOpts.Cgroup is required; use StartUncontained for a process outside the test cgroups")
	}
	return startForTest(t, "", opts)
}

// StartUncontained runs a process in the host network namespace and in the
// test binary's own cgroup, outside every cgroup the test made: what the
// test's cgroup programs must leave alone. Cleanup kills it.
func StartUncontained(t testing.TB, opts ProcOpts) *Proc {
	t.Helper()
	if opts.Cgroup != nil {
		t.Fatal("StartUncontained: ProcOpts.Cgroup must be nil; use StartHost to run in a cgroup")
	}
	return startForTest(t, "", opts)
}

func startForTest(t testing.TB, netnsPath string, opts ProcOpts) *Proc {
	t.Helper()
	var log *os.File
	if opts.Stdout == nil || opts.Stderr == nil {
		var err error
		if log, err = os.CreateTemp(t.TempDir(), "proc-*.log"); err != nil {
			t.Fatal(err)
		}
		if opts.Stdout == nil {
			opts.Stdout = log
		}
		if opts.Stderr == nil {
			opts.Stderr = log
		}
	}
	proc, err := StartProc(netnsPath, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := proc.Kill(); err != nil {
			t.Error(err)
		}
		if log == nil {
			return
		}
		if t.Failed() {
			if b, err := os.ReadFile(log.Name()); err == nil && len(b) > 0 {
				t.Logf("output of %q (pid %d):\n%s", opts.Args, proc.Pid(), tail(b, 4096))
			}
		}
		log.Close()
	})
	return proc
}

func tail(b []byte, n int) []byte {
	if len(b) <= n {
		return b
	}
	return append([]byte("...\n"), b[len(b)-n:]...)
}
