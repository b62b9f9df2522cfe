package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// A full hash map answers E2BIG to an insert.
var errE2BIG = unix.E2BIG

// MapFill is one map's entry count against its capacity.
type MapFill struct {
	Entries  int `json:"entries"`
	Capacity int `json:"capacity"`
}

// MapFill counts the entries of every map whose keys can be listed (socket
// storage cannot; it lives and dies with each socket).
func (d *Datapath) MapFill() (map[string]MapFill, error) {
	maps := map[string]*ebpf.Map{
		"meshlane_pods":    d.objs.MeshlanePods,
		"meshlane_podips":  d.objs.MeshlanePodips,
		"meshlane_ports":   d.objs.MeshlanePorts,
		"meshlane_cidrs":   d.objs.MeshlaneCidrs,
		"meshlane_origdst": d.objs.MeshlaneOrigdst,
		"meshlane_sockh":   d.objs.MeshlaneSockh,
	}
	out := make(map[string]MapFill, len(maps))
	for name, m := range maps {
		n, err := countKeys(m)
		if err != nil {
			return nil, fmt.Errorf("datapath: count entries of %s: %w", name, err)
		}
		out[name] = MapFill{Entries: n, Capacity: int(m.MaxEntries())}
	}
	return out, nil
}

func countKeys(m *ebpf.Map) (int, error) {
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	n := 0
	var cur any // nil: start from the first key
	for {
		if err := m.NextKey(cur, next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		copy(key, next)
		cur = key
		if n > int(m.MaxEntries())+1 {
			// Keys removed while iterating can restart a hash walk.
			return n, nil
		}
	}
}
