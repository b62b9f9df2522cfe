package agent_test

import (
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
)

func TestFaultEnv(t *testing.T) {
	cfg := func() agent.Config {
		return agent.Config{Maps: newFakeMaps(), StateDir: t.TempDir(), Profile: mesh.Istio}
	}
	t.Setenv(agent.FaultEnv, "add:after-lunch")
	if _, err := agent.New(cfg()); err == nil || !strings.Contains(err.Error(), agent.FaultEnv) {
		t.Fatalf("New with an unknown fault point: %v, want an error naming %s", err, agent.FaultEnv)
	}
	for _, v := range append([]string{""}, agent.FaultPoints...) {
		t.Setenv(agent.FaultEnv, v)
		a, err := agent.New(cfg())
		if err != nil {
			t.Fatalf("%s=%q: %v", agent.FaultEnv, v, err)
		}
		a.Close()
	}
}

// stateWatchingMaps records, at each UpsertPod, whether a state file
// already held the pod.
type stateWatchingMaps struct {
	*fakeMaps
	t        *testing.T
	stateDir string
	listed   []bool
}

func (m *stateWatchingMaps) AddPod(p datapath.Pod) error {
	m.see(p)
	return m.fakeMaps.AddPod(p)
}

func (m *stateWatchingMaps) UpsertPod(p datapath.Pod) error {
	m.see(p)
	return m.fakeMaps.UpsertPod(p)
}

func (m *stateWatchingMaps) see(p datapath.Pod) {
	listed := false
	for _, rec := range statePods(m.t, m.stateDir) {
		listed = listed || rec.NetnsCookie == p.NetnsCookie && rec.Pod != nil
	}
	m.listed = append(m.listed, listed)
}

// TestStateFileBeforeMaps: ADD writes the state file before the maps, so a
// crash between the two leaves a pod the restarted agent knows about
// (test/e2e's TestCrashAtEveryStep kills the real agent there).
func TestStateFileBeforeMaps(t *testing.T) {
	dir := t.TempDir()
	maps := &stateWatchingMaps{fakeMaps: newFakeMaps(), t: t, stateDir: dir}
	a, err := agent.New(agent.Config{Maps: maps, StateDir: dir, Profile: mesh.Istio})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	mustAdd(t, a, newPod(t, "order1", istioAnn).ev)
	if len(maps.listed) != 1 || !maps.listed[0] {
		t.Fatalf("state file listed the pod at the map write: %v, want [true]", maps.listed)
	}
}

// TestRefusedPodForgotten: a pod the maps refuse is neither held nor in
// the state file (a restart must not retry what did not fit), and the
// agent's log says why.
func TestRefusedPodForgotten(t *testing.T) {
	dir := t.TempDir()
	maps := newFakeMaps()
	core, logs := observer.New(zap.ErrorLevel)
	a, err := agent.New(agent.Config{Maps: maps, StateDir: dir, Profile: mesh.Istio, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	p := newPod(t, "refused1", istioAnn)
	maps.setFail(errors.New("datapath: map meshlane_ports is full"))
	if _, err := a.Add(p.ev); err == nil || !strings.Contains(err.Error(), "meshlane_ports is full") {
		t.Fatalf("ADD with full maps: %v", err)
	}
	if len(a.Pods()) != 0 {
		t.Fatalf("refused pod held: %v", heldIDs(a))
	}
	if ids := stateIDs(t, dir); len(ids) != 0 {
		t.Fatalf("state files of %v are left, want none for the refused pod", ids)
	}
	found := false
	for _, e := range logs.All() {
		if strings.Contains(e.Message, "pod refused") && strings.Contains(e.ContextMap()["error"].(string), "meshlane_ports") {
			found = true
		}
	}
	if !found {
		t.Fatalf("no error log line naming the full map: %v", logs.All())
	}
}

// TestInterruptedPromoteCleaned: an agent killed while meshing a waiting
// pod wrote the maps but its state file still says waiting; the pod's
// netns goes while it is down. The restarted agent deletes the entries.
func TestInterruptedPromoteCleaned(t *testing.T) {
	dir := t.TempDir()
	maps := newFakeMaps()
	a1 := newAgent(t, opts{maps: maps, stateDir: dir})
	p := newPod(t, "promote1", nil)
	mustAdd(t, a1, p.ev)
	cookie := p.cookie(t)
	a1.Close()
	// What promote wrote before the kill.
	if err := maps.UpsertPod(datapath.Pod{NetnsCookie: cookie}); err != nil {
		t.Fatal(err)
	}
	p.ns.Delete(t)

	a2 := newAgent(t, opts{maps: maps, stateDir: dir})
	if err := a2.Restore(); err != nil {
		t.Fatal(err)
	}
	if len(a2.Pods()) != 0 || len(maps.cookies()) != 0 {
		t.Fatalf("after restore: pods %v, maps %v, want both empty", heldIDs(a2), maps.cookies())
	}
}
