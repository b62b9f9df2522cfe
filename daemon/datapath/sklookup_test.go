package datapath_test

import (
	"testing"

	"github.com/meshlane/meshlane/bpf"
)

// TestListenersSharesRegistry: the listener iterator declares
// meshlane_listeners itself and gets the datapath's map at load, so both
// declarations must agree, key layout included, or the iterator would
// register listeners under keys sk_lookup never looks up.
func TestListenersSharesRegistry(t *testing.T) {
	ml, err := bpf.LoadMeshlane()
	if err != nil {
		t.Fatal(err)
	}
	ls, err := bpf.LoadListeners()
	if err != nil {
		t.Fatal(err)
	}
	a, b := ml.Maps["meshlane_listeners"], ls.Maps[bpf.ListenersMapMeshlaneListeners]
	if a == nil || b == nil {
		t.Fatalf("meshlane_listeners missing: datapath %v, iterator %v", a, b)
	}
	if a.Type != b.Type || a.KeySize != b.KeySize || a.ValueSize != b.ValueSize || a.Flags != b.Flags || a.MaxEntries != b.MaxEntries {
		t.Fatalf("meshlane_listeners differs: datapath %+v, iterator %+v", a, b)
	}
	if la, lb := btfLayout(a.Key), btfLayout(b.Key); la != lb {
		t.Fatalf("struct ml_listener_key differs between meshlane.c and listeners.c:\n%s\n%s", la, lb)
	}
}
