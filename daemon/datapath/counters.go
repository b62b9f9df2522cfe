package datapath

import (
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// counterNames reads the counter names from the program's own BTF (enum
// ml_counter), so the C enum is the only list: ML_CNT_REDIRECT_OUTBOUND
// becomes "redirect_outbound".
func counterNames(spec *ebpf.CollectionSpec) ([]string, error) {
	var e *btf.Enum
	if err := spec.Types.TypeByName("ml_counter", &e); err != nil {
		return nil, fmt.Errorf("datapath: counter names missing from the program's BTF: %w", err)
	}
	var names []string
	for _, v := range e.Values {
		if v.Name == "ML_CNT_MAX" {
			continue
		}
		if int(v.Value) != len(names) {
			return nil, fmt.Errorf("datapath: enum ml_counter is not dense at %s", v.Name)
		}
		names = append(names, strings.ToLower(strings.TrimPrefix(v.Name, "ML_CNT_")))
	}
	return names, nil
}

// Counters returns every datapath decision counter, summed over CPUs.
func (d *Datapath) Counters() (map[string]uint64, error) {
	out := make(map[string]uint64, len(d.counterNames))
	for i, name := range d.counterNames {
		var per []uint64
		if err := d.objs.MeshlaneCnt.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("datapath: read counter %s: %w", name, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[name] = sum
	}
	return out, nil
}
