package datapath_test

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/meshlane/meshlane/bpf"
)

// TestListenersSharesRegistry: the listener iterator declares
// meshlane_listeners itself and gets the datapath's map at load, so both
// declarations must agree, key layout included, or the iterator would
// register listeners under keys sk_lookup never looks up.
func TestListenersSharesRegistry(t *testing.T) {
	ls, err := bpf.LoadListeners()
	if err != nil {
		t.Fatal(err)
	}
	sameMap(t, ls, bpf.ListenersMapMeshlaneListeners, func(m *ebpf.MapSpec) btf.Type { return m.Key })
}
