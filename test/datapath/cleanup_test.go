package datapath_test

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

// setSysctls writes net sysctls inside a pod's network namespace.
func setSysctls(t *testing.T, p *testenv.Pod, kv map[string]string) {
	t.Helper()
	err := testenv.InNetns(p.NetnsPath, func() error {
		for k, v := range kv {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestShortConnectionsLeaveNoState: 100,000 short redirected connections
// (each through the client's sidecar to a remote, so 200,000 sockets
// counting the sidecar's upstreams), with the fast path on so the sockhash
// is exercised too, leave every map as it was.
func TestShortConnectionsLeaveNoState(t *testing.T) {
	const total, clients = 100_000, 4
	tp := newTopology(t, mesh.Istio, true)
	n := tp.n
	// 100k connections to one destination from one pod would run out of
	// ephemeral ports while closed ones sit in TIME_WAIT.
	for _, p := range []*testenv.Pod{tp.a, tp.c} {
		setSysctls(t, p, map[string]string{
			"net/ipv4/ip_local_port_range": "1024 65535",
			"net/ipv4/tcp_tw_reuse":        "1",
		})
	}
	baseline, err := n.dp.MapFill()
	if err != nil {
		t.Fatal(err)
	}
	before := n.counters()

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Go(func() {
			// Seconds on an idle machine; minutes under CI's parallel load.
			res, err := n.tryClientWithin(10*time.Minute, app(tp.a), hostPort(tp.c.IPv4, appPort), "--count", fmt.Sprint(total/clients))
			ok := 0
			for _, r := range res {
				if r.OK {
					ok++
				}
			}
			if err != nil || ok != total/clients {
				errs <- fmt.Errorf("client: %v, %d of %d ok", err, ok, total/clients)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	after := n.counters()
	if got := after["redirect_outbound"] - before["redirect_outbound"]; got != total {
		t.Errorf("redirected %d connections, want %d", got, total)
	}
	if got := after["origdst_answered"] - before["origdst_answered"]; got != total {
		t.Errorf("original destination answered %d times, want %d", got, total)
	}
	for _, m := range []string{"meshlane_origdst", "meshlane_sockh"} {
		waitMapEmpty(t, n, m)
	}
	fill, err := n.dp.MapFill()
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range baseline {
		if fill[name].Entries != f.Entries {
			t.Errorf("%s: %d entries after the run, %d before", name, fill[name].Entries, f.Entries)
		}
	}
	t.Logf("%d connections; counters %v", total, after)
}
