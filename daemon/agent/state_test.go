package agent_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
)

// writeLegacy writes recs as the pods.json of agents before per-pod state
// files.
func writeLegacy(t *testing.T, dir string, recs []agent.PodRecord) {
	t.Helper()
	data, err := json.MarshalIndent(map[string]any{"version": 1, "pods": recs}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pods.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestMigrateLegacyStateFile: an agent upgraded on a node with a pods.json
// restores its pods from it, writes one state file per pod and then
// removes pods.json; killed anywhere in between, it migrates again.
func TestMigrateLegacyStateFile(t *testing.T) {
	base := t.TempDir()
	a1 := newAgent(t, opts{stateDir: base})
	meshed, plain, waiting := newPod(t, "mg-meshed", istioAnn), newPod(t, "mg-plain", plainAnn), newPod(t, "mg-waiting", nil)
	stray := newPod(t, "mg-stray", istioAnn)
	for _, p := range []pod{meshed, plain, waiting, stray} {
		mustAdd(t, a1, p.ev)
	}
	a1.Close()
	all := statePods(t, base)
	// What the old agent's pods.json held: the same records, one file.
	want := map[string]agent.PodRecord{}
	var legacy []agent.PodRecord
	for _, id := range []string{"mg-meshed", "mg-plain", "mg-waiting"} {
		want[id] = all[id]
		legacy = append(legacy, all[id])
	}
	wantIDs := []string{"mg-meshed", "mg-plain", "mg-waiting"}

	// check restores dir and expects the legacy pods held, in the maps
	// and in their own files, and pods.json gone.
	check := func(t *testing.T, dir string) {
		t.Helper()
		maps := newFakeMaps()
		a := newAgent(t, opts{maps: maps, stateDir: dir})
		if err := a.Restore(); err != nil {
			t.Fatalf("Restore: %v", err)
		}
		if got := heldIDs(a); !slices.Equal(got, wantIDs) {
			t.Fatalf("held %v, want %v", got, wantIDs)
		}
		if got := maps.cookies(); !slices.Equal(got, []uint64{meshed.cookie(t)}) {
			t.Fatalf("maps %v, want only the meshed pod %d", got, meshed.cookie(t))
		}
		if got := statePods(t, dir); !reflect.DeepEqual(got, want) {
			t.Fatalf("state files after migration:\n%v\nwant\n%v", got, want)
		}
		if _, err := os.Stat(filepath.Join(dir, "pods.json")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("pods.json after migration: %v, want it removed", err)
		}
		if podState(a, "mg-waiting") != api.StateWaiting {
			t.Fatalf("waiting pod restored as %q", podState(a, "mg-waiting"))
		}
	}

	t.Run("first start", func(t *testing.T) {
		dir := t.TempDir()
		writeLegacy(t, dir, legacy)
		check(t, dir)
		// The next start reads the pod files alone.
		check(t, dir)
	})
	t.Run("killed mid-migration", func(t *testing.T) {
		// Some pod files written, pods.json not yet removed, a temp file
		// of the write that was cut short, and the file of a pod that
		// pods.json does not list (left from before a downgrade).
		dir := t.TempDir()
		writeLegacy(t, dir, legacy)
		pods := filepath.Join(dir, "pods")
		if err := os.Mkdir(pods, 0o700); err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"mg-meshed", "mg-stray"} {
			data, err := os.ReadFile(filepath.Join(base, "pods", id+".json"))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(pods, id+".json"), data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(pods, ".tmp-12345"), []byte(`{"version": 1, "pod": {`), 0o600); err != nil {
			t.Fatal(err)
		}
		check(t, dir)
		if _, err := os.Stat(filepath.Join(pods, ".tmp-12345")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("leftover temp file: %v, want it removed", err)
		}
	})
	t.Run("pod file not written", func(t *testing.T) {
		// A pod file that cannot be written (here: a directory in its
		// place) stops the migration before pods.json goes.
		dir := t.TempDir()
		writeLegacy(t, dir, legacy)
		block := filepath.Join(dir, "pods", "mg-plain.json", "x")
		if err := os.MkdirAll(block, 0o700); err != nil {
			t.Fatal(err)
		}
		err := newAgent(t, opts{stateDir: dir}).Restore()
		if err == nil || !strings.Contains(err.Error(), "mg-plain.json") {
			t.Fatalf("Restore = %v, want the failed write of mg-plain.json", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "pods.json")); err != nil {
			t.Fatalf("pods.json after a failed migration: %v, want it kept", err)
		}
		if err := os.RemoveAll(filepath.Dir(block)); err != nil {
			t.Fatal(err)
		}
		check(t, dir)
	})
}

// TestRestoreSkipsForeignFiles: files in the pods directory that are no
// pod's state file are neither read nor removed, and do not stop the
// agent; a leftover temp file is removed.
func TestRestoreSkipsForeignFiles(t *testing.T) {
	dir := t.TempDir()
	a1 := newAgent(t, opts{stateDir: dir})
	p := newPod(t, "fs-1", istioAnn)
	mustAdd(t, a1, p.ev)
	a1.Close()
	pods := filepath.Join(dir, "pods")
	foreign := []string{"notes.txt", "fs-1.json~", "-x.json"}
	for _, name := range append(slices.Clone(foreign), ".tmp-999") {
		if err := os.WriteFile(filepath.Join(pods, name), []byte("not JSON"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	a2 := newAgent(t, opts{stateDir: dir})
	if err := a2.Restore(); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if !slices.Equal(heldIDs(a2), []string{"fs-1"}) {
		t.Fatalf("held %v", heldIDs(a2))
	}
	for _, name := range foreign {
		if _, err := os.Stat(filepath.Join(pods, name)); err != nil {
			t.Errorf("foreign file %s: %v, want it left alone", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(pods, ".tmp-999")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover temp file: %v, want it removed", err)
	}
}

// TestLongestContainerID: the longest id the agent accepts still names a
// state file (a file name holds 255 bytes) and survives a restart.
func TestLongestContainerID(t *testing.T) {
	dir := t.TempDir()
	a1 := newAgent(t, opts{stateDir: dir})
	p := newPod(t, strings.Repeat("l", 250), plainAnn)
	mustAdd(t, a1, p.ev)
	a1.Close()
	a2 := newAgent(t, opts{stateDir: dir})
	if err := a2.Restore(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(heldIDs(a2), []string{p.ev.ContainerID}) {
		t.Fatalf("held %v", heldIDs(a2))
	}
}
