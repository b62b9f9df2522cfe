package podns_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/meshlane/meshlane/daemon/podns"
	"github.com/meshlane/meshlane/daemon/podns/podnstest"
	"golang.org/x/sys/unix"
)

// ownCookie is the cookie of the test's own netns, read directly.
func ownCookie(t *testing.T) uint64 {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, 71)
	if err != nil {
		t.Fatalf("SO_NETNS_COOKIE: %v", err)
	}
	return c
}

func TestNetnsCookie(t *testing.T) {
	a := podnstest.New(t)
	b := podnstest.New(t)

	ca, err := podns.NetnsCookie(a.Path)
	if err != nil {
		t.Fatalf("NetnsCookie(a): %v", err)
	}
	cb, err := podns.NetnsCookie(b.Path)
	if err != nil {
		t.Fatalf("NetnsCookie(b): %v", err)
	}
	own := ownCookie(t)
	if ca == 0 || cb == 0 || ca == cb || ca == own || cb == own {
		t.Fatalf("cookies must be distinct and non-zero: a=%d b=%d own=%d", ca, cb, own)
	}
	again, err := podns.NetnsCookie(a.Path)
	if err != nil || again != ca {
		t.Fatalf("second read of a: %d, %v; want %d", again, err, ca)
	}
	// The calling thread must be back in the test's netns.
	if got := ownCookie(t); got != own {
		t.Fatalf("test left in another netns: cookie %d, want %d", got, own)
	}

	// Cross-check: a socket made inside the netns by other means carries
	// the same cookie.
	var inside uint64
	err = a.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		inside, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, 71)
		return err
	})
	if err != nil || inside != ca {
		t.Fatalf("cookie from inside: %d, %v; want %d", inside, err, ca)
	}

	// The same path naming a new namespace gives a new cookie.
	a.Recreate(t)
	cr, err := podns.NetnsCookie(a.Path)
	if err != nil || cr == ca || cr == 0 {
		t.Fatalf("cookie after recreate: %d, %v; want a new one (old %d)", cr, err, ca)
	}
}

func TestNetnsCookieGone(t *testing.T) {
	ns := podnstest.New(t)
	path := ns.Path
	ns.Delete(t)
	if _, err := podns.NetnsCookie(path); !errors.Is(err, podns.ErrGone) {
		t.Fatalf("deleted netns: err = %v, want ErrGone", err)
	}

	plain := t.TempDir() + "/plain"
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := podns.NetnsCookie(plain); !errors.Is(err, podns.ErrGone) {
		t.Fatalf("regular file: err = %v, want ErrGone", err)
	}
	fifo := t.TempDir() + "/fifo"
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := podns.NetnsCookie(fifo); !errors.Is(err, podns.ErrGone) {
		t.Fatalf("fifo: err = %v, want ErrGone", err)
	}
	if _, err := podns.ListenerUp(path, 80); !errors.Is(err, podns.ErrGone) {
		t.Fatalf("ListenerUp on deleted netns: err = %v, want ErrGone", err)
	}
}

func TestListenerUp(t *testing.T) {
	ns := podnstest.New(t)
	other := podnstest.New(t)

	check := func(port uint16, want bool) {
		t.Helper()
		got, err := podns.ListenerUp(ns.Path, port)
		if err != nil {
			t.Fatalf("ListenerUp(%d): %v", port, err)
		}
		if got != want {
			t.Fatalf("ListenerUp(%d) = %v, want %v", port, got, want)
		}
	}
	check(15001, false)

	// A listener in another netns on the same port must not count.
	other.Listen(t, "tcp4", "127.0.0.1:15001")
	check(15001, false)

	l4 := ns.Listen(t, "tcp4", "127.0.0.1:15001")
	check(15001, true)
	check(15006, false)

	// Established sockets on the port do not count once the listener is
	// gone.
	var client net.Conn
	if err := ns.Do(func() error {
		var err error
		client, err = net.Dial("tcp4", "127.0.0.1:15001")
		return err
	}); err != nil {
		t.Fatalf("dial inside netns: %v", err)
	}
	defer client.Close()
	server, err := l4.Accept()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer server.Close()
	l4.Close()
	check(15001, false)

	ns.Listen(t, "tcp6", "[::1]:4140")
	check(4140, true)
}

// TestAddLoopbackAddr: ::6 lands on the pod's lo (not the host's), ready
// to bind at once, and adding it twice is fine.
func TestAddLoopbackAddr(t *testing.T) {
	ns := podnstest.New(t)
	p := netip.MustParsePrefix("::6/128")
	for range 2 {
		if err := podns.AddLoopbackAddr(ns.Path, p); err != nil {
			t.Fatal(err)
		}
	}
	err := ns.Do(func() error {
		l, err := net.Listen("tcp", "[::6]:0")
		if err != nil {
			return err
		}
		return l.Close()
	})
	if err != nil {
		t.Fatalf("bind ::6 in the pod: %v", err)
	}
	if l, err := net.Listen("tcp", "[::6]:0"); err == nil {
		l.Close()
		t.Fatal("::6 was added to the host's lo, not the pod's")
	}
	if err := podns.AddLoopbackAddr("/nonexistent/netns", p); err == nil {
		t.Fatal("no error for a missing netns")
	}
}
