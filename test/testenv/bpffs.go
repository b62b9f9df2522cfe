package testenv

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// MountBPFFS mounts a private bpf filesystem on a new temporary directory,
// so pins of one run never meet another's. unmount undoes both.
func MountBPFFS() (dir string, unmount func() error, err error) {
	dir, err = os.MkdirTemp("", runPrefix()+"bpffs-*")
	if err != nil {
		return "", nil, fmt.Errorf("bpffs mount point: %w", err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		os.Remove(dir)
		return "", nil, fmt.Errorf("mount bpffs on %s: %w (needs root and CONFIG_BPF_SYSCALL)", dir, err)
	}
	unmount = func() error {
		// Detach: an open pin or a program still holding the mount must not
		// make the cleanup fail; the kernel frees it when the last user goes.
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount bpffs %s: %w", dir, err)
		}
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove bpffs mount point: %w", err)
		}
		return nil
	}
	return dir, unmount, nil
}

// BPFFS mounts a private bpffs for the test and unmounts it on cleanup.
func BPFFS(t testing.TB) string {
	t.Helper()
	dir, unmount, err := MountBPFFS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unmount(); err != nil {
			t.Error(err)
		}
	})
	return dir
}
