package datapath_test

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/meshlane/meshlane/bpf"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/test/testenv"
)

// TestConnsSharesSocketStorage: the iterator object declares meshlane_sks
// itself and gets the datapath's map at load, so both declarations must
// agree byte for byte, or the iterator would misread every record.
func TestConnsSharesSocketStorage(t *testing.T) {
	cs, err := bpf.LoadConns()
	if err != nil {
		t.Fatal(err)
	}
	sameMap(t, cs, bpf.ConnsMapMeshlaneSks, func(m *ebpf.MapSpec) btf.Type { return m.Value })
	// The Go record type must be what the C record is.
	var rec bpf.ConnsMlConn
	if got, want := reflect.TypeOf(rec).Size(), uintptr(72); got != want {
		t.Fatalf("ConnsMlConn is %d bytes, the C struct ml_conn %d", got, want)
	}
}

// sameMap fails t unless the map name of an iterator's spec is declared
// as meshlane.c declares it, down to the layout of the type shared (its
// key or its value).
func sameMap(t *testing.T, iter *ebpf.CollectionSpec, name string, shared func(*ebpf.MapSpec) btf.Type) {
	t.Helper()
	ml, err := bpf.LoadMeshlane()
	if err != nil {
		t.Fatal(err)
	}
	a, b := ml.Maps[name], iter.Maps[name]
	if a == nil || b == nil {
		t.Fatalf("%s missing: datapath %v, iterator %v", name, a, b)
	}
	if a.Type != b.Type || a.KeySize != b.KeySize || a.ValueSize != b.ValueSize || a.Flags != b.Flags || a.MaxEntries != b.MaxEntries {
		t.Fatalf("%s differs: datapath %+v, iterator %+v", name, a, b)
	}
	if la, lb := btfLayout(shared(a)), btfLayout(shared(b)); la != lb {
		t.Fatalf("the type %s shares differs between meshlane.c and the iterator:\n%s\n%s", name, la, lb)
	}
}

// TestReadPod: what UpsertPod writes, ReadPod reads back, with the lists
// sorted; PodIPOwner finds each IP; after DeletePod nothing is left.
func TestReadPod(t *testing.T) {
	testenv.RequireRoot(t)
	d := load(t, filepath.Join(testenv.BPFFS(t), "meshlane"), testenv.TempCgroup(t).Path, false)
	t.Cleanup(func() { d.Uninstall() })
	want := datapath.Pod{
		NetnsCookie: 4242,
		IPs:         []netip.Addr{netip.MustParseAddr("fd00::7"), netip.MustParseAddr("10.1.0.7")},
		ProxyUID:    1337, ProxyGID: 1338, OutboundPort: 15001, InboundPort: 15006,
		InboundInclude:       []uint16{9000, 8080},
		InboundExclude:       []uint16{15090, 15021, 8080},
		OutboundExcludePorts: []uint16{53},
		OutboundIncludePorts: []uint16{3306},
		OutboundIncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("fd00::/8"), netip.MustParsePrefix("10.0.0.0/8")},
		OutboundExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.1/32"), netip.MustParsePrefix("0.0.0.0/0")},
	}
	other := pod(99, "10.1.0.8", 7000)
	for _, p := range []datapath.Pod{want, other} {
		if err := d.UpsertPod(p); err != nil {
			t.Fatal(err)
		}
	}
	got, found, err := d.ReadPod(want.NetnsCookie)
	if err != nil || !found {
		t.Fatalf("ReadPod: found %v, %v", found, err)
	}
	norm := want
	norm.IPs = sorted(want.IPs, netip.Addr.Compare)
	norm.InboundInclude = sorted(want.InboundInclude, cmpU16)
	norm.InboundExclude = sorted(want.InboundExclude, cmpU16)
	norm.OutboundIncludeCIDRs = sorted(want.OutboundIncludeCIDRs, netip.Prefix.Compare)
	norm.OutboundExcludeCIDRs = sorted(want.OutboundExcludeCIDRs, netip.Prefix.Compare)
	if !reflect.DeepEqual(got, norm) {
		t.Fatalf("ReadPod:\n got %+v\nwant %+v", got, norm)
	}
	for _, ip := range want.IPs {
		if owner, ok, err := d.PodIPOwner(ip); err != nil || !ok || owner != want.NetnsCookie {
			t.Fatalf("PodIPOwner(%s) = %d, %v, %v", ip, owner, ok, err)
		}
	}
	if _, ok, err := d.PodIPOwner(netip.MustParseAddr("10.1.0.99")); ok || err != nil {
		t.Fatalf("PodIPOwner of an unknown IP: %v, %v", ok, err)
	}

	if err := d.DeletePod(want); err != nil {
		t.Fatal(err)
	}
	got, found, err = d.ReadPod(want.NetnsCookie)
	if err != nil || found || len(got.IPs)+len(got.InboundInclude)+len(got.InboundExclude)+len(got.OutboundIncludeCIDRs)+len(got.OutboundExcludeCIDRs) != 0 {
		t.Fatalf("after DeletePod: %+v found %v, %v", got, found, err)
	}
	if got, found, _ := d.ReadPod(other.NetnsCookie); !found || len(got.IPs) != 1 {
		t.Fatalf("the other pod was touched: %+v %v", got, found)
	}
}

func cmpU16(a, b uint16) int { return int(a) - int(b) }

func sorted[T any](l []T, cmp func(T, T) int) []T {
	out := slices.Clone(l)
	slices.SortFunc(out, cmp)
	return out
}

// TestInfo: every attached hook is listed with its link and program ids,
// and this kernel supports the connections view, which on a fresh
// datapath lists nothing.
func TestInfo(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	d := load(t, filepath.Join(testenv.BPFFS(t), "meshlane"), cg.Path, true)
	t.Cleanup(func() { d.Uninstall() })
	info := d.Info()
	if info.CgroupPath != cg.Path || !info.Sockmap || !strings.HasSuffix(info.MapsDir, fmt.Sprintf("maps-v%d", datapath.LayoutVersion)) {
		t.Fatalf("Info: %+v", info)
	}
	var names []string
	for _, l := range info.Links {
		if l.LinkID == 0 || l.ProgramID == 0 || l.Error != "" {
			t.Errorf("link %+v lacks ids", l)
		}
		names = append(names, l.Name)
	}
	if want := []string{"connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6", "sockops", "getsockopt", "sk_msg"}; !slices.Equal(names, want) {
		t.Fatalf("links %v, want %v", names, want)
	}
	conns := false
	for _, f := range info.Features {
		if strings.HasPrefix(f.Name, "connections view") {
			conns = f.Available
		}
	}
	if !conns {
		t.Fatalf("this kernel (6.x) supports socket storage iterators, Info says %+v", info.Features)
	}
	got, err := d.Conns()
	if err != nil || len(got) != 0 {
		t.Fatalf("Conns on a fresh datapath: %v, %v", got, err)
	}
}
