package install

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const calicoFile = "10-calico.conflist"

func primaryBytes(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "primaries", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// isChained tells whether path ends with meshlane's entry.
func isChained(path string) bool {
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	l, err := parseConflist(data)
	return err == nil && isMeshlane(l.plugins[len(l.plugins)-1])
}

func TestChainCorruptLeftUntouched(t *testing.T) {
	cases := []struct {
		name, data, wantErr string
	}{
		{"truncated", `{"name": "k8s-pod-network", "cniVersion": "0.3.1", "plugins": [{"type": "calico"`, "ends before"},
		{"syntax", "{\n  \"name\": \"net\",\n  \"plugins\": [{\"type\": \"ptp\"},]\n}", "line 3, column"},
		{"empty", ``, "ends before"},
		{"array", `[{"type": "ptp"}]`, "is a JSON array, not an object"},
		{"null", `null`, "JSON null"},
		{"no plugins", `{"name": "net", "cniVersion": "1.0.0"}`, `no "plugins"`},
		{"plugins not a list", `{"name": "net", "plugins": {"type": "ptp"}}`, `"plugins" is not a list`},
		{"empty plugins", `{"name": "net", "plugins": []}`, `"plugins" is empty`},
		{"plugin not an object", `{"name": "net", "plugins": [{"type": "ptp"}, "portmap"]}`, "plugin 1 is not a JSON object"},
		{"no name", `{"cniVersion": "1.0.0", "plugins": [{"type": "ptp"}]}`, "no name"},
		{"plugin without type", `{"name": "net", "plugins": [{"ipam": {}}]}`, "missing 'type'"},
		{"trailing data", `{"name": "net", "plugins": [{"type": "ptp"}]} {}`, "invalid JSON"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, calicoFile)
			writeFile(t, path, []byte(tc.data))
			_, err := Chain(testConfig(dir))
			if err == nil {
				t.Fatal("Chain accepted a corrupt config")
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "left untouched") {
				t.Errorf("error %q should name %s, say %q and that the file is left untouched", err, path, tc.wantErr)
			}
			if got, _ := os.ReadFile(path); string(got) != tc.data {
				t.Errorf("corrupt file was modified: %q", got)
			}
			assertNoTemps(t, dir)
		})
	}
}

func TestChainCorruptConf(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-bridge.conf")
	data := `{"cniVersion": "0.3.1", "name": "bridge", "bridge": "cni0"}`
	writeFile(t, path, []byte(data))
	_, err := Chain(testConfig(dir))
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "missing 'type'") {
		t.Fatalf("Chain = %v, want an error naming %s and the missing type", err, path)
	}
	if _, err := os.Stat(filepath.Join(dir, "10-bridge.conflist")); !os.IsNotExist(err) {
		t.Errorf("a list was written for a broken .conf (stat err %v)", err)
	}
	writeFile(t, path, []byte(`{"name": "x", "plugins": [{"type": "ptp"}]}`))
	if _, err := Chain(testConfig(dir)); err == nil || !strings.Contains(err.Error(), `has a "plugins" list`) {
		t.Errorf("a list in a .conf: Chain = %v", err)
	}
}

func TestChainWaitsForConfig(t *testing.T) {
	dir := t.TempDir()
	// Files the runtimes do not load, and a directory with a config name.
	writeFile(t, filepath.Join(dir, "README"), []byte("not a config"))
	writeFile(t, filepath.Join(dir, "05-old.conflist.bak"), primaryBytes(t, calicoFile))
	writeFile(t, filepath.Join(dir, ".05-x.conflist.123"+tempSuffix), []byte("{"))
	if err := os.Mkdir(filepath.Join(dir, "01-dir.conflist"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := Chain(testConfig(dir))
	if !IsWaiting(err) {
		t.Fatalf("Chain on a directory without configs = %v, want the waiting error", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 4 {
		t.Errorf("Chain created files while waiting: %v", entries)
	}
	_, err = Chain(testConfig(filepath.Join(dir, "missing")))
	if err == nil || IsWaiting(err) || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing directory: %v", err)
	}
}

func TestChainPicksLexicallyFirst(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "99-loopback.conf"), []byte(`{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}`))
	writeFile(t, filepath.Join(dir, calicoFile), primaryBytes(t, calicoFile))
	writeFile(t, filepath.Join(dir, "00-notes.txt"), []byte("ignored"))
	if _, err := Chain(testConfig(dir)); err != nil {
		t.Fatal(err)
	}
	if !isChained(filepath.Join(dir, calicoFile)) {
		t.Error("the lexically first config was not chained")
	}
	if _, err := os.Stat(filepath.Join(dir, "99-loopback.conflist")); !os.IsNotExist(err) {
		t.Error("a config other than the primary was touched")
	}
}

func TestChainConversionTargets(t *testing.T) {
	bridge := primaryBytes(t, "10-bridge.conf")

	t.Run("someone else's list", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "10-bridge.conf"), bridge)
		foreign := []byte(`{"name": "other", "cniVersion": "1.0.0", "plugins": [{"type": "ptp"}]}`)
		writeFile(t, filepath.Join(dir, "10-bridge.conflist"), foreign)
		_, err := Chain(testConfig(dir))
		if err == nil || !strings.Contains(err.Error(), "already exists and is not meshlane's") {
			t.Fatalf("Chain = %v, want a refusal to overwrite", err)
		}
		if got, _ := os.ReadFile(filepath.Join(dir, "10-bridge.conflist")); !bytes.Equal(got, foreign) {
			t.Error("someone else's list was overwritten")
		}
	})
	t.Run("our stale list", func(t *testing.T) {
		// The primary CNI wrote its .conf again after meshlane had
		// turned it into a list: the list is replaced.
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "10-bridge.conf"), bridge)
		if _, err := Chain(testConfig(dir)); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, "10-bridge.conf"), bytes.Replace(bridge, []byte("cni0"), []byte("cni1"), 1))
		if _, err := Chain(testConfig(dir)); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(filepath.Join(dir, "10-bridge.conflist"))
		if !bytes.Contains(got, []byte("cni1")) || !isChained(filepath.Join(dir, "10-bridge.conflist")) {
			t.Errorf("the list does not hold the new .conf chained:\n%s", got)
		}
		if _, err := os.Stat(filepath.Join(dir, "10-bridge.conf")); !os.IsNotExist(err) {
			t.Error("the .conf is still there")
		}
	})
	t.Run("a file would sort in between", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "10-bridge.conf"), bridge)
		writeFile(t, filepath.Join(dir, "10-bridge.conf-b.json"), []byte(`{"name": "b", "type": "ptp"}`))
		_, err := Chain(testConfig(dir))
		if err == nil || !strings.Contains(err.Error(), "10-bridge.conf-b.json") {
			t.Fatalf("Chain = %v, want a refusal naming the file in between", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "10-bridge.conflist")); !os.IsNotExist(err) {
			t.Error("a list was written anyway")
		}
	})
	t.Run("json single plugin", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "10-bridge.json"), bridge)
		if _, err := Chain(testConfig(dir)); err != nil {
			t.Fatal(err)
		}
		if !isChained(filepath.Join(dir, "10-bridge.conflist")) {
			t.Error(".json was not turned into a chained list")
		}
	})
}

func TestChainRefusesPluginDirectory(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, calicoFile), primaryBytes(t, calicoFile))
	sub := filepath.Join(dir, "k8s-pod-network")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(sub, "90-extra.conf"), []byte(`{"type": "tuning"}`))
	_, err := Chain(testConfig(dir))
	if err == nil || !strings.Contains(err.Error(), sub) {
		t.Fatalf("Chain = %v, want a refusal naming %s", err, sub)
	}
	if isChained(filepath.Join(dir, calicoFile)) {
		t.Error("the list was chained although plugins would run after meshlane")
	}
}

func TestChainUnwritableDirectory(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	orig := primaryBytes(t, calicoFile)
	writeFile(t, path, orig)
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o755) })
	withoutDACOverride(t, func() {
		_, err := Chain(testConfig(dir))
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "write access") ||
			!errors.Is(err, os.ErrPermission) {
			t.Errorf("Chain in a read-only directory = %v, want a permission error naming %s", err, path)
		}
	})
	if got, _ := os.ReadFile(path); !bytes.Equal(got, orig) {
		t.Error("the config changed")
	}
}

func TestChainKeepsOwner(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	writeFile(t, path, primaryBytes(t, calicoFile))
	if err := os.Chown(path, 1234, 5678); err != nil {
		t.Fatal(err)
	}
	if _, err := Chain(testConfig(dir)); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := info.Sys().(*syscall.Stat_t)
	if st.Uid != 1234 || st.Gid != 5678 {
		t.Errorf("owner %d:%d, want 1234:5678", st.Uid, st.Gid)
	}
}

func TestReplaceFileDetectsConcurrentWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, calicoFile)
	writeFile(t, path, []byte("new content from the primary CNI"))
	err := replaceFile(path, path, []byte("what meshlane read"), []byte("chained"))
	if !errors.Is(err, errRaced) {
		t.Fatalf("replaceFile = %v, want errRaced", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "new content from the primary CNI" {
		t.Errorf("the newer content was overwritten: %q", got)
	}
	assertNoTemps(t, dir)
}

func TestUnchainEveryList(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir)
	writeFile(t, filepath.Join(dir, calicoFile), primaryBytes(t, calicoFile))
	if _, err := Chain(cfg); err != nil {
		t.Fatal(err)
	}
	// The primary moved to another file since: the old one still holds
	// meshlane's entry and is cleaned too.
	writeFile(t, filepath.Join(dir, "05-cilium.conflist"), primaryBytes(t, "05-cilium.conflist"))
	if _, err := Chain(cfg); err != nil {
		t.Fatal(err)
	}
	if err := Unchain(cfg); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{calicoFile, "05-cilium.conflist"} {
		if data, _ := os.ReadFile(filepath.Join(dir, f)); bytes.Contains(data, []byte(PluginType)) {
			t.Errorf("%s still names meshlane-cni:\n%s", f, data)
		}
	}
}

func TestUnchainProblems(t *testing.T) {
	dir := t.TempDir()
	only := filepath.Join(dir, "10-only.conflist")
	onlyData := []byte(`{"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": "meshlane-cni"}]}`)
	writeFile(t, only, onlyData)
	broken := filepath.Join(dir, "20-broken.conflist")
	brokenData := []byte(`{"name": "x", "plugins": [{"type": "ptp"}, {"type": "meshlane-cni"}`)
	writeFile(t, broken, brokenData)
	unrelated := filepath.Join(dir, "30-unrelated.conflist")
	writeFile(t, unrelated, []byte(`not json at all`))

	err := Unchain(testConfig(dir))
	if err == nil || !strings.Contains(err.Error(), only) || !strings.Contains(err.Error(), broken) || strings.Contains(err.Error(), unrelated) {
		t.Fatalf("Unchain = %v, want errors naming %s and %s only", err, only, broken)
	}
	for path, want := range map[string][]byte{only: onlyData, broken: brokenData} {
		if got, _ := os.ReadFile(path); !bytes.Equal(got, want) {
			t.Errorf("%s was modified", path)
		}
	}
}
