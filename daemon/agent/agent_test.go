package agent_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podcgroup"
)

func TestAddMeshed(t *testing.T) {
	maps := newFakeMaps()
	stateDir := t.TempDir()
	a := newAgent(t, opts{maps: maps, stateDir: stateDir})
	c := client(serve(t, a))
	p := newPod(t, "meshed1", istioAnn, "10.1.0.7/24", "fd00::7")
	p.ev.Annotations["traffic.sidecar.istio.io/excludeOutboundPorts"] = "5432"

	code, resp, msg := call(t, c, api.PathAdd, p.ev)
	if code != http.StatusOK || resp.State != api.StateMeshed || resp.ContainerID != "meshed1" {
		t.Fatalf("ADD: %d %+v %s", code, resp, msg)
	}
	got, ok := maps.get(p.cookie(t))
	if !ok {
		t.Fatalf("ADD answered 200 but the maps do not hold cookie %d: %v", p.cookie(t), maps.cookies())
	}
	wantIPs := []netip.Addr{netip.MustParseAddr("10.1.0.7"), netip.MustParseAddr("fd00::7")}
	if !slices.Equal(got.IPs, wantIPs) || got.OutboundPort != 15001 || got.InboundPort != 15006 ||
		got.ProxyUID != 1337 || !slices.Contains(got.OutboundExcludePorts, 5432) {
		t.Fatalf("datapath pod = %+v", got)
	}
	if code, _, _ := call(t, c, api.PathCheck, p.ev); code != http.StatusOK {
		t.Fatalf("CHECK of a held pod: %d", code)
	}

	// The pod has its state file, without the annotations.
	rec, ok := statePods(t, stateDir)["meshed1"]
	if !ok || rec.State != api.StateMeshed || rec.Pod == nil || rec.NetnsCookie != p.cookie(t) {
		t.Fatalf("state files: %v, want meshed1 meshed", statePods(t, stateDir))
	}
	if rec.Event.Annotations != nil {
		t.Fatalf("state file carries the annotations: %v", rec.Event.Annotations)
	}
	if recs := a.Pods(); recs[0].Event.Annotations == nil {
		t.Fatal("persisting dropped the annotations of the live record")
	}
}

func TestAddNotMeshedAndLinkerd(t *testing.T) {
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	c := client(serve(t, a))

	plain := newPod(t, "plain1", plainAnn)
	if _, resp, msg := call(t, c, api.PathAdd, plain.ev); resp.State != api.StateNotMeshed {
		t.Fatalf("ADD plain: %+v %s", resp, msg)
	}
	if len(maps.cookies()) != 0 {
		t.Fatalf("a not-meshed pod was written into the maps: %v", maps.cookies())
	}

	// The default profile is Istio, but a Linkerd pod is meshed as Linkerd.
	ld := newPod(t, "linkerd1", linkerdAnn)
	if _, resp, msg := call(t, c, api.PathAdd, ld.ev); resp.State != api.StateMeshed {
		t.Fatalf("ADD linkerd: %+v %s", resp, msg)
	}
	got, ok := maps.get(ld.cookie(t))
	if !ok || got.OutboundPort != 4140 || got.ProxyUID != 2102 {
		t.Fatalf("linkerd pod in maps: %+v %v", got, ok)
	}
}

func TestAddRejectsBadRequests(t *testing.T) {
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	c := client(serve(t, a))
	p := newPod(t, "bad1", istioAnn)
	gone := newPod(t, "gone1", istioAnn)
	gone.ns.Delete(t)

	mod := func(f func(*api.PodEvent)) api.PodEvent {
		ev := p.ev
		ev.Annotations = map[string]string{}
		for k, v := range p.ev.Annotations {
			ev.Annotations[k] = v
		}
		f(&ev)
		return ev
	}
	cases := []struct {
		name string
		ev   api.PodEvent
		want string
	}{
		{"no id", mod(func(e *api.PodEvent) { e.ContainerID = "" }), "containerID is empty"},
		{"bad id", mod(func(e *api.PodEvent) { e.ContainerID = "../x" }), "invalid character"},
		{"hidden id", mod(func(e *api.PodEvent) { e.ContainerID = ".tmp-1" }), "invalid character"},
		// The id names the pod's state file, <id>.json: 255 bytes at most.
		{"long id", mod(func(e *api.PodEvent) { e.ContainerID = strings.Repeat("a", 251) }), "at most 250"},
		{"no netns", mod(func(e *api.PodEvent) { e.Netns = "" }), "netns is empty"},
		{"relative netns", mod(func(e *api.PodEvent) { e.Netns = "netns/x" }), "not an absolute path"},
		{"no ifname", mod(func(e *api.PodEvent) { e.IfName = "" }), "ifName is empty"},
		{"no ips", mod(func(e *api.PodEvent) { e.IPs = nil }), "ips is empty"},
		{"bad ip", mod(func(e *api.PodEvent) { e.IPs = []string{"10.1.0.7", "10.1.0.999"} }), "not an IP address"},
		{"netns gone", gone.ev, "network namespace is gone"},
		{"bad annotation", mod(func(e *api.PodEvent) {
			e.Annotations["traffic.sidecar.istio.io/excludeInboundPorts"] = "http"
		}), "excludeInboundPorts"},
		{"two meshes", mod(func(e *api.PodEvent) { e.Annotations["linkerd.io/proxy-version"] = "x" }), "two meshes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, _, msg := call(t, c, api.PathAdd, tc.ev)
			if code != http.StatusBadRequest || !strings.Contains(msg, tc.want) {
				t.Fatalf("got %d %q, want 400 mentioning %q", code, msg, tc.want)
			}
		})
	}
	if len(maps.cookies()) != 0 || len(a.Pods()) != 0 {
		t.Fatalf("rejected ADDs changed state: maps %v, pods %v", maps.cookies(), heldIDs(a))
	}
}

func TestBadAnnotationsOnReplaceChangeNothing(t *testing.T) {
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	p := newPod(t, "keep1", istioAnn)
	mustAdd(t, a, p.ev)
	old := p.cookie(t)

	p.ns.Recreate(t)
	bad := p.ev
	bad.Annotations = map[string]string{"sidecar.istio.io/status": "x", "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/33"}
	if _, err := a.Add(bad); err == nil {
		t.Fatal("ADD with a bad CIDR annotation succeeded")
	}
	if _, ok := maps.get(old); !ok || len(maps.cookies()) != 1 {
		t.Fatalf("a rejected ADD touched the maps: %v (old cookie %d)", maps.cookies(), old)
	}
	if recs := a.Pods(); len(recs) != 1 || recs[0].NetnsCookie != old {
		t.Fatalf("a rejected ADD touched the registry: %+v", recs)
	}
}

func TestWaitingPodMeshedWhenSidecarListens(t *testing.T) {
	for _, tc := range []struct {
		name, network, addr string
		port                uint16
		profile             string
	}{
		{"istio", "tcp4", "0.0.0.0:15001", 15001, "istio"},
		{"linkerd", "tcp6", "[::1]:4140", 4140, "linkerd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			maps := newFakeMaps()
			dir := t.TempDir()
			a := newAgent(t, opts{maps: maps, stateDir: dir})
			c := client(serve(t, a))
			p := newPod(t, "wait-"+tc.name, nil)

			_, resp, msg := call(t, c, api.PathAdd, p.ev)
			if resp.State != api.StateWaiting {
				t.Fatalf("ADD without annotations: %+v %s", resp, msg)
			}
			// Past the first polls, with no listener, it is still waiting
			// and nothing is redirected.
			time.Sleep(1200 * time.Millisecond)
			if s := podState(a, p.ev.ContainerID); s != api.StateWaiting || len(maps.cookies()) != 0 {
				t.Fatalf("before any listener: state %q, maps %v", s, maps.cookies())
			}

			p.ns.Listen(t, tc.network, tc.addr)
			eventually(t, "pod meshed", func() bool { return podState(a, p.ev.ContainerID) == api.StateMeshed })
			got, ok := maps.get(p.cookie(t))
			if !ok || got.OutboundPort != tc.port {
				t.Fatalf("maps after the sidecar appeared: %+v %v", got, ok)
			}
			if recs := a.Pods(); recs[0].Profile != tc.profile {
				t.Fatalf("profile = %q, want %q", recs[0].Profile, tc.profile)
			}
			// The pod's state file follows (written right after the record
			// changes, so poll).
			eventually(t, "state file says meshed", func() bool {
				rec := statePods(t, dir)[p.ev.ContainerID]
				return rec.State == api.StateMeshed && rec.Pod != nil && rec.Profile == tc.profile
			})
			eventually(t, "pod-meshed event", func() bool { return hasEvent(a, agent.EventMeshed, p.ev.ContainerID) })
		})
	}
}

func hasEvent(a *agent.Agent, kind, id string) bool {
	return slices.ContainsFunc(a.Events(), func(e agent.Event) bool { return e.Kind == kind && e.ContainerID == id })
}

func TestIdempotentAddDel(t *testing.T) {
	maps := newFakeMaps()
	dir := t.TempDir()
	a := newAgent(t, opts{maps: maps, stateDir: dir})
	c := client(serve(t, a))
	p := newPod(t, "idem1", istioAnn)

	for i := range 3 {
		if code, resp, msg := call(t, c, api.PathAdd, p.ev); code != http.StatusOK || resp.State != api.StateMeshed {
			t.Fatalf("ADD #%d: %d %+v %s", i, code, resp, msg)
		}
	}
	if n := maps.upsertCount(); n != 1 {
		t.Fatalf("repeated ADDs wrote the maps %d times, want 1", n)
	}

	_, resp, _ := call(t, c, api.PathDel, p.ev)
	if resp.State != api.StateDeleted {
		t.Fatalf("DEL: %+v", resp)
	}
	if len(maps.cookies()) != 0 || len(a.Pods()) != 0 || len(stateIDs(t, dir)) != 0 {
		t.Fatalf("after DEL: maps %v, pods %v, state files %v", maps.cookies(), heldIDs(a), stateIDs(t, dir))
	}
	_, resp, _ = call(t, c, api.PathDel, p.ev)
	if resp.State != api.StateUnknownPod {
		t.Fatalf("second DEL: %+v", resp)
	}
	if code, _, msg := call(t, c, api.PathCheck, p.ev); code != http.StatusNotFound || !strings.Contains(msg, "not held") {
		t.Fatalf("CHECK after DEL: %d %q", code, msg)
	}
}

func TestDelUnknown(t *testing.T) {
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	c := client(serve(t, a))
	other := newPod(t, "live1", istioAnn)
	mustAdd(t, a, other.ev)

	// No netns, no IPs: what a DEL after a node reboot looks like.
	code, resp, msg := call(t, c, api.PathDel, api.PodEvent{ContainerID: "never-seen", IfName: "eth0"})
	if code != http.StatusOK || resp.State != api.StateUnknownPod {
		t.Fatalf("DEL of an unknown container: %d %+v %s", code, resp, msg)
	}
	// A DEL naming a held pod's netns under another id must not touch it.
	stray := other.ev
	stray.ContainerID = "stray1"
	if _, resp, _ := call(t, c, api.PathDel, stray); resp.State != api.StateUnknownPod {
		t.Fatalf("DEL stray: %+v", resp)
	}
	if _, ok := maps.get(other.cookie(t)); !ok {
		t.Fatal("DEL of an unknown id removed a held pod's map entry")
	}
	if code, _, _ := call(t, c, api.PathDel, api.PodEvent{ContainerID: ""}); code != http.StatusBadRequest {
		t.Fatalf("DEL without container id: %d, want 400", code)
	}
}

func TestNetnsPathReuse(t *testing.T) {
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	p := newPod(t, "reuse1", istioAnn)
	mustAdd(t, a, p.ev)
	c1 := p.cookie(t)

	p.ns.Recreate(t)
	c2 := p.cookie(t)
	mustAdd(t, a, p.ev)

	if got := maps.cookies(); !slices.Equal(got, []uint64{c2}) {
		t.Fatalf("maps after reuse = %v, want only the new cookie %d (old %d)", got, c2, c1)
	}
	ops := maps.opLog()
	want := []string{"add " + itoa(c1), "delete " + itoa(c1), "add " + itoa(c2)}
	if !slices.Equal(ops, want) {
		t.Fatalf("map ops = %v, want %v (old entries deleted first)", ops, want)
	}
	if recs := a.Pods(); len(recs) != 1 || recs[0].NetnsCookie != c2 {
		t.Fatalf("registry after reuse: %+v", recs)
	}
}

func itoa(c uint64) string {
	b, _ := json.Marshal(c)
	return string(b)
}

func TestGCVerb(t *testing.T) {
	maps := newFakeMaps()
	dir := t.TempDir()
	a := newAgent(t, opts{maps: maps, stateDir: dir})
	c := client(serve(t, a))
	keep := newPod(t, "gc-keep", istioAnn)
	wrongIf := newPod(t, "gc-wrongif", istioAnn)
	gone := newPod(t, "gc-gone", plainAnn)
	for _, p := range []pod{keep, wrongIf, gone} {
		mustAdd(t, a, p.ev)
	}

	code, body := do(t, c, http.MethodPost, api.PathGC, api.GCRequest{ValidAttachments: []api.Attachment{
		{ContainerID: "gc-keep", IfName: "eth0"},
		{ContainerID: "gc-wrongif", IfName: "net1"},
		{ContainerID: "not-held", IfName: "eth0"},
	}})
	if code != http.StatusOK {
		t.Fatalf("GC: %d %s", code, body)
	}
	var resp api.GCResponse
	if err := json.Unmarshal(body, &resp); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(resp.Removed, []string{"gc-gone", "gc-wrongif"}) {
		t.Fatalf("GC removed %v", resp.Removed)
	}
	if !slices.Equal(heldIDs(a), []string{"gc-keep"}) || !slices.Equal(maps.cookies(), []uint64{keep.cookie(t)}) ||
		!slices.Equal(stateIDs(t, dir), []string{"gc-keep"}) {
		t.Fatalf("after GC: pods %v, maps %v, state files %v", heldIDs(a), maps.cookies(), stateIDs(t, dir))
	}

	// A request without the list is refused rather than read as "none".
	code, body = do(t, c, http.MethodPost, api.PathGC, `{"valid":[]}`)
	if code != http.StatusBadRequest || !strings.Contains(errorBody(t, body), "validAttachments") {
		t.Fatalf("GC without validAttachments: %d %s", code, body)
	}
	// An explicit empty list drops everything.
	code, body = do(t, c, http.MethodPost, api.PathGC, `{"validAttachments":[]}`)
	if code != http.StatusOK || !strings.Contains(string(body), "gc-keep") || len(a.Pods()) != 0 {
		t.Fatalf("GC with an empty list: %d %s, pods %v", code, body, heldIDs(a))
	}
}

func TestBackgroundGC(t *testing.T) {
	maps := newFakeMaps()
	dir := t.TempDir()
	a := newAgent(t, opts{maps: maps, stateDir: dir, gc: 100 * time.Millisecond})
	deleted := newPod(t, "bg-deleted", istioAnn)
	replaced := newPod(t, "bg-replaced", istioAnn)
	live := newPod(t, "bg-live", istioAnn)
	waiting := newPod(t, "bg-waiting", nil)
	for _, p := range []pod{deleted, replaced, live, waiting} {
		mustAdd(t, a, p.ev)
	}
	if len(a.Pods()) != 4 {
		t.Fatalf("setup: pods %v", heldIDs(a))
	}

	deleted.ns.Delete(t)
	replaced.ns.Recreate(t)
	waiting.ns.Delete(t)
	eventually(t, "GC of dead pods", func() bool { return slices.Equal(heldIDs(a), []string{"bg-live"}) })
	if !slices.Equal(maps.cookies(), []uint64{live.cookie(t)}) {
		t.Fatalf("maps after background GC: %v, want only %d", maps.cookies(), live.cookie(t))
	}
	eventually(t, "state files of dead pods removed", func() bool { return slices.Equal(stateIDs(t, dir), []string{"bg-live"}) })
	eventually(t, "GC event", func() bool { return hasEvent(a, agent.EventGC, "bg-deleted") })
}

func TestRestore(t *testing.T) {
	stateDir := t.TempDir()
	maps := newFakeMaps()
	a1 := newAgent(t, opts{maps: maps, stateDir: stateDir})
	meshed := newPod(t, "rs-meshed", istioAnn)
	plain := newPod(t, "rs-plain", plainAnn)
	waiting := newPod(t, "rs-waiting", nil)
	dead := newPod(t, "rs-dead", istioAnn)
	for _, p := range []pod{meshed, plain, waiting, dead} {
		mustAdd(t, a1, p.ev)
	}
	deadCookie := dead.cookie(t)
	a1.Close()

	// The agent is down; a pod's netns goes meanwhile.
	dead.ns.Delete(t)

	// The restarted agent gets the same pinned maps (still holding both
	// meshed pods) but they might also have been recreated empty:
	// Restore must make them right either way.
	for _, tc := range []struct {
		name string
		maps *fakeMaps
	}{{"pinned", maps}, {"recreated", newFakeMaps()}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			copyDir(t, filepath.Join(stateDir, "pods"), filepath.Join(dir, "pods"))
			a2 := newAgent(t, opts{maps: tc.maps, stateDir: dir})
			if err := a2.Restore(); err != nil {
				t.Fatalf("Restore: %v", err)
			}
			if got, want := heldIDs(a2), []string{"rs-meshed", "rs-plain", "rs-waiting"}; !slices.Equal(got, want) {
				t.Fatalf("restored %v, want %v", got, want)
			}
			if got, want := tc.maps.cookies(), []uint64{meshed.cookie(t)}; !slices.Equal(got, want) {
				t.Fatalf("maps after restore %v, want %v (dead pod %d gone)", got, want, deadCookie)
			}
			if podState(a2, "rs-waiting") != api.StateWaiting {
				t.Fatalf("waiting pod restored as %q", podState(a2, "rs-waiting"))
			}
			// The dead pod's state file is gone.
			if got, want := stateIDs(t, dir), []string{"rs-meshed", "rs-plain", "rs-waiting"}; !slices.Equal(got, want) {
				t.Fatalf("state files after restore: %v, want %v", got, want)
			}
		})
	}

	// The waiting pod's watcher came back with the restore.
	a3 := newAgent(t, opts{maps: newFakeMaps(), stateDir: stateDir})
	if err := a3.Restore(); err != nil {
		t.Fatal(err)
	}
	waiting.ns.Listen(t, "tcp4", "127.0.0.1:15001")
	eventually(t, "restored waiting pod meshed", func() bool { return podState(a3, "rs-waiting") == api.StateMeshed })
}

// TestRestoreRefusedPod: a pod the maps refuse at restore (a full map
// after a crash) is dropped with an error line instead of keeping the
// agent from starting; the other pods are restored.
func TestRestoreRefusedPod(t *testing.T) {
	stateDir := t.TempDir()
	a1 := newAgent(t, opts{maps: newFakeMaps(), stateDir: stateDir})
	meshed, plain := newPod(t, "rr-meshed", istioAnn), newPod(t, "rr-plain", plainAnn)
	for _, p := range []pod{meshed, plain} {
		mustAdd(t, a1, p.ev)
	}
	a1.Close()
	full := newFakeMaps()
	full.failWrite = errors.New("datapath: map meshlane_ports is full")
	a2 := newAgent(t, opts{maps: full, stateDir: stateDir})
	if err := a2.Restore(); err != nil {
		t.Fatalf("Restore with a full map: %v", err)
	}
	if got, want := heldIDs(a2), []string{"rr-plain"}; !slices.Equal(got, want) {
		t.Fatalf("held %v, want %v", got, want)
	}
	if got, want := stateIDs(t, stateDir), []string{"rr-plain"}; !slices.Equal(got, want) {
		t.Fatalf("state files %v, want %v: the refused pod's file is still there", got, want)
	}

	// A datapath that takes deletes but refuses the pod: what a previous
	// agent wrote for it is removed, not left half in force.
	a2.Close()
	refusing := newFakeMaps()
	refusing.failUpsert = errors.New("datapath: pod has no cgroup")
	stateDir2 := t.TempDir()
	a3 := newAgent(t, opts{maps: newFakeMaps(), stateDir: stateDir2})
	mustAdd(t, a3, meshed.ev)
	a3.Close()
	a4 := newAgent(t, opts{maps: refusing, stateDir: stateDir2})
	if err := a4.Restore(); err != nil {
		t.Fatal(err)
	}
	if ops := refusing.opLog(); !slices.Equal(ops, []string{fmt.Sprintf("delete %d", meshed.cookie(t))}) {
		t.Fatalf("datapath calls %v, want the refused pod deleted", ops)
	}
}

// copyDir copies the regular files of from into to, made if missing.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.CopyFS(to, os.DirFS(from)); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreRefusesUnknownStateFile: a pod file the agent cannot read
// stops Restore with an error naming the file and what to do, and changes
// nothing, so the other pods' files are all there for the next start.
func TestRestoreRefusesUnknownStateFile(t *testing.T) {
	base := t.TempDir()
	a1 := newAgent(t, opts{stateDir: base})
	good := []string{"rf-good1", "rf-good2"}
	for _, id := range good {
		mustAdd(t, a1, newPod(t, id, istioAnn).ev)
	}
	a1.Close()
	good1, err := os.ReadFile(filepath.Join(base, "pods", "rf-good1.json"))
	if err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"version":       `{"version": 99, "pod": {"event": {"containerID": "rf-bad"}, "state": "not-meshed"}}`,
		"corrupt":       `{"version": 1, "pod": {`,
		"other pod":     string(good1),
		"meshed no pod": `{"version": 1, "pod": {"event": {"containerID": "rf-bad"}, "state": "meshed"}}`,
		"unknown state": `{"version": 1, "pod": {"event": {"containerID": "rf-bad"}, "state": "sleeping"}}`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			copyDir(t, base, dir)
			bad := filepath.Join(dir, "pods", "rf-bad.json")
			if err := os.WriteFile(bad, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			maps := newFakeMaps()
			a := newAgent(t, opts{maps: maps, stateDir: dir})
			err := a.Restore()
			if err == nil || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), "move it away") {
				t.Fatalf("Restore = %v, want an error naming %s and saying what to do", err, bad)
			}
			if len(a.Pods()) != 0 || len(maps.cookies()) != 0 {
				t.Fatalf("refused Restore changed state: pods %v, maps %v", heldIDs(a), maps.cookies())
			}
			// Done as told, the next start has every other pod.
			if err := os.Rename(bad, filepath.Join(dir, "rf-bad.json.moved")); err != nil {
				t.Fatal(err)
			}
			a2 := newAgent(t, opts{stateDir: dir})
			if err := a2.Restore(); err != nil {
				t.Fatalf("Restore after moving the file away: %v", err)
			}
			if !slices.Equal(heldIDs(a2), good) {
				t.Fatalf("restored %v, want %v", heldIDs(a2), good)
			}
		})
	}
	t.Run("several", func(t *testing.T) {
		dir := t.TempDir()
		copyDir(t, base, dir)
		for _, id := range []string{"rf-bad1", "rf-bad2"} {
			if err := os.WriteFile(filepath.Join(dir, "pods", id+".json"), []byte("{"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		err := newAgent(t, opts{stateDir: dir}).Restore()
		if err == nil || !strings.Contains(err.Error(), "2 state files") || !strings.Contains(err.Error(), "move it away") {
			t.Fatalf("Restore = %v, want an error counting both files", err)
		}
	})
	// The legacy single file is refused the same way (and left as it is).
	for name, content := range map[string]string{
		"legacy version": `{"version": 99, "pods": []}`,
		"legacy corrupt": `{"version": 1, "pods": [`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			legacy := filepath.Join(dir, "pods.json")
			if err := os.WriteFile(legacy, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			err := newAgent(t, opts{stateDir: dir}).Restore()
			if err == nil || !strings.Contains(err.Error(), legacy) || !strings.Contains(err.Error(), "move it away") {
				t.Fatalf("Restore = %v, want an error naming %s and saying what to do", err, legacy)
			}
			if _, err := os.Stat(legacy); err != nil {
				t.Fatalf("refused legacy file: %v", err)
			}
		})
	}
	// No file at all is a first start.
	if err := newAgent(t, opts{}).Restore(); err != nil {
		t.Fatalf("Restore without a state file: %v", err)
	}
}

// TestKilledBetweenMapsAndStateFile: the maps hold a pod the state file
// does not list, as an agent of an earlier version (which wrote the maps
// first) killed between the two, or a lost state file, leaves them.
func TestKilledBetweenMapsAndStateFile(t *testing.T) {
	maps := newFakeMaps()
	a1 := newAgent(t, opts{maps: maps, stateDir: t.TempDir()})
	p := newPod(t, "crash1", istioAnn)
	mustAdd(t, a1, p.ev)
	a1.Close()

	// Restart with the maps as left, but a state file written before the
	// ADD (here: none).
	t.Run("retried ADD", func(t *testing.T) {
		a2 := newAgent(t, opts{maps: maps})
		if err := a2.Restore(); err != nil {
			t.Fatal(err)
		}
		mustAdd(t, a2, p.ev)
		if !slices.Equal(maps.cookies(), []uint64{p.cookie(t)}) || !slices.Equal(heldIDs(a2), []string{"crash1"}) {
			t.Fatalf("after retried ADD: maps %v, pods %v", maps.cookies(), heldIDs(a2))
		}
	})
	t.Run("DEL instead", func(t *testing.T) {
		a3 := newAgent(t, opts{maps: maps})
		if err := a3.Restore(); err != nil {
			t.Fatal(err)
		}
		mustDel(t, a3, p.ev)
		if len(maps.cookies()) != 0 {
			t.Fatalf("DEL of the unrecorded pod left map entries: %v", maps.cookies())
		}
	})
}

func TestMapsFailure(t *testing.T) {
	maps := newFakeMaps()
	a := newAgent(t, opts{maps: maps})
	c := client(serve(t, a))
	p := newPod(t, "fail1", istioAnn)

	maps.setFail(errors.New("map full"))
	code, _, msg := call(t, c, api.PathAdd, p.ev)
	if code != http.StatusInternalServerError || !strings.Contains(msg, "map full") {
		t.Fatalf("ADD with failing maps: %d %q", code, msg)
	}
	if len(a.Pods()) != 0 {
		t.Fatalf("a pod whose map write failed is held: %v", heldIDs(a))
	}

	maps.setFail(nil)
	mustAdd(t, a, p.ev)
	maps.setFail(errors.New("map busy"))
	if code, _, _ := call(t, c, api.PathDel, p.ev); code != http.StatusInternalServerError {
		t.Fatalf("DEL with failing maps: %d, want 500 so the plugin retries", code)
	}
	maps.setFail(nil)
	if _, resp, _ := call(t, c, api.PathDel, p.ev); resp.State != api.StateDeleted || len(maps.cookies()) != 0 {
		t.Fatalf("retried DEL: %+v, maps %v", resp, maps.cookies())
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	bad := mesh.Istio
	bad.Name = "consul"
	for name, cfg := range map[string]agent.Config{
		"no maps":      {StateDir: "/x", Profile: mesh.Istio},
		"no state dir": {Maps: newFakeMaps(), Profile: mesh.Istio},
		"bad profile":  {Maps: newFakeMaps(), StateDir: "/x", Profile: bad},
	} {
		if _, err := agent.New(cfg); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
}

// TestPodCgroupScope: in pod scope a meshed pod's cgroupPath becomes the
// cgroup its programs attach to (both runtime spellings); a meshed pod
// without one, or with one outside the allowed subtree, is refused with
// nothing written or recorded; a pod that is not meshed needs none.
func TestPodCgroupScope(t *testing.T) {
	maps, dir := newFakeMaps(), t.TempDir()
	a := newAgent(t, opts{maps: maps, stateDir: dir,
		cgroups: &podcgroup.Resolver{Mount: "/sys/fs/cgroup", Within: "/sys/fs/cgroup/kubepods.slice"}})
	c := client(serve(t, a))
	istio := map[string]string{"sidecar.istio.io/status": "{}"}

	p := newPod(t, "slice", istio)
	p.ev.CgroupPath = "kubepods-burstable-pod1.slice"
	mustAdd(t, a, p.ev)
	got, ok := maps.get(p.cookie(t))
	if want := "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"; !ok || got.Cgroup != want {
		t.Fatalf("pod written with cgroup %q (held %v), want %s", got.Cgroup, ok, want)
	}

	for _, tc := range []struct{ cgroupPath, want string }{
		{"", "passed no cgroupPath"},
		{"/system.slice/kubelet.service", "not a cgroup below /sys/fs/cgroup/kubepods.slice"},
		{"kubepods--x.slice", "not a valid systemd slice name"},
	} {
		q := newPod(t, "bad", istio)
		q.ev.CgroupPath = tc.cgroupPath
		code, _, msg := call(t, c, api.PathAdd, q.ev)
		if code != http.StatusBadRequest || !strings.Contains(msg, tc.want) || !strings.Contains(msg, "--cgroup-scope pod") {
			t.Errorf("ADD with cgroupPath %q: %d %q, want 400 saying %q", tc.cgroupPath, code, msg, tc.want)
		}
		if _, ok := maps.get(q.cookie(t)); ok {
			t.Errorf("refused pod written into the maps")
		}
	}
	if ids := stateIDs(t, dir); !slices.Equal(ids, []string{"slice"}) {
		t.Errorf("state files %v, want only the accepted pod", ids)
	}

	plain := newPod(t, "plain", map[string]string{})
	if r := mustAdd(t, a, plain.ev); r.State != api.StateNotMeshed {
		t.Errorf("pod without a sidecar and without cgroupPath: %s, want %s", r.State, api.StateNotMeshed)
	}
}

// TestWaitingPodWithoutCgroupInPodScope: in pod scope, a pod the agent
// waited for whose runtime passed no cgroupPath becomes "not meshed" with
// the reason once its sidecar listens, instead of waiting for ever, and
// nothing is written into the maps.
func TestWaitingPodWithoutCgroupInPodScope(t *testing.T) {
	maps, dir := newFakeMaps(), t.TempDir()
	a := newAgent(t, opts{maps: maps, stateDir: dir,
		cgroups: &podcgroup.Resolver{Mount: "/sys/fs/cgroup", Within: "/sys/fs/cgroup"}})
	p := newPod(t, "wait-nocg", nil)
	if r := mustAdd(t, a, p.ev); r.State != api.StateWaiting {
		t.Fatalf("ADD without annotations: %s", r.State)
	}
	p.ns.Listen(t, "tcp4", "0.0.0.0:15001")
	eventually(t, "pod not meshed", func() bool { return podState(a, p.ev.ContainerID) == api.StateNotMeshed })
	if recs := a.Pods(); !strings.Contains(recs[0].Reason, "cgroupPath") {
		t.Fatalf("reason %q does not name the missing cgroupPath", recs[0].Reason)
	}
	if c := maps.cookies(); len(c) != 0 {
		t.Fatalf("maps hold %v", c)
	}
	eventually(t, "state file says not meshed", func() bool { return statePods(t, dir)[p.ev.ContainerID].State == api.StateNotMeshed })
}
