package install

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// FuzzChain feeds arbitrary bytes to the chaining of a .conflist (and, when
// they are no list, of a .conf). Whatever the input: no panic; an accepted
// input gives a list that libcni loads, that ends with the one meshlane
// entry, that keeps every other plugin byte for byte (whitespace aside) and
// in order, that chains to itself, and that unchains back to those plugins.
func FuzzChain(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join("testdata", "primaries", "*"))
	for _, s := range seeds {
		b, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	want, err := testConfig("/unused").withDefaults().pluginEntry()
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := parseConflist(data)
		var wantOthers []json.RawMessage
		if err == nil {
			wantOthers = l.others()
		} else {
			if l, err = listFromConf(data); err != nil {
				return
			}
			wantOthers = []json.RawMessage{data}
		}
		l.chain(want)
		out, err := l.encode()
		if err != nil {
			t.Fatalf("accepted input gives an unloadable list: %v\ninput: %q", err, data)
		}
		if _, err := libcni.ConfListFromBytes(out); err != nil {
			t.Fatalf("libcni refuses the output: %v\n%s", err, out)
		}
		again, err := parseConflist(out)
		if err != nil {
			t.Fatalf("the output does not parse again: %v\n%s", err, out)
		}
		if again.chain(want) {
			t.Fatalf("chaining the output changes it:\n%s", out)
		}
		if n := len(again.plugins); !isMeshlane(again.plugins[n-1]) || len(again.others()) != n-1 {
			t.Fatalf("want exactly one meshlane entry, last:\n%s", out)
		}
		samePlugins(t, again.others(), wantOthers)

		removed, err := again.unchain()
		if len(wantOthers) == 0 {
			if err == nil {
				t.Fatal("unchaining a list of only meshlane entries succeeded")
			}
			return
		}
		if err != nil || !removed {
			t.Fatalf("unchain = %v, %v", removed, err)
		}
		back, err := again.encode()
		if err != nil {
			t.Fatal(err)
		}
		final, err := parseConflist(back)
		if err != nil {
			t.Fatalf("the unchained list does not parse: %v\n%s", err, back)
		}
		samePlugins(t, final.plugins, wantOthers)
	})
}

// samePlugins compares plugin lists byte for byte after removing
// insignificant whitespace.
func samePlugins(t *testing.T, got, want []json.RawMessage) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d plugins, want %d", len(got), len(want))
	}
	for i := range want {
		var g, w bytes.Buffer
		if err := json.Compact(&g, got[i]); err != nil {
			t.Fatal(err)
		}
		if err := json.Compact(&w, want[i]); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(g.Bytes(), w.Bytes()) {
			t.Fatalf("plugin %d changed:\n%s\nwant\n%s", i, g.Bytes(), w.Bytes())
		}
	}
}
