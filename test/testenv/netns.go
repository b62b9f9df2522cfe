package testenv

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// NetnsDir is where named network namespaces live, as with `ip netns add`.
const NetnsDir = "/var/run/netns"

// onThreadIn runs fn on an OS thread that enter has moved into another
// network namespace, then moves the thread back. A thread that cannot be
// moved back is never unlocked, so the Go runtime ends it when the goroutine
// returns instead of reusing it in the wrong namespace.
func onThreadIn(enter func() error, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open this thread's netns: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			// setns and unshare either switch or leave the thread alone.
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("move thread back to its netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// InNetns runs fn on an OS thread inside the network namespace at path
// (a bind-mounted netns file or /proc/PID/ns/net). Sockets fn creates
// belong to that namespace; fn must not start goroutines that expect to be
// in it.
func InNetns(path string, fn func() error) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer f.Close()
	return onThreadIn(func() error {
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
		return nil
	}, fn)
}

// NetnsCookie returns the kernel's cookie for the network namespace at
// path: the value bpf_get_netns_cookie() gives BPF programs for sockets
// there. It reads SO_NETNS_COOKIE (Linux 5.14+) from a socket made inside.
func NetnsCookie(path string) (uint64, error) {
	var cookie uint64
	err := InNetns(path, func() error {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("getsockopt(SO_NETNS_COOKIE): %w (needs Linux 5.14 or later)", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("netns cookie of %s: %w", path, err)
	}
	return cookie, nil
}

// createNamedNetns makes a new network namespace and bind-mounts it at
// NetnsDir/name, as `ip netns add name` does.
func createNamedNetns(name string) (string, error) {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", NetnsDir, err)
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return "", fmt.Errorf("create netns file: %w", err)
	}
	f.Close()
	err = onThreadIn(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare netns: %w", err)
		}
		return nil
	}, func() error {
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mount netns on %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		// The mount may have succeeded before moving back failed.
		return "", errors.Join(err, deleteNamedNetns(path))
	}
	return path, nil
}

// deleteNamedNetns undoes createNamedNetns; the namespace itself goes away
// once no process and no socket uses it any more.
func deleteNamedNetns(path string) error {
	var errs []error
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		errs = append(errs, fmt.Errorf("unmount netns %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove netns file: %w", err))
	}
	return errors.Join(errs...)
}

// CreateNetns makes an empty network namespace named from label and
// bind-mounted under NetnsDir, as a container runtime does before it calls
// the CNI chain. Remove it with DeleteNetns.
func CreateNetns(label string) (string, error) {
	name, err := objectName(label)
	if err != nil {
		return "", err
	}
	return createNamedNetns(name)
}

// DeleteNetns removes a namespace made by CreateNetns.
func DeleteNetns(path string) error { return deleteNamedNetns(path) }
