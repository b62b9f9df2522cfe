package datapath_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/meshlane/meshlane/bpf"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/test/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func load(t *testing.T, bpffs, cgroup string, sockmap bool) *datapath.Datapath {
	t.Helper()
	d, err := datapath.Load(datapath.Options{BPFFS: bpffs, CgroupPath: cgroup, Sockmap: sockmap})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func pod(cookie uint64, ip string, inExcl ...uint16) datapath.Pod {
	return datapath.Pod{
		NetnsCookie: cookie, IPs: []netip.Addr{netip.MustParseAddr(ip)},
		ProxyUID: 1337, ProxyGID: 1337, OutboundPort: 15001, InboundPort: 15006,
		InboundAll: true, InboundExclude: inExcl, OutboundAllCIDRs: true,
		OutboundExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")},
	}
}

func entries(t *testing.T, d *datapath.Datapath) map[string]int {
	t.Helper()
	fill, err := d.MapFill()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for k, v := range fill {
		out[k] = v.Entries
	}
	return out
}

// pinnedLinks returns, per pinned link, its link id and program id.
func pinnedLinks(t *testing.T, bpffs string) (map[string]link.ID, map[string]ebpf.ProgramID) {
	t.Helper()
	links, progs := map[string]link.ID{}, map[string]ebpf.ProgramID{}
	files, _ := filepath.Glob(filepath.Join(bpffs, "links", "*"))
	for _, f := range files {
		l, err := link.LoadPinnedLink(f, nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		links[filepath.Base(f)], progs[filepath.Base(f)] = info.ID, info.Program
		l.Close()
	}
	return links, progs
}

func linkIDs(t *testing.T, bpffs string) map[string]link.ID {
	t.Helper()
	links, _ := pinnedLinks(t, bpffs)
	return links
}

func progIDs(t *testing.T, bpffs string) map[string]ebpf.ProgramID {
	t.Helper()
	_, progs := pinnedLinks(t, bpffs)
	return progs
}

// TestReloadKeepsState: a second agent (restart or upgrade) reopens the
// pinned maps with every pod in them and swaps its programs into the same
// pinned links, so attachment never lapses; switching the fast path off
// removes only the sk_msg link.
func TestReloadKeepsState(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	bpffs := filepath.Join(testenv.BPFFS(t), "meshlane")

	d := load(t, bpffs, cg.Path, true)
	for i, ip := range []string{"198.18.0.1", "fd00::1"} {
		if err := d.UpsertPod(pod(uint64(100+i), ip, 15000, 15020)); err != nil {
			t.Fatal(err)
		}
	}
	want := entries(t, d)
	ids := linkIDs(t, bpffs)
	if len(ids) != 9 {
		t.Fatalf("pinned links %v, want 9 (connect4/6, sendmsg4/6, recvmsg4/6, sockops, getsockopt, sk_msg)", ids)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	d = load(t, bpffs, cg.Path, true)
	if got := entries(t, d); !equalMaps(got, want) {
		t.Fatalf("after reload %v, before %v", got, want)
	}
	if got := linkIDs(t, bpffs); !equalMaps(got, ids) {
		t.Fatalf("links were replaced instead of updated: %v, before %v", got, ids)
	}
	// The reloaded agent knows the pods it did not write: a delete
	// removes every entry.
	if err := d.DeletePod(datapath.Pod{NetnsCookie: 100}); err != nil {
		t.Fatal(err)
	}
	if got := entries(t, d); got["meshlane_pods"] != 1 || got["meshlane_ports"] != 2 || got["meshlane_cidrs"] != 2 || got["meshlane_podips"] != 1 {
		t.Fatalf("after deleting one of two pods: %v", got)
	}
	d.Close()

	d = load(t, bpffs, cg.Path, false)
	got := linkIDs(t, bpffs)
	if _, ok := got["sk_msg"]; ok || len(got) != 8 {
		t.Fatalf("fast path off: links %v, want the eight cgroup links only", got)
	}
	if err := d.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bpffs); !os.IsNotExist(err) {
		t.Fatalf("uninstall left %s: %v", bpffs, err)
	}
}

func equalMaps[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestUpsertReplacesStaleKeys: updating a pod removes exactly the rules it
// no longer has, and an IP handed to a new pod survives the old pod's
// delete.
func TestUpsertReplacesStaleKeys(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	d := load(t, filepath.Join(testenv.BPFFS(t), "meshlane"), cg.Path, false)
	t.Cleanup(func() { d.Uninstall() })

	p := pod(1, "198.18.0.1", 1, 2, 3)
	if err := d.UpsertPod(p); err != nil {
		t.Fatal(err)
	}
	p.InboundExclude = []uint16{3}
	p.OutboundExcludeCIDRs = p.OutboundExcludeCIDRs[:1]
	p.IPs = append(p.IPs, netip.MustParseAddr("fd00::1"))
	if err := d.UpsertPod(p); err != nil {
		t.Fatal(err)
	}
	if got := entries(t, d); got["meshlane_ports"] != 1 || got["meshlane_cidrs"] != 1 || got["meshlane_podips"] != 2 {
		t.Fatalf("after update: %v", got)
	}
	// The pod's IPv4 address goes to a new pod (new netns) before the old
	// pod's DEL arrives.
	if err := d.UpsertPod(pod(2, "198.18.0.1")); err != nil {
		t.Fatal(err)
	}
	if err := d.DeletePod(p); err != nil {
		t.Fatal(err)
	}
	if got := entries(t, d); got["meshlane_pods"] != 1 || got["meshlane_podips"] != 1 || got["meshlane_ports"] != 0 {
		t.Fatalf("after deleting the old pod: %v", got)
	}
	if err := d.DeletePod(p); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if err := d.UpsertPod(datapath.Pod{NetnsCookie: 3}); err == nil {
		t.Fatal("pod without IPs or ports accepted")
	}
}

// TestLoadErrors: a pin directory off bpffs and a cgroup that is not
// cgroup v2 are refused with a message that says what to do.
func TestLoadErrors(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	_, err := datapath.Load(datapath.Options{BPFFS: filepath.Join(t.TempDir(), "meshlane"), CgroupPath: cg.Path})
	if err == nil || !strings.Contains(err.Error(), "not on a bpf filesystem") {
		t.Fatalf("pins on tmpfs: %v", err)
	}
	_, err = datapath.Load(datapath.Options{BPFFS: filepath.Join(testenv.BPFFS(t), "meshlane"), CgroupPath: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "not a cgroup v2 directory") {
		t.Fatalf("cgroup on tmpfs: %v", err)
	}
	_, err = datapath.Load(datapath.Options{BPFFS: filepath.Join(testenv.BPFFS(t), "meshlane"), CgroupPath: cg.Path, Inbound: "xdp"})
	if err == nil || !strings.Contains(err.Error(), `unknown inbound hook mode "xdp"`) {
		t.Fatalf("unknown inbound mode: %v", err)
	}
}

// layoutGolden is the digest of every map's key and value types in
// bpf/meshlane.c at datapath.LayoutVersion, and of the counter array's
// size, which the counter enum sets. When this test fails, a map
// layout changed: bump LayoutVersion (so pins of the old layout are never
// reused) and update both.
const layoutGolden = "bf69a252094f0ffd"

func TestLayoutVersion(t *testing.T) {
	spec, err := bpf.LoadMeshlane()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	var names []string
	for name := range spec.Maps {
		if strings.HasPrefix(name, "meshlane_") {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		m := spec.Maps[name]
		h.Write([]byte(name + m.Type.String()))
		if name == "meshlane_cnt" {
			fmt.Fprint(h, m.MaxEntries)
		}
		for _, typ := range []btf.Type{m.Key, m.Value} {
			if typ == nil {
				continue
			}
			h.Write([]byte(btfLayout(typ)))
		}
	}
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	if sum != layoutGolden || datapath.LayoutVersion != 7 {
		t.Fatalf("map layout digest %s at LayoutVersion %d; golden %s at 7: a layout changed, bump LayoutVersion and update layoutGolden", sum, datapath.LayoutVersion, layoutGolden)
	}
}

// btfLayout renders a type's fields with their offsets and sizes.
func btfLayout(typ btf.Type) string {
	var b strings.Builder
	var walk func(name string, typ btf.Type, off uint32)
	walk = func(name string, typ btf.Type, off uint32) {
		typ = btf.UnderlyingType(typ)
		size, _ := btf.Sizeof(typ)
		fmt.Fprintf(&b, "%s %s @%d /%d;", name, typ.TypeName(), off, size)
		switch t := typ.(type) {
		case *btf.Struct:
			for _, m := range t.Members {
				walk(m.Name, m.Type, off+m.Offset.Bytes())
			}
		case *btf.Array:
			fmt.Fprintf(&b, "[%d]", t.Nelems)
			walk("elem", t.Type, off)
		}
	}
	walk("", typ, 0)
	return b.String()
}

// TestFullMapIsAClearError: rules beyond a map's capacity are refused with
// an error naming the map, never silently dropped.
func TestFullMapIsAClearError(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	d := load(t, filepath.Join(testenv.BPFFS(t), "meshlane"), cg.Path, false)
	t.Cleanup(func() { d.Uninstall() })
	fill, err := d.MapFill()
	if err != nil {
		t.Fatal(err)
	}
	p := pod(1, "198.18.0.1")
	// One more port rule than meshlane_ports holds.
	for port := 1; len(p.InboundExclude)+len(p.OutboundExcludePorts) <= fill["meshlane_ports"].Capacity; port++ {
		if port <= 65535 {
			p.InboundExclude = append(p.InboundExclude, uint16(port))
		} else {
			p.OutboundExcludePorts = append(p.OutboundExcludePorts, uint16(port-65535))
		}
	}
	err = d.UpsertPod(p)
	if err == nil || !strings.Contains(err.Error(), "meshlane_ports is full") {
		t.Fatalf("upsert beyond capacity: %v", err)
	}
	// The pod was not published half-written and its rules were taken back.
	if got := entries(t, d); got["meshlane_pods"] != 0 || got["meshlane_ports"] != 0 || got["meshlane_podips"] != 0 {
		t.Fatalf("a pod whose rules did not fit left %v", got)
	}
}

// TestUpgradeAcrossLayouts: an agent whose maps have a new layout loads
// them empty without touching the attached programs, which keep the old
// maps and keep redirecting; it fills its maps, then swaps its programs
// into the same links and removes the old layout's pins.
func TestUpgradeAcrossLayouts(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	bpffs := filepath.Join(testenv.BPFFS(t), "meshlane")
	d := load(t, bpffs, cg.Path, false)
	if err := d.UpsertPod(pod(7, "198.18.0.7")); err != nil {
		t.Fatal(err)
	}
	d.Close()
	// Pretend those pins came from an older layout.
	cur := filepath.Join(bpffs, fmt.Sprintf("maps-v%d", datapath.LayoutVersion))
	old := filepath.Join(bpffs, "maps-v0")
	if err := os.Rename(cur, old); err != nil {
		t.Fatal(err)
	}
	before, links := progIDs(t, bpffs), linkIDs(t, bpffs)

	d, err := datapath.LoadDetached(datapath.Options{BPFFS: bpffs, CgroupPath: cg.Path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Uninstall() })
	if got := entries(t, d); got["meshlane_pods"] != 0 {
		t.Fatalf("new layout's maps not empty: %v", got)
	}
	if got := progIDs(t, bpffs); !equalMaps(got, before) {
		t.Fatalf("loading swapped programs before the pods were restored: %v, before %v", got, before)
	}
	if err := d.UpsertPod(pod(7, "198.18.0.7")); err != nil {
		t.Fatal(err)
	}
	if err := d.Attach(); err != nil {
		t.Fatal(err)
	}
	after := progIDs(t, bpffs)
	for name, id := range before {
		if after[name] == id || after[name] == 0 {
			t.Fatalf("link %s runs program %d after the upgrade, before %d", name, after[name], id)
		}
	}
	if got := linkIDs(t, bpffs); !equalMaps(got, links) {
		t.Fatalf("links replaced instead of updated in place: %v, before %v", got, links)
	}
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Fatalf("old layout's pins still there: %v", err)
	}
}

// TestInboundNeedsEthernet: with the tc program on pod interfaces (tcx
// here), a pod whose interface has no Ethernet header (a tun device) is
// refused with an error that says so, and the maps are left as they were:
// no pod is meshed with its inbound from other nodes bypassing the
// sidecar. An interface that does not exist is refused the same way. The
// default sk_lookup hook, on the pod's netns, takes the tun pod.
func TestInboundNeedsEthernet(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.TempCgroup(t)
	d, err := datapath.Load(datapath.Options{BPFFS: filepath.Join(testenv.BPFFS(t), "meshlane"), CgroupPath: cg.Path, Inbound: datapath.InboundTCX})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Uninstall() })
	nsPath, err := testenv.CreateNetns("l3")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testenv.DeleteNetns(nsPath) })
	err = testenv.InNetns(nsPath, func() error {
		return netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, Mode: netlink.TUNTAP_MODE_TUN, Flags: netlink.TUNTAP_DEFAULTS})
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ ifname, want string }{
		{"tun0", "no Ethernet header"},
		{"eth9", "pod interface eth9"},
	} {
		p := pod(7, "198.18.0.7")
		p.Interface = datapath.PodInterface{Netns: nsPath, Name: c.ifname}
		err := d.UpsertPod(p)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("%s: upsert: %v, want an error containing %q", c.ifname, err, c.want)
		}
		if got := entries(t, d); got["meshlane_pods"] != 0 || got["meshlane_ports"] != 0 || got["meshlane_podips"] != 0 || got["meshlane_cidrs"] != 0 {
			t.Fatalf("%s: a refused pod left %v", c.ifname, got)
		}
	}

	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = load(t, filepath.Join(testenv.BPFFS(t), "meshlane"), cg.Path, false)
	if got := d.InboundMode(); got != datapath.InboundSkLookup {
		t.Fatalf("default inbound mode %q, want %q", got, datapath.InboundSkLookup)
	}
	p := pod(7, "198.18.0.7")
	p.Interface = datapath.PodInterface{Netns: nsPath, Name: "tun0"}
	if err := d.AddPod(p); err != nil {
		t.Fatalf("sk_lookup: a pod on tun0: %v", err)
	}
	if err := d.DeletePod(p); err != nil {
		t.Fatal(err)
	}
}
