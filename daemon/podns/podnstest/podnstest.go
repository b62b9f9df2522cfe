// Package podnstest makes throwaway network namespaces for tests: a netns
// bind-mounted on a file in the test's temp dir, like the runtime's
// /var/run/netns/cni-* files, with loopback up. Everything is removed when
// the test ends.
package podnstest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RequireRoot skips t when not run as root, except under CI=true where a
// privileged test that does not run is a failure.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root (netns, setns); CI must run it as root")
	}
	t.Skip("needs root: creates network namespaces")
}

// NS is one test network namespace.
type NS struct {
	// Path is the bind-mounted netns file, what a runtime passes as
	// CNI_NETNS.
	Path    string
	mounted bool
}

// New creates a network namespace with loopback up and registers its
// removal with t.Cleanup.
func New(t testing.TB) *NS {
	t.Helper()
	RequireRoot(t)
	path := filepath.Join(t.TempDir(), "netns")
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("create netns mount point: %v", err)
	}
	f.Close()
	ns := &NS{Path: path}
	ns.mount(t)
	t.Cleanup(func() { ns.Delete(t) })
	return ns
}

// Recreate puts a brand-new network namespace at the same path, as a
// runtime reusing a netns path does: same path, another netns cookie.
func (ns *NS) Recreate(t testing.TB) {
	t.Helper()
	if ns.mounted {
		if err := unix.Unmount(ns.Path, unix.MNT_DETACH); err != nil {
			t.Fatalf("unmount netns %s: %v", ns.Path, err)
		}
		ns.mounted = false
	}
	ns.mount(t)
}

// mount creates a netns, bind-mounts it on ns.Path and brings lo up.
func (ns *NS) mount(t testing.TB) {
	t.Helper()
	err := onThrowawayThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
		}
		if err := unix.Mount("/proc/thread-self/ns/net", ns.Path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mount netns on %s: %w", ns.Path, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ns.mounted = true
	if err := ns.Do(setLoopbackUp); err != nil {
		t.Fatalf("bring lo up in %s: %v", ns.Path, err)
	}
}

// Delete unmounts and removes the netns file, as a runtime does when the
// sandbox goes. Sockets still open inside keep the namespace itself alive,
// but its path no longer names it.
func (ns *NS) Delete(t testing.TB) {
	t.Helper()
	if !ns.mounted {
		return
	}
	if err := unix.Unmount(ns.Path, unix.MNT_DETACH); err != nil {
		t.Errorf("unmount netns %s: %v", ns.Path, err)
		return
	}
	ns.mounted = false
	if err := os.Remove(ns.Path); err != nil && !os.IsNotExist(err) {
		t.Errorf("remove netns file %s: %v", ns.Path, err)
	}
}

// Do runs fn with the calling thread inside the netns. The thread is
// thrown away afterwards, so nothing else ever runs in the namespace.
func (ns *NS) Do(fn func() error) error {
	f, err := os.Open(ns.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", ns.Path, err)
	}
	defer f.Close()
	return onThrowawayThread(func() error {
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns %s: %w", ns.Path, err)
		}
		return fn()
	})
}

// Listen opens a TCP listener inside the netns (network "tcp4" or "tcp6")
// and closes it when the test ends.
func (ns *NS) Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	err := ns.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, ns.Path, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// onThrowawayThread runs fn on a locked OS thread that is never unlocked:
// when the goroutine ends the runtime discards the thread along with any
// namespace fn moved it to.
func onThrowawayThread(fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		done <- fn()
	}()
	return <-done
}

func setLoopbackUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}
