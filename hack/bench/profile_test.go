package main

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlane/meshlane/test/testenv"
)

// perfScript is `perf script -F comm,ip,sym` output as this machine's perf
// prints it, one sample for each rule the classification follows.
const perfScript = `wrk 
	ffffffff81c0b3a1 nf_conntrack_in
	ffffffff81c04a20 nf_hook_slow
	ffffffff81cd1234 __ip_local_out
	ffffffff81cb0000 tcp_sendmsg_locked
	ffffffff821ef691 do_syscall_64
	          108ef3 write

meshlane-csidec 
	ffffffff81442dab _raw_spin_unlock_irqrestore
	ffffffff81442d00 try_to_wake_up
	ffffffff81aa0000 sock_def_readable
	ffffffff81d00000 tcp_bpf_sendmsg_redir
	ffffffff81d00100 tcp_bpf_sendmsg
	ffffffff821ef691 do_syscall_64

meshlane-csidec 
	ffffffff81d10000 jhash.constprop.0
	ffffffff81d10100 sock_hash_lookup_elem_raw
	ffffffff81d10200 bpf_msg_redirect_hash
	ffffffffc0001234 bpf_prog_cdddc4d0c66b43da_meshlane_sk_msg
	ffffffff81d10300 bpf_prog_run_pin_on_cpu
	ffffffff81d10400 sk_psock_msg_verdict

podbin 
	ffffffff8160aaaa pvclock_clocksource_read_nowd
	ffffffff81600000 __cgroup_bpf_run_filter_sock_ops
	ffffffff81cb1000 tcp_set_state

podbin 
	ffffffffc0005678 bpf_prog_ba7ec69755ebe87d_meshlane_sockops
	ffffffff81600000 __cgroup_bpf_run_filter_sock_ops

podbin 
	          4a5b6c runtime.mallocgc
	          4a0000 net/http.(*conn).serve

swapper 
	ffffffff821f0000 pv_native_safe_halt
	ffffffff821f0100 default_idle
	ffffffff821f0200 do_idle

swapper 
	ffffffff81cb2000 tcp_v4_rcv
	ffffffff81c90000 __netif_receive_skb_one_core
	ffffffff81c90100 net_rx_action
	ffffffff81c90200 handle_softirqs
	ffffffff821f0200 do_idle

wrk 
	ffffffff81730000 ep_send_events
	ffffffff81730100 do_epoll_wait
	ffffffff821ef691 do_syscall_64

perf 
	ffffffff81500000 generic_perform_write

compile 
	          4a5b6c cmd/compile/internal/ssa.(*Func).newValue

ksoftirqd/1 
	ffffffff81cb2000 tcp_v4_rcv
	ffffffff81c90100 net_rx_action
`

func TestClassify(t *testing.T) {
	p, err := classify(strings.NewReader(perfScript))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{
		pathNetfilter: 1, // conntrack inside the TCP transmit path
		pathSched:     1, // a wake-up inside the sockmap's sendmsg
		pathSockmap:   1, // the sockhash lookup of the sk_msg program's helper
		pathBPF:       2, // the accounting's clock read in the sockops hook; the program itself
		pathUser:      1,
		pathIdle:      1,
		pathTCPIP:     2, // receive softirq on an idle CPU, and in ksoftirqd
		pathOther:     1, // epoll
		pathPerf:      1,
		pathElse:      1, // a compiler outside the bench
	}
	if p.Samples != 12 || p.Hz != perfHz {
		t.Errorf("samples %d at %d Hz, want 12 at %d", p.Samples, p.Hz, perfHz)
	}
	for path, n := range want {
		if p.Paths[path] != n {
			t.Errorf("%s: %d samples, want %d", path, p.Paths[path], n)
		}
	}
	if len(p.Paths) != len(want) {
		t.Errorf("paths %v, want %v", p.Paths, want)
	}
	for path := range p.Paths {
		if !slices.Contains(profilePaths, path) {
			t.Errorf("path %q is not in the report's list", path)
		}
	}
}

func TestClassifyRejectsGarbage(t *testing.T) {
	for _, in := range []string{
		"\tffffffff81000000 orphan_frame\n",
		"wrk \n\tnot-hex do_syscall_64\n",
	} {
		if _, err := classify(strings.NewReader(in)); err == nil {
			t.Errorf("classify(%q) accepted it", in)
		}
	}
}

// TestPerfRecording samples the machine while a shell spins, as --profile
// does around a run, and finds it among the processes outside the bench.
func TestPerfRecording(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("perf"); err != nil {
		t.Fatalf("perf is not installed (make deps installs linux-perf): %v", err)
	}
	dir := testenv.ScratchDir(t)
	rec, err := startPerf(filepath.Join(dir, "perf.data"), filepath.Join(dir, "perf.log"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// perf needs a moment to set up its events before it samples.
	spin := exec.CommandContext(ctx, "timeout", "2", "sh", "-c", "while :; do :; done")
	if err := spin.Run(); err != nil && !strings.Contains(err.Error(), "exit status 124") {
		t.Fatal(err)
	}
	p, err := rec.stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// 2 s of one busy CPU at perfHz: at least half of its samples.
	if p.Paths[pathElse] < perfHz {
		t.Errorf("%d samples outside the bench of %d, want at least %d: %v", p.Paths[pathElse], p.Samples, perfHz, p.Paths)
	}
	if fi, err := os.Stat(filepath.Join(dir, "perf.txt")); err != nil || fi.Size() == 0 {
		t.Errorf("no perf report beside the log: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "perf.data")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the samples were not removed: %v", err)
	}
}
