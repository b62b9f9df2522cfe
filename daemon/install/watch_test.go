package install

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// comeBack is how soon meshlane's entry must be back after the primary
// CNI removed it.
const comeBack = time.Second

// watchRun is one Watch running in the background of a test.
type watchRun struct {
	mu     sync.Mutex
	states []State
	logs   *observer.ObservedLogs
	stop   func()
}

func (r *watchRun) last() State {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.states) == 0 {
		return State{}
	}
	return r.states[len(r.states)-1]
}

// startWatch runs Watch on a fresh bin directory and confDir until the test
// ends.
func startWatch(t *testing.T, confDir string, tune func(*Config)) *watchRun {
	t.Helper()
	src := filepath.Join(t.TempDir(), "meshlane-cni")
	if err := os.WriteFile(src, []byte("plugin binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.InfoLevel)
	cfg := testConfig(confDir)
	cfg.BinDir, cfg.PluginSrc, cfg.Logger = t.TempDir(), src, zap.New(core)
	if tune != nil {
		tune(&cfg)
	}
	r := &watchRun{logs: logs}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Watch(ctx, cfg, func(s State) {
			r.mu.Lock()
			r.states = append(r.states, s)
			r.mu.Unlock()
		})
	}()
	r.stop = func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Watch returned %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Watch did not return after its context ended")
		}
	}
	t.Cleanup(r.stop)
	return r
}

func TestWatchWaitsForPrimaryThenChains(t *testing.T) {
	dir := t.TempDir()
	r := startWatch(t, dir, nil)
	if !waitFor(2*time.Second, func() bool { s := r.last(); return s.BinaryInstalled && IsWaiting(s.Err) }) {
		t.Fatalf("state while no config exists = %+v, want binary installed and waiting", r.last())
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("the installer wrote into an empty config directory: %v", entries)
	}
	path := filepath.Join(dir, calicoFile)
	writeFile(t, path, primaryBytes(t, calicoFile))
	if !waitFor(comeBack, func() bool { return isChained(path) }) {
		t.Fatal("the new primary config was not chained within a second")
	}
	if !waitFor(time.Second, func() bool { return r.last().Ready() }) {
		t.Errorf("state = %+v, want ready", r.last())
	}
	if s := r.last(); s.ConfList != path || s.Writes != 1 {
		t.Errorf("state = %+v, want ConfList %s and 1 write", s, path)
	}
}

// TestWatchRechainsWithoutLoop plays a primary CNI that rewrites its file in
// place and, separately, replaces it by rename, as Calico and Cilium do.
// Each time meshlane's entry must come back within a second, and the
// installer must make exactly one write per rewrite: none in reaction to
// its own writes.
func TestWatchRechainsWithoutLoop(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	orig := primaryBytes(t, calicoFile)
	writeFile(t, path, orig)
	r := startWatch(t, dir, nil)
	if !waitFor(2*time.Second, func() bool { return isChained(path) }) {
		t.Fatal("not chained at start")
	}

	const rounds = 4
	primaryWrites := 0
	for i := 0; i < rounds; i++ {
		writeFile(t, path, orig) // truncate and write in place
		primaryWrites++
		if !waitFor(comeBack, func() bool { return isChained(path) }) {
			t.Fatalf("rewrite %d: meshlane's entry not back within %s", i, comeBack)
		}
		tmp := filepath.Join(dir, ".calico-tmp")
		writeFile(t, tmp, orig)
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		primaryWrites++
		if !waitFor(comeBack, func() bool { return isChained(path) }) {
			t.Fatalf("replace %d: meshlane's entry not back within %s", i, comeBack)
		}
	}
	// The file shows the entry a moment before the state counts the write.
	want := primaryWrites + 1
	if !waitFor(time.Second, func() bool { return r.last().Writes >= want }) {
		t.Errorf("installer writes = %d, want %d (one at start and one per primary rewrite)", r.last().Writes, want)
	}
	time.Sleep(2 * time.Second)
	s := r.last()
	if s.Writes != want {
		t.Errorf("installer writes = %d after 2s with nobody else writing, want %d: a write loop", s.Writes, want)
	}
	if !s.Ready() {
		t.Errorf("state = %+v, want ready", s)
	}
	if n := r.logs.FilterMessageSnippet("another writer").Len(); n != 0 {
		t.Errorf("a fight was reported where each rewrite was answered once: %v", r.logs.FilterMessageSnippet("another writer").All())
	}
}

// TestWatchFightIsRateLimited plays a writer that strips meshlane's entry
// every 20ms: the installer warns and slows down instead of matching it.
func TestWatchFightIsRateLimited(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	orig := primaryBytes(t, calicoFile)
	writeFile(t, path, orig)
	const limit = 3
	r := startWatch(t, dir, func(c *Config) { c.FightLimit = limit })
	if !waitFor(2*time.Second, func() bool { return isChained(path) }) {
		t.Fatal("not chained at start")
	}
	const fight = 3 * time.Second
	for end := time.Now().Add(fight); time.Now().Before(end); {
		writeFile(t, path, orig)
		time.Sleep(20 * time.Millisecond)
	}
	s := r.last()
	// Up to limit+1 rewrites at the normal pace, then one per fightInterval.
	if max := limit + 1 + int(fight/fightInterval) + 1; s.Writes > max {
		t.Errorf("%d installer writes in a %s fight, want at most %d", s.Writes, fight, max)
	}
	if s.Writes < limit+1 {
		t.Errorf("only %d installer writes: it stopped re-adding the entry", s.Writes)
	}
	warns := r.logs.FilterMessageSnippet("another writer keeps removing").All()
	if len(warns) != 1 {
		t.Fatalf("%d fight warnings, want 1", len(warns))
	}
	if f := warns[0].ContextMap()["file"]; f != path {
		t.Errorf("warning names %v, want %s", f, path)
	}
	// Once the other writer stops, the entry comes back.
	if !waitFor(fightInterval+comeBack, func() bool { return isChained(path) }) {
		t.Error("entry not back after the fight ended")
	}
}

func TestWatchCorruptThenFixed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	corrupt := []byte(`{"name": "k8s-pod-network", "plugins": [`)
	writeFile(t, path, corrupt)
	r := startWatch(t, dir, nil)
	if !waitFor(2*time.Second, func() bool {
		s := r.last()
		return s.Err != nil && strings.Contains(s.Err.Error(), path) && !IsWaiting(s.Err)
	}) {
		t.Fatalf("state = %+v, want an error naming %s", r.last(), path)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, corrupt) {
		t.Error("the corrupt file was modified")
	}
	if r.last().Ready() {
		t.Error("ready with a corrupt primary config")
	}
	if n := r.logs.FilterMessageSnippet("retrying").Len(); n != 1 {
		t.Errorf("the error was logged %d times, want once", n)
	}
	writeFile(t, path, primaryBytes(t, calicoFile))
	if !waitFor(comeBack, func() bool { return isChained(path) }) {
		t.Fatal("the fixed config was not chained")
	}
	if !waitFor(time.Second, func() bool { return r.last().Ready() }) {
		t.Errorf("state = %+v, want ready", r.last())
	}
}

// TestWatchConfigDirCreatedLater: while the config directory is missing
// inotify cannot watch it; the periodic look retries and, once the directory
// exists, installs the watch and chains.
func TestWatchConfigDirCreatedLater(t *testing.T) {
	dir := t.TempDir()
	confDir := filepath.Join(dir, "net.d")
	r := startWatch(t, confDir, func(c *Config) { c.RetryInterval = 200 * time.Millisecond })
	if !waitFor(2*time.Second, func() bool { s := r.last(); return s.Err != nil && strings.Contains(s.Err.Error(), confDir) }) {
		t.Fatalf("state = %+v, want an error about the missing directory", r.last())
	}
	if err := os.Mkdir(confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(confDir, calicoFile)
	writeFile(t, path, primaryBytes(t, calicoFile))
	if !waitFor(2*time.Second, func() bool { return isChained(path) }) {
		t.Fatal("config in a directory created after the start was not chained")
	}
	// The watch is now in place: a rewrite is seen quickly.
	writeFile(t, path, primaryBytes(t, calicoFile))
	if !waitFor(comeBack, func() bool { return isChained(path) }) {
		t.Fatal("rewrite not re-chained")
	}
}

func TestWatchFollowsNewPrimary(t *testing.T) {
	dir := t.TempDir()
	calico := filepath.Join(dir, calicoFile)
	writeFile(t, calico, primaryBytes(t, calicoFile))
	r := startWatch(t, dir, nil)
	if !waitFor(2*time.Second, func() bool { return isChained(calico) }) {
		t.Fatal("not chained at start")
	}
	// A CNI migration: a new config sorts first and becomes the primary.
	cilium := filepath.Join(dir, "05-cilium.conflist")
	writeFile(t, cilium, primaryBytes(t, "05-cilium.conflist"))
	if !waitFor(comeBack, func() bool { return isChained(cilium) }) {
		t.Fatal("the new primary was not chained")
	}
	if !waitFor(time.Second, func() bool { return r.last().ConfList == cilium }) {
		t.Errorf("state names %s, want %s", r.last().ConfList, cilium)
	}
	// A .conf primary is turned into a list once, with no loop from the
	// rename and removal that follow.
	bridge := filepath.Join(dir, "01-bridge.conf")
	writeFile(t, bridge, primaryBytes(t, "10-bridge.conf"))
	list := filepath.Join(dir, "01-bridge.conflist")
	if !waitFor(comeBack, func() bool { return isChained(list) }) {
		t.Fatal("the .conf primary was not turned into a chained list")
	}
	if !waitFor(time.Second, func() bool { return r.last().ConfList == list }) {
		t.Fatalf("state names %s, want %s", r.last().ConfList, list)
	}
	writes := r.last().Writes
	time.Sleep(time.Second)
	if s := r.last(); s.Writes != writes || s.ConfList != list {
		t.Errorf("state = %+v, want %d writes and ConfList %s", s, writes, list)
	}
}

func TestWatchReinstallsDeletedBinary(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	writeFile(t, path, primaryBytes(t, calicoFile))
	var binDir string
	r := startWatch(t, dir, func(c *Config) { c.RetryInterval = 200 * time.Millisecond; binDir = c.BinDir })
	bin := filepath.Join(binDir, PluginType)
	if !waitFor(2*time.Second, func() bool { return r.last().Ready() }) {
		t.Fatalf("state = %+v, want ready", r.last())
	}
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	if !waitFor(2*time.Second, func() bool { _, err := os.Stat(bin); return err == nil }) {
		t.Fatal("the deleted plugin binary was not copied again")
	}
	if !r.last().Ready() {
		t.Errorf("state = %+v, want ready", r.last())
	}
}

func TestWatchRejectsBadConfig(t *testing.T) {
	err := Watch(context.Background(), Config{BinDir: "/x", ConfDir: "/y", FailPolicy: "maybe"}, nil)
	if err == nil || !strings.Contains(err.Error(), "maybe") {
		t.Errorf("Watch with a bad fail policy = %v", err)
	}
	if err := Watch(context.Background(), Config{ConfDir: "/y", PluginSrc: "/p"}, nil); err == nil {
		t.Error("Watch without a bin directory started")
	}
	if err := Watch(context.Background(), Config{BinDir: "/x", ConfDir: "/y"}, nil); err == nil || !strings.Contains(err.Error(), "--plugin-src") {
		t.Errorf("Watch without a plugin source = %v", err)
	}
}
