package datapath_test

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// wantConnect4 fails the test unless processes in cg come to run want
// meshlane connect4 programs.
func wantConnect4(t *testing.T, cg *testenv.Cgroup, want int, what string) {
	t.Helper()
	if err := cg.WaitMeshlanePrograms(want, ebpf.AttachCGroupInet4Connect); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// podLinkIDs are the ids of the links pinned for a pod in pod scope.
func podLinkIDs(t *testing.T, n *node, p datapath.Pod) map[string]link.ID {
	t.Helper()
	dir := filepath.Join(n.bpffs, "cgroups", strconv.FormatUint(p.NetnsCookie, 10))
	pins, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]link.ID{}
	for _, pin := range pins {
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		ids[filepath.Base(pin)] = info.ID
	}
	return ids
}

// TestPodScope: with the cgroup programs on each meshed pod's own cgroup,
// meshed pods are redirected as in node scope, while a non-meshed pod's
// processes and the host's run no meshlane program at all (their
// connections into a meshed pod take the tc path, as another node's do).
// A restart swaps programs into the pods' links in place, a delete detaches
// them, and a scope change moves them with no moment uncovered.
func TestPodScope(t *testing.T) {
	prof := mesh.Istio
	n := newNodeScope(t, false, datapath.InboundAuto, datapath.ScopePod)
	a, b, c := n.pod("a"), n.pod("b"), n.pod("c")
	podA := n.meshInbound(a, prof, nil)
	podB := n.meshInbound(b, prof, nil)
	sideA, sideB := n.sidecar(a, prof), n.sidecar(b, prof)
	n.server(b, "b", appPort)
	n.server(c, "c", appPort)

	for cg, want := range map[*testenv.Cgroup]int{n.cgroupOf(a): 1, n.cgroupOf(b): 1, n.cgroupOf(c): 0, n.cg: 0} {
		wantConnect4(t, cg, want, "pod scope")
	}
	if _, err := os.Stat(filepath.Join(n.bpffs, "links", "connect4")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("node-scope connect4 link pinned in pod scope: %v", err)
	}

	outbound := func(t *testing.T, fam string) {
		t.Helper()
		want := hostPort(families(c)[fam], appPort)
		seen := len(sidecarEvents(t, sideA))
		r := parseReply(t, n.client(app(a), want)[0].Reply)
		if ev := newEvents(t, sideA, seen); len(ev) != 1 || ev[0].Listener != wire.ListenerOutbound || ev[0].OrigDst != want {
			t.Fatalf("sidecar A events %+v, want one outbound with origDst %s", ev, want)
		}
		if r.Name != "c" {
			t.Fatalf("reply %+v, want c", r)
		}
	}
	for _, fam := range []string{"v4", "v6"} {
		t.Run(fam, func(t *testing.T) {
			want := hostPort(families(b)[fam], appPort)
			t.Run("meshed pod to remote goes through its sidecar", func(t *testing.T) { outbound(t, fam) })
			t.Run("meshed pod to meshed pod goes through both sidecars", func(t *testing.T) {
				seenA, seenB, before := len(sidecarEvents(t, sideA)), len(sidecarEvents(t, sideB)), n.counters()
				n.client(app(a), want)
				if ev := newEvents(t, sideA, seenA); len(ev) != 1 || ev[0].Listener != wire.ListenerOutbound || ev[0].OrigDst != want {
					t.Fatalf("sidecar A events %+v, want one outbound with origDst %s", ev, want)
				}
				if ev := newEvents(t, sideB, seenB); len(ev) != 1 || ev[0].Listener != wire.ListenerInbound || ev[0].OrigDst != want {
					t.Fatalf("sidecar B events %+v, want one inbound with origDst %s", ev, want)
				}
				if got := n.counters()["redirect_inbound_remote"] - before["redirect_inbound_remote"]; got != 0 {
					t.Fatalf("tc redirected %d connections that A's connect hook had", got)
				}
			})
			for _, from := range []struct {
				name string
				w    where
			}{{"non-meshed pod", app(c)}, {"host process", host()}} {
				t.Run(from.name+" to meshed pod takes the tc path to its sidecar", func(t *testing.T) {
					seen, before := len(sidecarEvents(t, sideB)), n.counters()
					n.client(from.w, want)
					if ev := newEvents(t, sideB, seen); len(ev) != 1 || ev[0].Listener != wire.ListenerInbound || ev[0].OrigDst != want {
						t.Fatalf("sidecar B events %+v, want one inbound with origDst %s", ev, want)
					}
					if got := n.counters()["redirect_inbound_remote"] - before["redirect_inbound_remote"]; got != 1 {
						t.Fatalf("tc redirected %d connections, want 1", got)
					}
				})
			}
		})
	}

	t.Run("restart swaps the programs into the pod's links", func(t *testing.T) {
		before := podLinkIDs(t, n, podA)
		if len(before) != 8 {
			t.Fatalf("pod A has links %v, want 8", before)
		}
		if err := n.dp.Close(); err != nil {
			t.Fatal(err)
		}
		reloadNode(t, n, false)
		for _, p := range []datapath.Pod{podA, podB} {
			if err := n.dp.UpsertPod(p); err != nil {
				t.Fatal(err)
			}
		}
		if after := podLinkIDs(t, n, podA); !maps.Equal(before, after) {
			t.Fatalf("links %v became %v: re-attached instead of updated", before, after)
		}
		if err := n.dp.CgroupHooks(podA); err != nil {
			t.Fatal(err)
		}
		outbound(t, "v4")
	})

	t.Run("scope change to node and back leaves each process one program", func(t *testing.T) {
		for _, scope := range []string{datapath.ScopeNode, datapath.ScopePod} {
			if err := n.dp.Close(); err != nil {
				t.Fatal(err)
			}
			// As the agent does: pods restored, then the programs attached.
			n.scope = scope
			dp, err := datapath.LoadDetached(datapath.Options{BPFFS: n.bpffs, CgroupPath: n.cg.Path, Scope: scope, Inbound: n.inbound})
			if err != nil {
				t.Fatal(err)
			}
			n.dp = dp
			for _, p := range []datapath.Pod{podA, podB} {
				if err := n.dp.UpsertPod(p); err != nil {
					t.Fatal(err)
				}
			}
			if err := n.dp.Attach(); err != nil {
				t.Fatal(err)
			}
			wantC := 0
			if scope == datapath.ScopeNode {
				wantC = 1
			}
			for cg, want := range map[*testenv.Cgroup]int{n.cgroupOf(a): 1, n.cgroupOf(c): wantC} {
				wantConnect4(t, cg, want, scope+" scope")
			}
			outbound(t, "v6")
		}
	})

	t.Run("delete detaches the pod's programs", func(t *testing.T) {
		if err := n.dp.DeletePod(podA); err != nil {
			t.Fatal(err)
		}
		wantConnect4(t, n.cgroupOf(a), 0, "deleted pod")
		if ids := podLinkIDs(t, n, podA); len(ids) != 0 {
			t.Fatalf("deleted pod keeps pinned links %v", ids)
		}
		if err := n.dp.CgroupHooks(podB); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("uninstall detaches every pod's programs", func(t *testing.T) {
		if err := n.dp.Close(); err != nil {
			t.Fatal(err)
		}
		// What `meshlane-agent uninstall` runs on a node.
		if err := datapath.RemovePins(n.bpffs); err != nil {
			t.Fatal(err)
		}
		wantConnect4(t, n.cgroupOf(b), 0, "after uninstall")
		if _, err := os.Stat(filepath.Join(n.bpffs, "cgroups")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("pod links still pinned after uninstall: %v", err)
		}
		reloadNode(t, n, false) // for the test's own cleanup
	})

	t.Run("a pod without a cgroup is refused", func(t *testing.T) {
		p := podB
		p.Cgroup = ""
		err := n.dp.UpsertPod(p)
		if err == nil || !strings.Contains(err.Error(), "cgroupPath") {
			t.Fatalf("UpsertPod without a cgroup: %v, want an error naming cgroupPath", err)
		}
	})
}

// TestPodScopeShortCircuit: with the programs on the meshed pods' own
// cgroups, the short-circuit still takes both ends of every hop between
// two meshed pods (app <-> sidecar in each pod, sidecar <-> sidecar).
func TestPodScopeShortCircuit(t *testing.T) {
	const size = 1 << 20
	prof := mesh.Istio
	n := newNodeScope(t, true, datapath.InboundAuto, datapath.ScopePod)
	a, b := n.pod("a"), n.pod("b")
	n.meshInbound(a, prof, nil)
	n.meshInbound(b, prof, nil)
	n.sidecar(a, prof)
	n.sidecar(b, prof)
	n.server(b, "b", appPort)
	before := n.counters()
	res := n.client(app(a), hostPort(b.IPv4, appPort), "--bytes", fmt.Sprint(size))
	if !res[0].Match || res[0].Bytes != size {
		t.Fatalf("echo of %d bytes through both sidecars: %+v", size, res[0])
	}
	after := n.counters()
	if moved := after["msg_redirected_bytes"] - before["msg_redirected_bytes"]; moved < 6*size {
		t.Fatalf("sk_msg moved %d bytes, want at least %d (3 hops x 2 directions)", moved, 6*size)
	}
	if ins := after["sockhash_inserted"] - before["sockhash_inserted"]; ins != 6 {
		t.Fatalf("sockhash inserts: %d, want 6 (both ends of 3 connections)", ins)
	}
}
