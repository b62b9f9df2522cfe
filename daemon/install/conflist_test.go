package install

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

var update = flag.Bool("update", false, "rewrite testdata/golden from the current output")

// testConfig is the installer config the golden files were made with.
func testConfig(confDir string) Config {
	return Config{
		ConfDir:           confDir,
		ExcludeNamespaces: []string{"meshlane-system"},
	}
}

// TestChainGolden chains real-world primary configs (testdata/primaries)
// and compares the results with testdata/golden; -update rewrites them.
func TestChainGolden(t *testing.T) {
	cases := []struct {
		file    string
		out     string // the file holding the chained list
		changed bool
	}{
		{"10-calico.conflist", "10-calico.conflist", true},
		{"10-flannel.conflist", "10-flannel.conflist", true},
		{"05-cilium.conflist", "05-cilium.conflist", true},
		{"10-kindnet.conflist", "10-kindnet.conflist", true},
		{"10-flannel-k3s.conflist", "10-flannel-k3s.conflist", true},
		{"10-bridge.conf", "10-bridge.conflist", true},
		{"20-list-031.conflist", "20-list-031.conflist", true},
		{"20-list-110.conflist", "20-list-110.conflist", true},
		{"30-chained-old.conflist", "30-chained-old.conflist", true},
		{"30-duplicate.conflist", "30-duplicate.conflist", true},
		{"40-unknown-keys.conflist", "40-unknown-keys.conflist", true},
		{"50-chained-current.conflist", "50-chained-current.conflist", false},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			orig, err := os.ReadFile(filepath.Join("testdata", "primaries", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			in := filepath.Join(dir, tc.file)
			if err := os.WriteFile(in, orig, 0o640); err != nil {
				t.Fatal(err)
			}
			cfg := testConfig(dir)

			changed, err := Chain(cfg)
			if err != nil {
				t.Fatalf("Chain: %v", err)
			}
			if changed != tc.changed {
				t.Errorf("Chain changed = %v, want %v", changed, tc.changed)
			}
			outPath := filepath.Join(dir, tc.out)
			got, err := os.ReadFile(outPath)
			if err != nil {
				t.Fatalf("the chained list is not at %s: %v", outPath, err)
			}
			if tc.out != tc.file {
				if _, err := os.Stat(in); !os.IsNotExist(err) {
					t.Errorf("%s still exists after its list was written (err %v): the runtime would keep loading it", tc.file, err)
				}
			}
			if !tc.changed && !bytes.Equal(got, orig) {
				t.Errorf("an already chained file was rewritten")
			}
			checkFileMode(t, outPath, 0o640)
			checkChained(t, got, others(t, orig, tc.file != tc.out))
			compareGolden(t, tc.out, got)
			assertNoTemps(t, dir)

			// Idempotent: a second pass writes nothing.
			if changed, err := Chain(cfg); err != nil || changed {
				t.Errorf("second Chain = %v, %v; want no change", changed, err)
			}
			if again, _ := os.ReadFile(outPath); !bytes.Equal(again, got) {
				t.Errorf("second Chain altered the file")
			}

			// Uninstall gives back the original meaning (a .conf stays
			// the equivalent one-plugin list).
			if err := Unchain(cfg); err != nil {
				t.Fatalf("Unchain: %v", err)
			}
			back, err := os.ReadFile(outPath)
			if err != nil {
				t.Fatal(err)
			}
			want := unchainedMeaning(t, orig, tc.file != tc.out)
			if gotM := meaning(t, back); !reflect.DeepEqual(gotM, want) {
				t.Errorf("after Unchain:\n%s\nwant the meaning of:\n%s", back, mustJSON(t, want))
			}
			checkFileMode(t, outPath, 0o640)
			if _, err := libcni.ConfListFromBytes(back); err != nil {
				t.Errorf("the unchained list does not load: %v", err)
			}
			// Unchaining an unchained directory writes nothing.
			before, _ := os.ReadFile(outPath)
			if err := Unchain(cfg); err != nil {
				t.Fatal(err)
			}
			if after, _ := os.ReadFile(outPath); !bytes.Equal(before, after) {
				t.Errorf("a second Unchain rewrote the file")
			}
		})
	}
}

// checkChained asserts that out loads with libcni, ends with exactly one
// meshlane entry that asks for the pod annotations, and keeps the other
// plugins, in order, with every key.
func checkChained(t *testing.T, out []byte, wantOthers []json.RawMessage) {
	t.Helper()
	list, err := libcni.ConfListFromBytes(out)
	if err != nil {
		t.Fatalf("libcni cannot load the result: %v\n%s", err, out)
	}
	last := list.Plugins[len(list.Plugins)-1]
	if last.Network.Type != PluginType {
		t.Fatalf("last plugin is %q, want %s", last.Network.Type, PluginType)
	}
	for _, c := range []string{annotationsCapability, cgroupPathCapability} {
		if !last.Network.Capabilities[c] {
			t.Errorf("meshlane entry does not ask for %s: %s", c, last.Bytes)
		}
	}
	var n int
	for _, p := range list.Plugins {
		if p.Network.Type == PluginType {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d meshlane entries, want 1", n)
	}
	l, err := parseConflist(out)
	if err != nil {
		t.Fatal(err)
	}
	gotOthers := l.others()
	if len(gotOthers) != len(wantOthers) {
		t.Fatalf("%d other plugins, want %d", len(gotOthers), len(wantOthers))
	}
	for i := range wantOthers {
		if !sameMeaning(t, gotOthers[i], wantOthers[i]) {
			t.Errorf("plugin %d changed:\n%s\nwant\n%s", i, gotOthers[i], wantOthers[i])
		}
	}
}

// others returns the non-meshlane plugins of an input config.
func others(t *testing.T, orig []byte, single bool) []json.RawMessage {
	t.Helper()
	if single {
		return []json.RawMessage{orig}
	}
	l, err := parseConflist(orig)
	if err != nil {
		t.Fatal(err)
	}
	return l.others()
}

// unchainedMeaning is what a config should mean after install and
// uninstall: the original without meshlane entries; a .conf as the list
// libcni makes of it.
func unchainedMeaning(t *testing.T, orig []byte, single bool) any {
	t.Helper()
	if single {
		conf, err := libcni.NetworkPluginConfFromBytes(orig)
		if err != nil {
			t.Fatal(err)
		}
		list, err := libcni.ConfListFromConf(conf)
		if err != nil {
			t.Fatal(err)
		}
		return meaning(t, list.Bytes)
	}
	m := meaning(t, orig).(map[string]any)
	var kept []any
	for _, p := range m["plugins"].([]any) {
		if p.(map[string]any)["type"] != PluginType {
			kept = append(kept, p)
		}
	}
	m["plugins"] = kept
	return m
}

// meaning decodes JSON keeping numbers exact, so two files compare by what
// they say and not how.
func meaning(t *testing.T, b []byte) any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

func sameMeaning(t *testing.T, a, b []byte) bool {
	t.Helper()
	return reflect.DeepEqual(meaning(t, a), meaning(t, b))
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func compareGolden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run TestChainGolden -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("output differs from %s (go test -update rewrites it after review):\n%s", path, got)
	}
}

func checkFileMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode().Perm() != want {
		t.Errorf("%s has mode %v, want %v", path, info.Mode().Perm(), want)
	}
}

func assertNoTemps(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), tempSuffix) {
			t.Errorf("temp file %s left behind", e.Name())
		}
	}
}

func TestPluginEntryOptions(t *testing.T) {
	cfg := Config{
		Socket:            "/run/meshlane/a.sock",
		Timeout:           1500 * time.Millisecond,
		FailPolicy:        "open",
		LogLevel:          "debug",
		ExcludeNamespaces: []string{"meshlane-system", "kube-system"},
	}.withDefaults()
	raw, err := cfg.pluginEntry()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"type":"meshlane-cni","capabilities":{"cgroupPath":true,"io.kubernetes.cri.pod-annotations":true},"socket":"/run/meshlane/a.sock","timeout":"1.5s","failPolicy":"open","logLevel":"debug","excludeNamespaces":["meshlane-system","kube-system"]}`
	if string(raw) != want {
		t.Errorf("entry = %s\nwant    %s", raw, want)
	}
}

func TestConfigValidation(t *testing.T) {
	bad := []Config{
		{ConfDir: "relative/dir"},
		{ConfDir: "/x", Socket: "relative.sock"},
		{ConfDir: "/x", Socket: "/" + strings.Repeat("s", maxSocketPath)},
		{ConfDir: "/x", FailPolicy: "sometimes"},
		{ConfDir: "/x", LogLevel: "trace"},
		{ConfDir: "/x", ExcludeNamespaces: []string{"a", " "}},
		{ConfDir: "/x", Timeout: -1},
		{},
	}
	for i, c := range bad {
		if _, err := Chain(c); err == nil {
			t.Errorf("case %d: Chain accepted %+v", i, c)
		}
	}
}
