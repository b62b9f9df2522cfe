package mesh

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// Seeds for the fuzzers live in testdata/fuzz/<FuzzName>/.

func formatPorts(l portList) string {
	if l.all {
		return "*"
	}
	return joinPorts(l.ports)
}

func joinPorts(p []uint16) string {
	s := make([]string, len(p))
	for i, v := range p {
		s[i] = strconv.Itoa(int(v))
	}
	return strings.Join(s, ",")
}

func formatCIDRs(l cidrList) string {
	if l.all {
		return "*"
	}
	return joinCIDRs(l.prefixes)
}

func joinCIDRs(p []netip.Prefix) string {
	s := make([]string, len(p))
	for i, v := range p {
		s[i] = v.String()
	}
	return strings.Join(s, ",")
}

// checkSortedPorts fails unless p is strictly increasing and has no port 0.
func checkSortedPorts(t *testing.T, what string, p []uint16) {
	t.Helper()
	for i, v := range p {
		if v == 0 || (i > 0 && p[i-1] >= v) {
			t.Fatalf("%s not sorted, unique and nonzero: %v", what, p)
		}
	}
}

// checkSortedCIDRs fails unless p is canonical, strictly increasing.
func checkSortedCIDRs(t *testing.T, what string, p []netip.Prefix) {
	t.Helper()
	for i, v := range p {
		if !v.IsValid() || v != v.Masked() || (i > 0 && p[i-1].Compare(v) >= 0) {
			t.Fatalf("%s not canonical, sorted and unique: %v", what, p)
		}
	}
}

func FuzzParsePorts(f *testing.F) {
	f.Fuzz(func(t *testing.T, value string, wildcard, ranges bool) {
		const name = "fuzz/ports"
		syn := portSyntax{wildcard: wildcard, ranges: ranges}
		got, err := parsePorts(name, value, syn)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "annotation "+name+": ") {
				t.Fatalf("error does not name the annotation: %v", err)
			}
			return
		}
		if got.all && got.ports != nil {
			t.Fatalf("wildcard with ports: %+v", got)
		}
		checkSortedPorts(t, "ports", got.ports)

		again, err := parsePorts(name, formatPorts(got), syn)
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Fatalf("%q gave %+v, which re-parses to %+v, %v", value, got, again, err)
		}
		// A wider syntax accepts whatever a narrower one does, unchanged.
		wide, err := parsePorts(name, value, portSyntax{wildcard: true, ranges: true})
		if err != nil || !reflect.DeepEqual(wide, got) {
			t.Fatalf("%q: %+v with %+v but %+v, %v with everything allowed", value, got, syn, wide, err)
		}
	})
}

func FuzzParseCIDRs(f *testing.F) {
	f.Fuzz(func(t *testing.T, value string, wildcard bool) {
		const name = "fuzz/cidrs"
		got, err := parseCIDRs(name, value, wildcard)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "annotation "+name+": ") {
				t.Fatalf("error does not name the annotation: %v", err)
			}
			return
		}
		if got.all && got.prefixes != nil {
			t.Fatalf("wildcard with prefixes: %+v", got)
		}
		checkSortedCIDRs(t, "prefixes", got.prefixes)

		again, err := parseCIDRs(name, formatCIDRs(got), wildcard)
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Fatalf("%q gave %+v, which re-parses to %+v, %v", value, got, again, err)
		}
	})
}

// Annotation keys FuzzDecide fills from its string arguments.
var (
	fuzzIstioKeys = []string{
		istioIncludeInboundPorts, istioExcludeInboundPorts, istioIncludeOutboundPorts,
		istioExcludeOutboundPorts, istioIncludeOutboundIPRanges, istioExcludeOutboundIPRanges,
		istioStatusPort,
	}
	fuzzLinkerdKeys = []string{
		linkerdSkipInboundPorts, linkerdSkipOutboundPorts, linkerdSkipSubnets,
		linkerdProxyUID, linkerdProxyGID,
	}
)

// Bits of FuzzDecide's flags beyond one per key above.
const (
	fuzzIstioMarker   = 1 << 12
	fuzzLinkerdMarker = 1 << 13
	fuzzNilMap        = 1 << 14
	fuzzLinkerdDef    = 1 << 15
)

// FuzzDecide builds an annotation map from flags (which keys are present,
// which markers, nil map, default profile) and seven values, and checks
// Decide's promises: no panic, the right membership, canonical settings,
// and settings that, written back as annotations, decide the same again.
func FuzzDecide(f *testing.F) {
	f.Fuzz(func(t *testing.T, flags uint16, v0, v1, v2, v3, v4, v5, v6 string) {
		vals := []string{v0, v1, v2, v3, v4, v5, v6}
		var ann map[string]string
		if flags&fuzzNilMap == 0 {
			ann = map[string]string{}
			for i, k := range fuzzIstioKeys {
				if flags&(1<<i) != 0 {
					ann[k] = vals[i]
				}
			}
			for i, k := range fuzzLinkerdKeys {
				if flags&(1<<(7+i)) != 0 {
					ann[k] = vals[i]
				}
			}
			if flags&fuzzIstioMarker != 0 {
				ann[Istio.Marker] = v6
			}
			if flags&fuzzLinkerdMarker != 0 {
				ann[Linkerd.Marker] = v5
			}
		}
		def := Istio
		if flags&fuzzLinkerdDef != 0 {
			def = Linkerd
		}

		d, err := Decide(ann, def)
		istio, linkerd := flags&fuzzIstioMarker != 0, flags&fuzzLinkerdMarker != 0
		switch {
		case ann == nil:
			if err != nil || d.Membership != Unknown || d.Profile.Name != def.Name {
				t.Fatalf("nil map: %+v, %v", d, err)
			}
		case istio && linkerd:
			if err == nil {
				t.Fatalf("two markers accepted: %+v", d)
			}
			return
		case !istio && !linkerd:
			if err != nil || d.Membership != NotMeshed {
				t.Fatalf("no marker: %+v, %v", d, err)
			}
			return
		default:
			want := "istio"
			if linkerd {
				want = "linkerd"
			}
			if d.Membership != Meshed || d.Profile.Name != want {
				t.Fatalf("marker of %s: %+v, %v", want, d, err)
			}
			if err != nil {
				if !strings.Contains(err.Error(), "annotation ") || !reflect.DeepEqual(d.Settings, Settings{}) {
					t.Fatalf("error %v with settings %+v", err, d.Settings)
				}
				return
			}
		}

		s := d.Settings
		for what, p := range map[string][]uint16{
			"InboundInclude": s.InboundInclude, "InboundExclude": s.InboundExclude,
			"OutboundIncludePorts": s.OutboundIncludePorts, "OutboundExcludePorts": s.OutboundExcludePorts,
		} {
			checkSortedPorts(t, what, p)
		}
		checkSortedCIDRs(t, "OutboundIncludeCIDRs", s.OutboundIncludeCIDRs)
		checkSortedCIDRs(t, "OutboundExcludeCIDRs", s.OutboundExcludeCIDRs)
		for _, p := range d.Profile.ProxyPorts {
			if !slices.Contains(s.InboundExclude, p) {
				t.Fatalf("proxy port %d not excluded inbound: %v", p, s.InboundExclude)
			}
		}
		if (s.InboundAll && s.InboundInclude != nil) || (s.OutboundAllCIDRs && s.OutboundIncludeCIDRs != nil) {
			t.Fatalf("wildcard with a list: %+v", s)
		}

		again, err := Decide(render(d), def)
		if err != nil || !reflect.DeepEqual(again.Settings, s) {
			t.Fatalf("settings %+v rendered as %v decide to %+v, %v", s, render(d), again.Settings, err)
		}
	})
}

// render writes a meshed decision's settings back as its mesh's annotations.
// The Istio status port needs no annotation of its own: it is already in
// the inbound exclusions.
func render(d Decision) map[string]string {
	s := d.Settings
	ann := map[string]string{d.Profile.Marker: "x"}
	switch d.Profile.Name {
	case "istio":
		ann[istioIncludeInboundPorts] = formatPorts(portList{all: s.InboundAll, ports: s.InboundInclude})
		ann[istioExcludeInboundPorts] = joinPorts(s.InboundExclude)
		ann[istioIncludeOutboundPorts] = joinPorts(s.OutboundIncludePorts)
		ann[istioExcludeOutboundPorts] = joinPorts(s.OutboundExcludePorts)
		ann[istioIncludeOutboundIPRanges] = formatCIDRs(cidrList{all: s.OutboundAllCIDRs, prefixes: s.OutboundIncludeCIDRs})
		ann[istioExcludeOutboundIPRanges] = joinCIDRs(s.OutboundExcludeCIDRs)
	case "linkerd":
		ann[linkerdSkipInboundPorts] = joinPorts(s.InboundExclude)
		ann[linkerdSkipOutboundPorts] = joinPorts(s.OutboundExcludePorts)
		ann[linkerdSkipSubnets] = joinCIDRs(s.OutboundExcludeCIDRs)
		ann[linkerdProxyUID] = fmt.Sprint(s.ProxyUID)
		ann[linkerdProxyGID] = fmt.Sprint(s.ProxyGID)
	}
	return ann
}
