package datapath_test

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/podbin/wire"
)

// countingConnect4 is another tool's connect4 program, as Cilium's socket
// load balancer would be: it counts every IPv4 connect() and allows it.
func countingConnect4(t *testing.T) (*ebpf.Program, *ebpf.Map) {
	t.Helper()
	counter, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { counter.Close() })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupInet4Connect,
		License:    "GPL",
		Instructions: asm.Instructions{
			// *(u64 *)lookup(&counter, &0) += 1; return 1
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, counter.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog, counter
}

// TestCoexistsWithOtherCgroupPrograms: another connect4 program attached
// to the same cgroup with its own bpf link keeps seeing every connect(),
// and meshlane keeps redirecting, whichever was attached first.
func TestCoexistsWithOtherCgroupPrograms(t *testing.T) {
	tp := newTopology(t, mesh.Istio, false)
	n := tp.n
	prog, counter := countingConnect4(t)
	other, err := link.AttachCgroup(link.CgroupOptions{Path: n.cg.Path, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	check := func(label string) {
		t.Helper()
		var before, after uint64
		counter.Lookup(uint32(0), &before)
		seen := len(sidecarEvents(t, tp.sidecarA))
		n.client(app(tp.a), hostPort(tp.c.IPv4, appPort))
		counter.Lookup(uint32(0), &after)
		ev := newEvents(t, tp.sidecarA, seen)
		if len(ev) != 1 || ev[0].Listener != wire.ListenerOutbound || ev[0].OrigDst != hostPort(tp.c.IPv4, appPort) {
			t.Fatalf("%s: meshlane did not redirect: sidecar events %+v", label, ev)
		}
		// The app's connect and the sidecar's upstream connect.
		if after-before != 2 {
			t.Fatalf("%s: the other program counted %d connects, want 2", label, after-before)
		}
	}
	check("other program attached after meshlane")

	// Reload meshlane (an agent restart swaps its programs in its pinned
	// links): the other program is still there and both still work.
	if err := n.dp.Close(); err != nil {
		t.Fatal(err)
	}
	reloadNode(t, n, false)
	check("after meshlane reloaded")
}
