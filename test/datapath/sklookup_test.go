package datapath_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

// remoteClient is a client in pod r that no connect hook sees, as another
// node's.
func remoteClient(t *testing.T, r *testenv.Pod) where {
	return where{pod: r, uid: appUID, gid: appUID, cg: testenv.TempCgroup(t)}
}

// reachesSidecar connects from remote to the app port of b on each family
// and checks that the sidecar took each connection with its original
// destination.
func reachesSidecar(t *testing.T, n *node, remote where, b *testenv.Pod, side string) {
	t.Helper()
	for _, ip := range []netip.Addr{b.IPv4, b.IPv6} {
		to := hostPort(ip, appPort)
		seen := len(sidecarEvents(t, side))
		n.client(remote, to)
		if ev := newEvents(t, side, seen); len(ev) != 1 || ev[0].OrigDst != to {
			t.Fatalf("sidecar events %+v, want one with origDst %s", ev, to)
		}
	}
}

// skLookupPrograms counts the sk_lookup programs attached to p's netns.
func skLookupPrograms(t *testing.T, p *testenv.Pod) int {
	t.Helper()
	f, err := os.Open(p.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachSkLookup})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

// TestSkLookupListenerOpenBeforeMesh: a sidecar listening before its pod
// is meshed (the agent meshes a pod without annotations once its sidecar
// listens) is not seen by sockops at listen(); the listener iterator run
// at UpsertPod registers it, so connections from other nodes reach it.
func TestSkLookupListenerOpenBeforeMesh(t *testing.T) {
	n := newNodeInbound(t, false, datapath.InboundSkLookup)
	b, r := n.pod("b"), n.pod("r")
	n.server(b, "b", appPort)
	side := n.sidecar(b, mesh.Istio)
	before := n.counters()
	p := n.meshInbound(b, mesh.Istio, nil)
	if got := n.counters()["listener_registered"] - before["listener_registered"]; got != 0 {
		t.Fatalf("sockops registered %d listeners of a pod meshed after they opened, want 0 (the iterator's job)", got)
	}
	if _, err := n.dp.InboundHooks(p); err != nil {
		t.Fatalf("inbound hooks: %v", err)
	}
	if got := skLookupPrograms(t, b); got != 1 {
		t.Fatalf("%d sk_lookup programs on b's netns, want 1", got)
	}
	reachesSidecar(t, n, remoteClient(t, r), b, side)
}

// TestSkLookupListenerRegisteredAtListen: sockops registers the inbound
// listener of a meshed pod when the sidecar calls listen(), both
// families, and only that port's.
func TestSkLookupListenerRegisteredAtListen(t *testing.T) {
	n := newNodeInbound(t, false, datapath.InboundSkLookup)
	b := n.pod("b")
	p := n.meshInbound(b, mesh.Istio, nil)
	if ok, err := n.dp.RegisteredListener(p); err != nil || ok {
		t.Fatalf("listener registered before the sidecar runs: %v, %v", ok, err)
	}
	if _, err := n.dp.InboundHooks(p); err == nil || !strings.Contains(err.Error(), "no inbound listener") {
		t.Fatalf("inbound hooks without a sidecar: %v, want no inbound listener", err)
	}
	before := n.counters()
	// Outbound 15001 and inbound 15006, each on 0.0.0.0 and [::].
	n.sidecar(b, mesh.Istio)
	if got := n.counters()["listener_registered"] - before["listener_registered"]; got != 2 {
		t.Fatalf("sockops registered %d listeners, want 2 (inbound, IPv4 and IPv6)", got)
	}
	if detail, err := n.dp.InboundHooks(p); err != nil || !strings.Contains(detail, ":15006 registered") {
		t.Fatalf("inbound hooks: %q, %v", detail, err)
	}
}

// TestSkLookupMPTCPFallback: the kernel cannot put an MPTCP listener in a
// sockhash. sockops counts and reports it; the datapath then puts the tc
// program on the pod's interface, which steers to any listener, so
// connections from other nodes reach the sidecar all the same. A restart
// finds the listener unregistrable again and keeps the fallback.
func TestSkLookupMPTCPFallback(t *testing.T) {
	n := newNodeInbound(t, false, datapath.InboundSkLookup)
	b, r := n.pod("b"), n.pod("r")
	p := n.meshInbound(b, mesh.Istio, nil)
	n.server(b, "b", appPort)
	before := n.counters()
	side := n.sidecar(b, mesh.Istio, "--mptcp")
	if got := n.counters()["listener_register_failed"] - before["listener_register_failed"]; got == 0 {
		t.Fatal("listener_register_failed did not count the MPTCP listener")
	}
	fallback := func(t *testing.T) {
		t.Helper()
		var detail string
		var err error
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			detail, err = n.dp.InboundHooks(p)
			if err == nil && strings.Contains(detail, "cannot be registered") || time.Now().After(deadline) {
				break
			}
		}
		if err != nil || !strings.Contains(detail, "cannot be registered") {
			t.Fatalf("inbound hooks: %q, %v; want the tc fallback", detail, err)
		}
	}
	fallback(t)
	remote := remoteClient(t, r)
	reachesSidecar(t, n, remote, b, side)

	if err := n.dp.Close(); err != nil {
		t.Fatal(err)
	}
	reloadNode(t, n, false)
	n.meshInbound(b, mesh.Istio, nil)
	fallback(t)
	reachesSidecar(t, n, remote, b, side)
}

// TestInboundModeSwitch: an agent restarted with another --inbound-hooks
// puts the new hook on each pod it restores and removes the old one, in
// every direction; connections from other nodes reach the sidecar after
// every switch, and a listener open across a switch to sk_lookup is
// registered again (the other modes empty meshlane_listeners).
func TestInboundModeSwitch(t *testing.T) {
	n := newNodeInbound(t, false, datapath.InboundTCX)
	b, r := n.pod("b"), n.pod("r")
	p := n.meshInbound(b, mesh.Istio, nil)
	n.server(b, "b", appPort)
	side := n.sidecar(b, mesh.Istio)
	remote := remoteClient(t, r)
	reachesSidecar(t, n, remote, b, side)
	dir := filepath.Join(n.bpffs, "inbound", fmt.Sprint(b.NetnsCookie))
	for _, mode := range []string{datapath.InboundSkLookup, datapath.InboundTC, datapath.InboundSkLookup, datapath.InboundTCX} {
		t.Run("to "+mode, func(t *testing.T) {
			if err := n.dp.Close(); err != nil {
				t.Fatal(err)
			}
			n.inbound = mode
			reloadNode(t, n, false)
			n.meshInbound(b, mesh.Istio, nil)
			if _, err := n.dp.InboundHooks(p); err != nil {
				t.Fatalf("inbound hooks: %v", err)
			}
			// An unpinned link detaches once the kernel frees the pin,
			// after an RCU grace period: wait for it, boundedly.
			want := boolInt(mode == datapath.InboundSkLookup)
			for deadline := time.Now().Add(5 * time.Second); skLookupPrograms(t, b) != want; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("%d sk_lookup programs on b's netns, want %d", skLookupPrograms(t, b), want)
				}
			}
			if f := bpfFilters(t, b); len(f) != boolInt(mode == datapath.InboundTC) {
				t.Fatalf("classic tc filters on b's eth0: %v", f)
			}
			_, err := os.Stat(filepath.Join(dir, "ingress"))
			if tcx := err == nil; tcx != (mode == datapath.InboundTCX) {
				t.Fatalf("tcx pin present %v in mode %s (%v)", tcx, mode, err)
			}
			reachesSidecar(t, n, remote, b, side)
		})
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestSkLookupReuseportSiblingTakesOver: of an SO_REUSEPORT group only
// the listener opened last is registered. When it closes while another
// stays open, the datapath's periodic walk registers the other, and
// connections from other nodes reach it again.
func TestSkLookupReuseportSiblingTakesOver(t *testing.T) {
	n := newNodeInbound(t, false, datapath.InboundSkLookup)
	b, r := n.pod("b"), n.pod("r")
	p := n.meshInbound(b, mesh.Istio, nil)
	n.server(b, "b", appPort)
	first := n.sidecar(b, mesh.Istio, "--reuseport")
	dir := testenv.ScratchDir(t)
	ready := filepath.Join(dir, "ready")
	second := b.Start(t, testenv.ProcOpts{UID: mesh.Istio.ProxyUID, GID: mesh.Istio.ProxyGID, Cgroup: n.cgroupOf(b),
		Args: []string{n.bin, "sidecar", "--reuseport", "--events", filepath.Join(dir, "events"), "--ready", ready}})
	if err := testenv.WaitFile(ready, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// Long enough for the datapath to have seen the pod's listener
	// registered (it looks every 2 s): only a lost one is walked for.
	time.Sleep(3 * time.Second)
	// The registered listener is the second sidecar's: it goes, and with
	// it the registration, which nothing but the walk gives back.
	if err := second.Kill(); err != nil {
		t.Fatal(err)
	}
	if ok, err := n.dp.RegisteredListener(p); err != nil || ok {
		t.Fatalf("listener registered %v (%v) right after the registered one closed, want false", ok, err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ok, err := n.dp.RegisteredListener(p)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no inbound listener registered 10 s after the registered one closed while its sibling stayed")
		}
	}
	reachesSidecar(t, n, remoteClient(t, r), b, first)
}
