package datapath_test

import (
	"encoding/json"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

const sockoptProbeArg = "meshlane-sockopt-probe"

// sockoptCall is one getsockopt as the caller sees it.
type sockoptCall struct {
	Len   int    `json:"len"`
	Errno string `json:"errno,omitempty"`
	// Head is the first bytes returned, for options whose value is stable.
	Head []byte `json:"head,omitempty"`
}

// sockoptReport maps a call's name to what it returned.
type sockoptReport map[string]sockoptCall

func getsockopt(fd, level, name, size, keep int) sockoptCall {
	buf := make([]byte, size)
	l := uint32(size)
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	c := sockoptCall{Len: int(l)}
	if e != 0 {
		c.Errno = e.Error()
		return c
	}
	c.Head = buf[:min(int(l), keep)]
	return c
}

// runSockoptProbe makes a loopback connection (never redirected) and asks
// a handful of options on the accepted socket, with small and large
// buffers.
func runSockoptProbe() {
	rep := sockoptReport{}
	ln, _ := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_RCVBUF, 65536)
	unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}})
	unix.Listen(ln, 1)
	sa, _ := unix.Getsockname(ln)
	c, _ := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err := unix.Connect(c, sa); err != nil {
		rep["connect"] = sockoptCall{Errno: err.Error()}
	}
	s, _, _ := unix.Accept(ln)
	page := os.Getpagesize()
	rep["SO_RCVBUF"] = getsockopt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, 4, 4)
	rep["SO_TYPE"] = getsockopt(s, unix.SOL_SOCKET, unix.SO_TYPE, 4, 4)
	// TCP_INFO: keep the state, ca_state, retransmits, probes, backoff,
	// options, wscale bytes, which do not move on an idle connection.
	rep["TCP_INFO"] = getsockopt(s, unix.IPPROTO_TCP, unix.TCP_INFO, 512, 7)
	rep["TCP_INFO large buffer"] = getsockopt(s, unix.IPPROTO_TCP, unix.TCP_INFO, 4*page, 7)
	rep["SO_ORIGINAL_DST not redirected"] = getsockopt(s, unix.SOL_IP, 80, 16, 16)
	rep["SO_ORIGINAL_DST large buffer"] = getsockopt(s, unix.SOL_IP, 80, 4*page, 16)
	rep["unknown option large buffer"] = getsockopt(s, unix.SOL_SOCKET, 9999, 4*page, 16)
	rep["SO_PEERNAME"] = getsockopt(s, unix.SOL_SOCKET, unix.SO_PEERNAME, 128, 4)
	// An answer longer than a page, which the program only sees the first
	// page of: the peer's 2,000 supplementary groups (8,000 bytes).
	groups := make([]int, 2000)
	for i := range groups {
		groups[i] = 100000 + i
	}
	if err := unix.Setgroups(groups); err != nil {
		rep["setgroups"] = sockoptCall{Errno: err.Error()}
	}
	if pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0); err == nil {
		rep["SO_PEERGROUPS over a page"] = getsockopt(pair[0], unix.SOL_SOCKET, unix.SO_PEERGROUPS, 4*page, 64)
	}
	json.NewEncoder(os.Stdout).Encode(rep)
}

// TestGetsockoptUntouched: with the programs attached, every getsockopt
// but a redirected connection's SO_ORIGINAL_DST returns exactly what the
// kernel returns without them, large buffers included.
func TestGetsockoptUntouched(t *testing.T) {
	n := newNode(t, false)
	p := n.pod("so")
	n.mesh(p, mesh.Istio, nil)

	run := func(contained bool) sockoptReport {
		out, err := os.CreateTemp(t.TempDir(), "probe-*")
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		opts := testenv.ProcOpts{Stdout: out, Args: []string{os.Args[0], sockoptProbeArg}}
		if contained {
			opts.Cgroup = n.cg
		}
		proc, err := testenv.StartProc(p.NetnsPath, opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := proc.Wait(20 * time.Second); err != nil {
			proc.Kill()
			t.Fatal(err)
		}
		b, _ := os.ReadFile(out.Name())
		var r sockoptReport
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatalf("probe output %q: %v", b, err)
		}
		return r
	}
	before := n.counters()
	inside, outside := run(true), run(false)
	if pg := outside["SO_PEERGROUPS over a page"]; pg.Len <= os.Getpagesize() {
		t.Fatalf("SO_PEERGROUPS answered %d bytes, want more than a page: %+v", pg.Len, outside)
	}
	if len(inside) != len(outside) || len(inside) < 9 {
		t.Fatalf("probe reports differ in size: %v vs %v", inside, outside)
	}
	for name, want := range outside {
		got := inside[name]
		if got.Len != want.Len || got.Errno != want.Errno || string(got.Head) != string(want.Head) {
			t.Errorf("%s: with meshlane %+v, without %+v", name, got, want)
		}
	}
	// The probe's SO_ORIGINAL_DST calls reached the program and were
	// left to the kernel's answer.
	if c := n.counters(); c["origdst_missed"]-before["origdst_missed"] != 2 || c["origdst_answered"] != before["origdst_answered"] {
		t.Fatalf("counters %v", c)
	}
	if outside["SO_ORIGINAL_DST not redirected"].Errno == "" {
		t.Fatalf("kernel answered SO_ORIGINAL_DST for a connection nobody redirected: %+v", outside)
	}
}
