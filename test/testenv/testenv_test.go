package testenv_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const (
	appUID   = 1000
	proxyUID = 1337
	runLimit = 30 * time.Second
)

// twoPods is the common world: pods a and b, dual-stack, on one bridge,
// with a cgroup for their processes and a scratch directory.
type twoPods struct {
	bin     string
	cg      *testenv.Cgroup
	a, b    *testenv.Pod
	scratch string
}

func newTwoPods(t *testing.T) *twoPods {
	t.Helper()
	testenv.RequireRoot(t)
	bin := testenv.BuildPodbin(t)
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		t.Fatal(err)
	}
	br := testenv.NewBridge(t, "br", v4, v6)
	a4, a6 := br.Addr(2)
	b4, b6 := br.Addr(3)
	return &twoPods{
		bin:     bin,
		cg:      testenv.TempCgroup(t),
		a:       testenv.NewPod(t, br, "a", a4, a6),
		b:       testenv.NewPod(t, br, "b", b4, b6),
		scratch: testenv.ScratchDir(t),
	}
}

// startServer runs podbin server in pod as the app uid and waits until it
// listens on :8080 for both families.
func (w *twoPods) startServer(t *testing.T, pod *testenv.Pod, name string) (events string, proc *testenv.Proc) {
	t.Helper()
	events = filepath.Join(w.scratch, name+".events")
	ready := filepath.Join(w.scratch, name+".ready")
	proc = pod.Start(t, testenv.ProcOpts{UID: appUID, GID: appUID, Cgroup: w.cg,
		Args: []string{w.bin, "server", "--name", name, "--listen", "0.0.0.0:8080,[::]:8080", "--events", events, "--ready", ready}})
	if err := testenv.WaitFile(ready, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return events, proc
}

// runClient runs podbin client in pod with args and decodes its results.
func (w *twoPods) runClient(t *testing.T, pod *testenv.Pod, args ...string) ([]wire.ClientResult, error) {
	t.Helper()
	out, err := pod.Run(t, testenv.ProcOpts{UID: appUID, GID: appUID, Cgroup: w.cg,
		Args: append([]string{w.bin, "client"}, args...)}, runLimit)
	var res []wire.ClientResult
	for line := range strings.Lines(string(out)) {
		var r wire.ClientResult
		if jerr := json.Unmarshal([]byte(line), &r); jerr != nil {
			t.Fatalf("client output line %q: %v", line, jerr)
		}
		res = append(res, r)
	}
	return res, err
}

func TestCgroup2Mount(t *testing.T) {
	mnt, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("%s has filesystem type %#x, want cgroup2 (%#x)", mnt, st.Type, unix.CGROUP2_SUPER_MAGIC)
	}
}

func TestPodToPod(t *testing.T) {
	w := newTwoPods(t)
	events, server := w.startServer(t, w.b, "srvb")

	for _, tc := range []struct {
		family         string
		dst, wantLocal netip.Addr
		wantRemote     netip.Addr
	}{
		{"ipv4", w.b.IPv4, w.b.IPv4, w.a.IPv4},
		{"ipv6", w.b.IPv6, w.b.IPv6, w.a.IPv6},
	} {
		t.Run(tc.family, func(t *testing.T) {
			to := netip.AddrPortFrom(tc.dst, 8080).String()
			res, err := w.runClient(t, w.a, "--to", to)
			if err != nil || len(res) != 1 || !res[0].OK {
				t.Fatalf("client to %s: %v, results %+v", to, err, res)
			}
			r := res[0]
			name, remote, local := parseReply(t, r.Reply)
			if name != "srvb" || remote.Addr() != tc.wantRemote || local != netip.AddrPortFrom(tc.wantLocal, 8080) {
				t.Fatalf("reply %q: want srvb remote=%s:* local=%s", r.Reply, tc.wantRemote, to)
			}
			// Both ends agree on the connection.
			if r.Local != remote.String() || r.Remote != local.String() {
				t.Fatalf("client saw local=%s remote=%s, server saw remote=%s local=%s", r.Local, r.Remote, remote, local)
			}
			_, err = testenv.WaitEvents(events, 5*time.Second, func(evs []wire.ServerEvent) bool {
				return slices.ContainsFunc(evs, func(e wire.ServerEvent) bool {
					return e.Event == wire.EventClosed && e.Remote == remote.String() && e.Err == ""
				})
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}

	// --bind picks the source address, on both client socket kinds.
	for _, reader := range []string{"epoll", "blocking"} {
		t.Run("bind "+reader, func(t *testing.T) {
			res, err := w.runClient(t, w.a, "--to", netip.AddrPortFrom(w.b.IPv6, 8080).String(),
				"--bind", w.a.IPv6.String(), "--reader", reader)
			if err != nil || len(res) != 1 || !res[0].OK {
				t.Fatalf("client: %v, %+v", err, res)
			}
			if _, remote, _ := parseReply(t, res[0].Reply); remote.Addr() != w.a.IPv6 {
				t.Fatalf("reply %q: want remote=[%s]:*", res[0].Reply, w.a.IPv6)
			}
		})
	}

	t.Run("process placement", func(t *testing.T) {
		pids, err := w.cg.Procs()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(pids, server.Pid()) {
			t.Fatalf("server pid %d not in %s/cgroup.procs %v", server.Pid(), w.cg.Path, pids)
		}
		if got, want := nsInode(t, fmt.Sprintf("/proc/%d/ns/net", server.Pid())), nsInode(t, w.b.NetnsPath); got != want {
			t.Fatalf("server netns inode %d, pod b netns inode %d", got, want)
		}
		if uid := procUID(t, server.Pid()); uid != appUID {
			t.Fatalf("server runs as uid %d, want %d", uid, appUID)
		}
	})
}

// parseReply splits "<name> remote=<ip:port> local=<ip:port>".
func parseReply(t *testing.T, reply string) (name string, remote, local netip.AddrPort) {
	t.Helper()
	f := strings.Fields(reply)
	if len(f) != 3 || !strings.HasPrefix(f[1], "remote=") || !strings.HasPrefix(f[2], "local=") {
		t.Fatalf("reply %q is not \"<name> remote=<ip:port> local=<ip:port>\"", reply)
	}
	var err1, err2 error
	remote, err1 = netip.ParseAddrPort(strings.TrimPrefix(f[1], "remote="))
	local, err2 = netip.ParseAddrPort(strings.TrimPrefix(f[2], "local="))
	if err := errors.Join(err1, err2); err != nil {
		t.Fatalf("reply %q: %v", reply, err)
	}
	return f[0], remote, local
}

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func procUID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			uid, err := strconv.Atoi(strings.Fields(rest)[0])
			if err != nil {
				t.Fatal(err)
			}
			return uid
		}
	}
	t.Fatalf("no Uid line in /proc/%d/status", pid)
	return -1
}

func TestEcho(t *testing.T) {
	w := newTwoPods(t)
	w.startServer(t, w.b, "echo")
	const size = 1 << 20
	for _, reader := range []string{"epoll", "blocking"} {
		for _, dst := range []netip.Addr{w.b.IPv4, w.b.IPv6} {
			t.Run(reader+"/"+dst.String(), func(t *testing.T) {
				to := netip.AddrPortFrom(dst, 8080).String()
				res, err := w.runClient(t, w.a, "--to", to, "--bytes", strconv.Itoa(size), "--reader", reader, "--count", "2")
				if err != nil || len(res) != 2 {
					t.Fatalf("client: %v, results %+v", err, res)
				}
				for _, r := range res {
					if !r.OK || !r.Match || r.Bytes != size {
						t.Fatalf("result %+v: want ok, match and %d bytes", r, size)
					}
				}
			})
		}
	}
}

// TestClientReportsFailure: a refused connection must come out as ok=false
// and a non-zero exit, or every other test's success would mean nothing.
func TestClientReportsFailure(t *testing.T) {
	w := newTwoPods(t)
	for _, reader := range []string{"epoll", "blocking"} {
		res, err := w.runClient(t, w.a, "--to", netip.AddrPortFrom(w.b.IPv4, 8081).String(), "--reader", reader, "--timeout", "3s")
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Fatalf("%s: client to a closed port exited with %v, want status 1", reader, err)
		}
		if len(res) != 1 || res[0].OK || !strings.Contains(res[0].Err, "refused") {
			t.Fatalf("%s: results %+v, want one failed result saying refused", reader, res)
		}
	}
}

// TestSidecarWithoutRedirect connects straight to the sidecar's listeners:
// no conntrack entry and no BPF program can name an original destination,
// so every connection must be recorded with origErr and closed.
func TestSidecarWithoutRedirect(t *testing.T) {
	w := newTwoPods(t)
	for _, tc := range []struct {
		name      string
		args      []string
		to        netip.AddrPort
		listener  string
		wantLevel []string
	}{
		{"outbound ipv4", nil, netip.MustParseAddrPort("127.0.0.1:15001"), wire.ListenerOutbound, []string{"SOL_IP,"}},
		{"outbound ipv6", nil, netip.MustParseAddrPort("[::1]:15001"), wire.ListenerOutbound, []string{"SOL_IPV6,"}},
		{"inbound ipv4", nil, netip.AddrPortFrom(w.a.IPv4, 15006), wire.ListenerInbound, []string{"SOL_IP,"}},
		{"inbound ipv6", nil, netip.AddrPortFrom(w.a.IPv6, 15006), wire.ListenerInbound, []string{"SOL_IPV6,"}},
		{"dualstack v4-mapped", []string{"--outbound", "[::]:15001", "--inbound", "", "--dualstack"},
			netip.MustParseAddrPort("127.0.0.1:15001"), wire.ListenerOutbound, []string{"SOL_IP,", "SOL_IPV6,"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := filepath.Join(w.scratch, strings.ReplaceAll(tc.name, " ", "-"))
			sidecar := w.startSidecar(t, w.a, base, tc.args...)
			events := base + ".events"
			res, err := w.runClient(t, w.a, "--to", tc.to.String())
			if err == nil || len(res) != 1 || res[0].OK || res[0].Reply != "" {
				t.Fatalf("client through an unredirected sidecar: %v, %+v; want a failed connection with no reply", err, res)
			}
			evs, err := testenv.WaitEvents(events, 5*time.Second, func(evs []wire.SidecarEvent) bool { return len(evs) > 0 })
			if err != nil {
				t.Fatal(err)
			}
			ev := evs[0]
			if len(evs) != 1 || ev.Event != wire.EventAccepted || ev.Listener != tc.listener || ev.OrigDst != "" || ev.UpstreamLocal != "" {
				t.Fatalf("events %+v: want one %s accept without original destination or upstream", evs, tc.listener)
			}
			if ev.Remote != res[0].Local {
				t.Fatalf("event remote %s, client local %s", ev.Remote, res[0].Local)
			}
			last := -1
			for _, level := range tc.wantLevel {
				i := strings.Index(ev.OrigErr, level)
				if i <= last {
					t.Fatalf("origErr %q: want %q, in order", ev.OrigErr, tc.wantLevel)
				}
				last = i
			}
			if sidecar.Wait(0) == nil {
				t.Fatal("sidecar exited")
			}
		})
	}
}

func TestNetnsCookie(t *testing.T) {
	w := newTwoPods(t)
	host, err := testenv.NetnsCookie("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	again, err := testenv.NetnsCookie(w.a.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	if w.a.NetnsCookie == 0 || w.b.NetnsCookie == 0 || host == 0 {
		t.Fatalf("zero cookie: a %d b %d host %d", w.a.NetnsCookie, w.b.NetnsCookie, host)
	}
	if w.a.NetnsCookie == w.b.NetnsCookie || w.a.NetnsCookie == host || w.b.NetnsCookie == host {
		t.Fatalf("cookies not distinct: a %d b %d host %d", w.a.NetnsCookie, w.b.NetnsCookie, host)
	}
	if again != w.a.NetnsCookie {
		t.Fatalf("cookie of pod a changed from %d to %d", w.a.NetnsCookie, again)
	}
	// The calling thread is back home: the host cookie reads the same.
	if h2, err := testenv.NetnsCookie("/proc/self/ns/net"); err != nil || h2 != host {
		t.Fatalf("host cookie %d then %d (%v)", host, h2, err)
	}
}

// TestHostProcesses: StartHost lands in the test cgroup in the host netns,
// StartUncontained in neither the test cgroup nor a pod.
func TestHostProcesses(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	inCg := testenv.StartHost(t, testenv.ProcOpts{Cgroup: cg, Args: []string{"sleep", "30"}})
	outside := testenv.StartUncontained(t, testenv.ProcOpts{Args: []string{"sleep", "30"}})
	pids, err := cg.Procs()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(pids, []int{inCg.Pid()}) {
		t.Fatalf("cgroup.procs %v, want only %d", pids, inCg.Pid())
	}
	hostNs := nsInode(t, "/proc/self/ns/net")
	for _, p := range []*testenv.Proc{inCg, outside} {
		if got := nsInode(t, fmt.Sprintf("/proc/%d/ns/net", p.Pid())); got != hostNs {
			t.Fatalf("pid %d in netns %d, want the host's %d", p.Pid(), got, hostNs)
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", outside.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), testenv.NamePrefix) {
		t.Fatalf("uncontained process is in a test cgroup: %s", b)
	}
	if err := inCg.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := inCg.Wait(time.Second); err == nil {
		t.Fatal("killed process reports a clean exit")
	}
}

func TestBPFFS(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testenv.BPFFS(t)
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("%s has filesystem type %#x, want bpffs (%#x)", dir, st.Type, unix.BPF_FS_MAGIC)
	}
}

// TestCleanup builds a full world in a subtest that stops halfway (SkipNow
// runs the cleanups as a failure would), then checks nothing is left.
func TestCleanup(t *testing.T) {
	testenv.RequireRoot(t)
	var netnsPaths, links []string
	var cgPath, bpffs string
	t.Run("world", func(t *testing.T) {
		w := newTwoPods(t)
		w.startServer(t, w.b, "cleanup")
		w.a.Start(t, testenv.ProcOpts{Cgroup: w.cg, Args: []string{"sleep", "30"}})
		bpffs = testenv.BPFFS(t)
		cgPath = w.cg.Path
		netnsPaths = []string{w.a.NetnsPath, w.b.NetnsPath}
		links = []string{w.a.HostVeth, w.b.HostVeth}
		left, err := testenv.Leftovers()
		if err != nil {
			t.Fatal(err)
		}
		if len(left) < 6 {
			t.Fatalf("Leftovers() sees only %v while the world exists", left)
		}
		t.Skip("stopping halfway on purpose: the cleanups must still remove everything")
	})
	for _, p := range append(netnsPaths, cgPath, bpffs) {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists (%v)", p, err)
		}
	}
	for _, l := range links {
		if _, err := netlink.LinkByName(l); err == nil {
			t.Errorf("link %s still exists", l)
		}
	}
	left, err := testenv.Leftovers()
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// TestCreatePodRollsBack: a pod whose bridge vanished fails after its netns
// exists; the netns must be gone again.
func TestCreatePodRollsBack(t *testing.T) {
	testenv.RequireRoot(t)
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		t.Fatal(err)
	}
	br, err := testenv.CreateBridge("gone", v4, v6)
	if err != nil {
		t.Fatal(err)
	}
	if err := br.Delete(); err != nil {
		t.Fatal(err)
	}
	a4, a6 := br.Addr(2)
	pod, err := testenv.CreatePod(br, "orphan", a4, a6)
	if err == nil {
		pod.Delete()
		t.Fatal("CreatePod on a deleted bridge succeeded")
	}
	left, lerr := testenv.Leftovers()
	if lerr != nil {
		t.Fatal(lerr)
	}
	if len(left) > 0 {
		t.Fatalf("CreatePod failed (%v) and left %v", err, left)
	}
}

func TestSingleStackPods(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.BuildPodbin(t)
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		t.Fatal(err)
	}
	br := testenv.NewBridge(t, "ss", v4, v6)
	a4, _ := br.Addr(2)
	_, b6 := br.Addr(3)
	w := &twoPods{bin: bin, cg: testenv.TempCgroup(t), scratch: testenv.ScratchDir(t),
		a: testenv.NewPod(t, br, "v4only", a4, netip.Addr{}),
		b: testenv.NewPod(t, br, "v6only", netip.Addr{}, b6)}
	for _, tc := range []struct {
		pod  *testenv.Pod
		want int
	}{{w.a, unix.AF_INET}, {w.b, unix.AF_INET6}} {
		var got []int
		err := testenv.InNetns(tc.pod.NetnsPath, func() error {
			addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
			for _, a := range addrs {
				if a.Scope == int(netlink.SCOPE_UNIVERSE) && !a.IP.IsLoopback() && !a.IP.Equal(net.ParseIP("::6")) {
					if a.IP.To4() != nil {
						got = append(got, unix.AF_INET)
					} else {
						got = append(got, unix.AF_INET6)
					}
				}
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, []int{tc.want}) {
			t.Fatalf("pod %s global address families %v, want only %d", tc.pod.Name, got, tc.want)
		}
	}
	// The v6-only pod still reaches its own server over IPv6.
	w.startServer(t, w.b, "v6only")
	res, err := w.runClient(t, w.b, "--to", netip.AddrPortFrom(b6, 8080).String())
	if err != nil || len(res) != 1 || !res[0].OK {
		t.Fatalf("client: %v, %+v", err, res)
	}
}

// TestSidecarRelay checks the sidecar's relay paths against the reference
// redirect: iptables REDIRECT as istio-iptables sets it up, with conntrack
// answering SO_ORIGINAL_DST. Pod a's app traffic to b:8080 goes to a's
// outbound listener; b's inbound traffic to :8080 goes to b's inbound
// listener, which reaches the app from the passthrough source.
func TestSidecarRelay(t *testing.T) {
	w := newTwoPods(t)
	for _, tool := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install iptables): the relay check needs the reference redirect", tool)
		}
	}
	rules := func(pod *testenv.Pod, chain, match string, port int) {
		for _, tool := range []string{"iptables", "ip6tables"} {
			args := []string{tool, "-w", "5", "-t", "nat", "-A", chain, "-p", "tcp", "--dport", "8080"}
			args = append(args, strings.Fields(match)...)
			args = append(args, "-j", "REDIRECT", "--to-ports", strconv.Itoa(port))
			if out, err := pod.Run(t, testenv.ProcOpts{Cgroup: w.cg, Args: args}, runLimit); err != nil {
				t.Fatalf("%q: %v %s", args, err, out)
			}
		}
	}
	rules(w.a, "OUTPUT", fmt.Sprintf("-m owner ! --uid-owner %d", proxyUID), 15001)
	rules(w.b, "PREROUTING", "", 15006)
	w.startServer(t, w.b, "relay")

	for _, copyMode := range []string{"buffer", "splice"} {
		t.Run(copyMode, func(t *testing.T) {
			sidecar := func(pod *testenv.Pod) string {
				base := filepath.Join(w.scratch, copyMode+"-"+pod.Name)
				w.startSidecar(t, pod, base, "--copy", copyMode)
				return base + ".events"
			}
			eventsA, eventsB := sidecar(w.a), sidecar(w.b)
			const size = 1 << 20
			for _, tc := range []struct {
				dst, passthrough netip.Addr
			}{
				{w.b.IPv4, netip.MustParseAddr("127.0.0.6")},
				{w.b.IPv6, netip.MustParseAddr("::6")},
			} {
				to := netip.AddrPortFrom(tc.dst, 8080)
				res, err := w.runClient(t, w.a, "--to", to.String(), "--bytes", strconv.Itoa(size))
				if err != nil || len(res) != 1 || !res[0].OK || !res[0].Match {
					t.Fatalf("client to %s through both sidecars: %v, %+v", to, err, res)
				}
				_, remote, local := parseReply(t, res[0].Reply)
				if remote.Addr() != tc.passthrough || local != to {
					t.Fatalf("reply %q: want remote=%s:* local=%s", res[0].Reply, tc.passthrough, to)
				}
				down := int64(size + len(res[0].Reply) + 1)
				checkRelay(t, eventsA, wire.ListenerOutbound, res[0].Local, to, w.a.IPv4, w.a.IPv6, size, down)
				checkRelay(t, eventsB, wire.ListenerInbound, "", to, tc.passthrough, tc.passthrough, size, down)
			}
		})
	}
}

// startSidecar runs podbin sidecar in pod as the proxy uid with event and
// ready files at base.events and base.ready.
func (w *twoPods) startSidecar(t *testing.T, pod *testenv.Pod, base string, args ...string) *testenv.Proc {
	t.Helper()
	proc := pod.Start(t, testenv.ProcOpts{UID: proxyUID, GID: proxyUID, Cgroup: w.cg,
		Args: append([]string{w.bin, "sidecar", "--events", base + ".events", "--ready", base + ".ready"}, args...)})
	if err := testenv.WaitFile(base+".ready", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return proc
}

// checkRelay finds the closed event of the connection to origDst (from
// remote, when given) and checks where it came from and what it carried:
// down is exact (reply line and echo); up is the payload plus a HELLO line,
// whose length varies with the client's pid.
func checkRelay(t *testing.T, events, listener, remote string, origDst netip.AddrPort, src4, src6 netip.Addr, size int, down int64) {
	t.Helper()
	match := func(e wire.SidecarEvent) bool {
		return e.Event == wire.EventClosed && e.Listener == listener && e.OrigDst == origDst.String() &&
			(remote == "" || e.Remote == remote)
	}
	evs, err := testenv.WaitEvents(events, 5*time.Second, func(evs []wire.SidecarEvent) bool {
		return slices.ContainsFunc(evs, match)
	})
	if err != nil {
		t.Fatalf("%s sidecar: %v; events %+v", listener, err, evs)
	}
	e := evs[slices.IndexFunc(evs, match)]
	up, err := netip.ParseAddrPort(e.UpstreamLocal)
	if err != nil {
		t.Fatalf("%s event upstreamLocal %q: %v", listener, e.UpstreamLocal, err)
	}
	want := src6
	if origDst.Addr().Is4() {
		want = src4
	}
	if up.Addr() != want {
		t.Fatalf("%s sidecar dialed %s from %s, want %s", listener, origDst, up.Addr(), want)
	}
	minUp, maxUp := int64(size+len("HELLO 1-0\n")), int64(size+len("HELLO 4194304-0\n"))
	if e.CopyErr != "" || e.BytesUp < minUp || e.BytesUp > maxUp || e.BytesDown != down {
		t.Fatalf("%s sidecar carried up %d, down %d bytes (copy error %q); want up %d-%d, down %d",
			listener, e.BytesUp, e.BytesDown, e.CopyErr, minUp, maxUp, down)
	}
}
