// Package podns answers questions about a pod's network namespace from
// outside it: which netns cookie identifies it (the key the datapath uses)
// and whether a TCP listener is up inside it (how the agent sees a sidecar
// start). It never reads /proc of the pod's processes.
package podns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrGone reports that a netns path no longer names a network namespace:
// the file is missing or is no longer an nsfs mount. Callers treat the pod
// as dead; any other error may be transient.
var ErrGone = errors.New("network namespace is gone")

// soNetnsCookie is SO_NETNS_COOKIE (Linux 5.14+). Spelled out because it
// is the contract with the datapath, which reads the same value with
// bpf_get_netns_cookie.
const soNetnsCookie = 71

// diagTimeout bounds one sock_diag dump so a stuck netlink socket cannot
// stall the agent's sidecar watcher.
const diagTimeout = 2 * time.Second

// openNetns opens path and checks that it is a network namespace, mapping
// "no such file" and "not a netns" to ErrGone.
func openNetns(path string) (*os.File, error) {
	// O_NONBLOCK: a path that turned out to be a FIFO must not hang the
	// agent; it fails the nsfs check below instead.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("open netns %s: %w", path, ErrGone)
		}
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("statfs netns %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC {
		f.Close()
		return nil, fmt.Errorf("%s is not a namespace file (unmounted?): %w", path, ErrGone)
	}
	return f, nil
}

// NetnsCookie returns the SO_NETNS_COOKIE of the network namespace at
// netnsPath, read from a socket created inside it.
func NetnsCookie(netnsPath string) (uint64, error) {
	target, err := openNetns(netnsPath)
	if err != nil {
		return 0, err
	}
	defer target.Close()

	var cookie uint64
	err = onIsolatedThread(func() error {
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			return fmt.Errorf("open current netns: %w", err)
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			if errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("setns %s: not a network namespace: %w", netnsPath, ErrGone)
			}
			return fmt.Errorf("setns into %s: %w", netnsPath, err)
		}
		cookie, err = socketCookie()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
			return fmt.Errorf("setns back to the agent's netns: %w", rerr)
		}
		return err
	})
	return cookie, err
}

// onIsolatedThread runs fn on a goroutine locked to its own OS thread.
// The thread goes back to the runtime only if it ends in the netns it
// started in; otherwise the goroutine exits still locked and the runtime
// kills the thread, so no other goroutine ever runs in a pod's netns.
func onIsolatedThread(fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		before, err := threadNetns()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		ferr := fn()
		after, err := threadNetns()
		if err == nil && after == before {
			runtime.UnlockOSThread()
		} else if ferr == nil {
			ferr = fmt.Errorf("thread did not return to the agent's netns (thread discarded; retry)")
		}
		done <- ferr
	}()
	return <-done
}

type nsID struct{ dev, ino uint64 }

func threadNetns() (nsID, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return nsID{}, fmt.Errorf("stat current netns: %w", err)
	}
	return nsID{st.Dev, st.Ino}, nil
}

// socketCookie creates a throwaway socket in the current thread's netns and
// reads its netns cookie. A unix datagram socket is the cheapest socket
// that carries the namespace.
func socketCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket in pod netns: %w", err)
	}
	defer unix.Close(fd)
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, soNetnsCookie)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_NETNS_COOKIE (needs Linux 5.14+): %w", err)
	}
	return cookie, nil
}

// ListenerUp reports whether a TCP socket in state LISTEN on port exists in
// the netns at netnsPath, over IPv4 or IPv6. It asks the kernel through
// sock_diag from a netlink socket created in that netns.
func ListenerUp(netnsPath string, port uint16) (bool, error) {
	f, err := openNetns(netnsPath)
	if err != nil {
		return false, err
	}
	defer f.Close()

	// The handle's socket is created inside the netns by switching the
	// calling thread; do that on an isolated thread too.
	var h *netlink.Handle
	err = onIsolatedThread(func() error {
		var err error
		h, err = netlink.NewHandleAt(netns.NsHandle(int(f.Fd())), unix.NETLINK_INET_DIAG)
		return err
	})
	if err != nil {
		if h != nil {
			h.Close()
		}
		return false, fmt.Errorf("netlink sock_diag handle in %s: %w", netnsPath, err)
	}
	defer h.Close()
	if err := h.SetSocketTimeout(diagTimeout); err != nil {
		return false, fmt.Errorf("set sock_diag timeout: %w", err)
	}

	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := h.SocketDiagTCP(family)
		// An interrupted dump is still a list of real sockets: a listener in
		// it is up. A listener missed by it is seen on the next poll.
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			if family == unix.AF_INET6 && errors.Is(err, unix.ENOENT) {
				// No IPv6 in this kernel: nothing more to look at.
				return false, nil
			}
			return false, fmt.Errorf("sock_diag TCP dump (family %d) in %s: %w", family, netnsPath, err)
		}
		for _, s := range socks {
			if s.State == tcpListen && s.ID.SourcePort == port {
				return true, nil
			}
		}
	}
	return false, nil
}

// tcpListen is TCP_LISTEN from the kernel's tcp_states.h.
const tcpListen = 10

// AddLoopbackAddr puts addr on the lo interface of the netns at netnsPath,
// without duplicate address detection; an address already there is fine.
// Istio's init container adds ::6 this way for the sidecar's IPv6 inbound
// passthrough, and meshlane replaces that container.
func AddLoopbackAddr(netnsPath string, addr netip.Prefix) error {
	f, err := openNetns(netnsPath)
	if err != nil {
		return err
	}
	defer f.Close()
	var h *netlink.Handle
	err = onIsolatedThread(func() error {
		var err error
		h, err = netlink.NewHandleAt(netns.NsHandle(int(f.Fd())), unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		if h != nil {
			h.Close()
		}
		return fmt.Errorf("netlink handle in %s: %w", netnsPath, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo in %s: %w", netnsPath, err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), addr.Addr().BitLen())}, Flags: unix.IFA_F_NODAD}
	if err := h.AddrAdd(lo, a); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add %s to lo in %s: %w", addr, netnsPath, err)
	}
	return nil
}
