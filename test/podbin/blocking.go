package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// blockingStream is a TCP socket used with blocking read(2)/write(2) on the
// calling thread, never registered with Go's netpoller: it sees the kernel's
// plain blocking wake-ups, which is what sockmap regressions around
// FIONREAD and wake-ups break differently from epoll.
type blockingStream struct {
	fd            int
	local, remote string
	closeOnce     sync.Once
}

// dialBlocking connects a blocking socket. SO_SNDTIMEO/SO_RCVTIMEO bound
// every call by timeout.
func dialBlocking(to netip.AddrPort, bind netip.Addr, timeout time.Duration) (*blockingStream, error) {
	family := unix.AF_INET6
	if to.Addr().Is4() {
		family = unix.AF_INET
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	s := &blockingStream{fd: fd}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	for _, opt := range []int{unix.SO_SNDTIMEO, unix.SO_RCVTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			s.Close()
			return nil, fmt.Errorf("setsockopt timeout: %w", err)
		}
	}
	if bind.IsValid() {
		if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(bind, 0))); err != nil {
			s.Close()
			return nil, fmt.Errorf("bind %s: %w", bind, err)
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		err = unix.Connect(fd, sockaddr(to))
		// With a send timeout set, a signal (Go's preemption) interrupts
		// connect with EINTR; calling it again keeps waiting for the same
		// handshake, and EISCONN means it finished meanwhile.
		if err == unix.EINTR && time.Now().Before(deadline) {
			continue
		}
		if err == unix.EISCONN {
			err = nil
		}
		break
	}
	if err != nil {
		s.Close()
		if err == unix.EINPROGRESS || err == unix.EINTR {
			err = fmt.Errorf("timed out after %s", timeout)
		}
		return nil, err
	}
	if sa, err := unix.Getsockname(fd); err == nil {
		s.local = sockaddrString(sa)
	}
	if sa, err := unix.Getpeername(fd); err == nil {
		s.remote = sockaddrString(sa)
	}
	return s, nil
}

func (s *blockingStream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, err := unix.Read(s.fd, p)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return 0, errors.New("read timed out")
		case err != nil:
			return 0, err
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func (s *blockingStream) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		// MSG_NOSIGNAL: a peer reset must fail the call, not raise SIGPIPE.
		n, err := unix.SendmsgN(s.fd, p[done:], nil, nil, unix.MSG_NOSIGNAL)
		if n > 0 {
			done += n
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return done, errors.New("write timed out")
		case err != nil:
			return done, err
		}
	}
	return done, nil
}

func (s *blockingStream) CloseWrite() error { return unix.Shutdown(s.fd, unix.SHUT_WR) }

// Abort shuts the socket down both ways: unlike close(2) this wakes a
// thread blocked in read(2) or write(2) on it, and keeps the descriptor
// number from being reused under that thread.
func (s *blockingStream) Abort() { unix.Shutdown(s.fd, unix.SHUT_RDWR) }

func (s *blockingStream) Close() error {
	var err error
	s.closeOnce.Do(func() { err = unix.Close(s.fd) })
	return err
}

func (s *blockingStream) LocalAddr() string  { return s.local }
func (s *blockingStream) RemoteAddr() string { return s.remote }

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

func sockaddrString(sa unix.Sockaddr) string {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return net.JoinHostPort(netip.AddrFrom4(sa.Addr).String(), fmt.Sprint(sa.Port))
	case *unix.SockaddrInet6:
		return net.JoinHostPort(netip.AddrFrom16(sa.Addr).String(), fmt.Sprint(sa.Port))
	}
	return ""
}
