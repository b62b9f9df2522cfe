package mesh

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func ports(p ...uint16) []uint16 { return p }

func prefixes(t testing.TB, s ...string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, v := range s {
		out = append(out, netip.MustParsePrefix(v))
	}
	return out
}

func TestParsePorts(t *testing.T) {
	const name = "ann/ports"
	istio := portSyntax{}
	istioWild := portSyntax{wildcard: true}
	linkerd := portSyntax{ranges: true}
	tests := []struct {
		name  string
		value string
		syn   portSyntax
		want  portList
		err   string
	}{
		{name: "empty is no port", value: "", syn: istio, want: portList{}},
		{name: "only blanks and commas", value: " , ,, ", syn: istio, want: portList{}},
		{name: "single", value: "80", syn: istio, want: portList{ports: ports(80)}},
		{name: "sorted and deduplicated", value: "8080,80,443,80", syn: istio, want: portList{ports: ports(80, 443, 8080)}},
		{name: "blanks around commas and empty items", value: " 80 ,\t443,, 9090 ", syn: istio, want: portList{ports: ports(80, 443, 9090)}},
		{name: "bounds", value: "1,65535", syn: istio, want: portList{ports: ports(1, 65535)}},
		{name: "leading zeros are decimal", value: "0080", syn: istio, want: portList{ports: ports(80)}},
		{name: "wildcard", value: "*", syn: istioWild, want: portList{all: true}},
		{name: "wildcard with blanks and empty items", value: " * , ", syn: istioWild, want: portList{all: true}},
		{name: "range", value: "4000-4003", syn: linkerd, want: portList{ports: ports(4000, 4001, 4002, 4003)}},
		{name: "one-port range", value: "25-25", syn: linkerd, want: portList{ports: ports(25)}},
		{name: "overlapping ranges and ports merge", value: "10-12,11-13,12,9", syn: linkerd, want: portList{ports: ports(9, 10, 11, 12, 13)}},
		{
			name: "word", value: "abc", syn: istio,
			err: `annotation ann/ports: "abc" is not a port (want 1-65535)`,
		},
		{
			name: "word with ranges", value: "80,abc", syn: linkerd,
			err: `annotation ann/ports: "abc" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "port 0", value: "0", syn: istio,
			err: `annotation ann/ports: "0" is not a port (want 1-65535)`,
		},
		{
			name: "too big", value: "65536", syn: istio,
			err: `annotation ann/ports: "65536" is not a port (want 1-65535)`,
		},
		{
			name: "negative", value: "-1", syn: istio,
			err: `annotation ann/ports: "-1" is not a port (want 1-65535; this annotation takes no ranges, list each port)`,
		},
		{
			name: "range where the mesh takes none", value: "4000-4010", syn: istio,
			err: `annotation ann/ports: "4000-4010" is not a port (want 1-65535; this annotation takes no ranges, list each port)`,
		},
		{
			name: "reversed range", value: "4010-4000", syn: linkerd,
			err: `annotation ann/ports: "4010-4000" is a reversed range (want low-high, e.g. 4000-4010)`,
		},
		{
			name: "range from 0", value: "0-65535", syn: linkerd,
			err: `annotation ann/ports: "0-65535" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "range past 65535", value: "1-65536", syn: linkerd,
			err: `annotation ann/ports: "1-65536" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "open range", value: "4000-", syn: linkerd,
			err: `annotation ann/ports: "4000-" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "double range", value: "1-2-3", syn: linkerd,
			err: `annotation ann/ports: "1-2-3" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "blank inside an item", value: "80 81", syn: istio,
			err: `annotation ann/ports: "80 81" is not a port (want 1-65535)`,
		},
		{
			name: "sign", value: "+80", syn: istio,
			err: `annotation ann/ports: "+80" is not a port (want 1-65535)`,
		},
		{
			name: "wildcard not accepted", value: "*", syn: linkerd,
			err: `annotation ann/ports: "*" is not accepted here (only include annotations take it; list the items instead)`,
		},
		{
			name: "wildcard in a list", value: "*,80", syn: istioWild,
			err: `annotation ann/ports: "*" must be the whole value, not one item of a list ("*,80")`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parsePorts(name, tt.value, tt.syn)
			if tt.err != "" {
				if err == nil || err.Error() != tt.err {
					t.Fatalf("parsePorts(%q) error = %v, want %q", tt.value, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parsePorts(%q): %v", tt.value, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("parsePorts(%q) = %+v, want %+v", tt.value, got, tt.want)
			}
		})
	}
}

// Long lists are the norm for some users (Merbridge capped them at 20 and
// silently dropped the rest): every item must come through.
func TestParsePortsLongLists(t *testing.T) {
	var items []string
	for p := 1000; p < 2000; p++ {
		items = append(items, fmt.Sprint(p))
	}
	got, err := parsePorts("a", strings.Join(items, ","), portSyntax{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.ports) != 1000 || got.ports[0] != 1000 || got.ports[999] != 1999 {
		t.Fatalf("1000 ports gave %d, first %d", len(got.ports), got.ports[0])
	}

	all, err := parsePorts("a", "1-65535,1-65535,30000-40000", portSyntax{ranges: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(all.ports) != 65535 || all.ports[0] != 1 || all.ports[65534] != 65535 {
		t.Fatalf("full range gave %d ports", len(all.ports))
	}
}

func TestParseCIDRs(t *testing.T) {
	const name = "ann/cidrs"
	tests := []struct {
		name     string
		value    string
		wildcard bool
		want     cidrList
		err      string
	}{
		{name: "empty is none", value: "", want: cidrList{}},
		{name: "only commas", value: ",, ,", want: cidrList{}},
		{name: "ipv4", value: "10.0.0.0/8", want: cidrList{prefixes: prefixes(t, "10.0.0.0/8")}},
		{name: "ipv6", value: "fd00::/8, 2001:db8::/32", want: cidrList{prefixes: prefixes(t, "2001:db8::/32", "fd00::/8")}},
		{
			name:  "mixed families sorted v4 first, deduplicated, blanks tolerated",
			value: " fd00::/8 ,10.0.0.0/8,, 192.168.0.0/16,10.0.0.0/8,::1/128",
			want:  cidrList{prefixes: prefixes(t, "10.0.0.0/8", "192.168.0.0/16", "::1/128", "fd00::/8")},
		},
		{name: "host bits dropped", value: "10.1.2.3/8,10.0.0.0/8", want: cidrList{prefixes: prefixes(t, "10.0.0.0/8")}},
		{name: "same address, different lengths kept", value: "10.0.0.0/16,10.0.0.0/8", want: cidrList{prefixes: prefixes(t, "10.0.0.0/8", "10.0.0.0/16")}},
		{name: "whole spaces", value: "0.0.0.0/0,::/0", want: cidrList{prefixes: prefixes(t, "0.0.0.0/0", "::/0")}},
		{name: "wildcard", value: "*", wildcard: true, want: cidrList{all: true}},
		{
			name: "bare address", value: "10.0.0.1",
			err: `annotation ann/cidrs: "10.0.0.1" is an address, not a CIDR (write 10.0.0.1/32)`,
		},
		{
			name: "bare ipv6 address", value: "fd00::1",
			err: `annotation ann/cidrs: "fd00::1" is an address, not a CIDR (write fd00::1/128)`,
		},
		{
			name: "prefix too long", value: "10.0.0.0/33",
			err: `annotation ann/cidrs: "10.0.0.0/33" is not a CIDR (want e.g. 10.0.0.0/8 or fd00::/8)`,
		},
		{
			name: "short address", value: "10.0.0/8",
			err: `annotation ann/cidrs: "10.0.0/8" is not a CIDR (want e.g. 10.0.0.0/8 or fd00::/8)`,
		},
		{
			name: "word among good items", value: "10.0.0.0/8,nope",
			err: `annotation ann/cidrs: "nope" is not a CIDR (want e.g. 10.0.0.0/8 or fd00::/8)`,
		},
		{
			name: "zone", value: "fe80::%eth0/64",
			err: `annotation ann/cidrs: "fe80::%eth0/64" is not a CIDR (want e.g. 10.0.0.0/8 or fd00::/8)`,
		},
		{
			name: "wildcard not accepted", value: "*",
			err: `annotation ann/cidrs: "*" is not accepted here (only include annotations take it; list the items instead)`,
		},
		{
			name: "wildcard in a list", value: "10.0.0.0/8, *", wildcard: true,
			err: `annotation ann/cidrs: "*" must be the whole value, not one item of a list ("10.0.0.0/8,*")`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseCIDRs(name, tt.value, tt.wildcard)
			if tt.err != "" {
				if err == nil || err.Error() != tt.err {
					t.Fatalf("parseCIDRs(%q) error = %v, want %q", tt.value, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseCIDRs(%q): %v", tt.value, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("parseCIDRs(%q) = %+v, want %+v", tt.value, got, tt.want)
			}
		})
	}
}

func TestParseCIDRsLongList(t *testing.T) {
	var items []string
	for i := range 1000 {
		items = append(items, fmt.Sprintf("10.%d.%d.0/24", i/256, i%256))
	}
	got, err := parseCIDRs("a", strings.Join(items, ","), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.prefixes) != 1000 {
		t.Fatalf("1000 CIDRs gave %d", len(got.prefixes))
	}
	if got.prefixes[999] != netip.MustParsePrefix("10.3.231.0/24") {
		t.Fatalf("last CIDR = %v", got.prefixes[999])
	}
}

func TestParseStatusPort(t *testing.T) {
	tests := []struct {
		value  string
		port   uint16
		ok     bool
		errMsg string
	}{
		{value: "", ok: false},
		{value: "15020", port: 15020, ok: true},
		{value: " 8080 ", port: 8080, ok: true},
		{value: "0", ok: false}, // Istio: zero turns the status server off
		{value: "65536", errMsg: `annotation s: "65536" is not a port (want 1-65535, or 0 for no status port)`},
		{value: "80,81", errMsg: `annotation s: "80,81" is not a port (want 1-65535, or 0 for no status port)`},
	}
	for _, tt := range tests {
		port, ok, err := parseStatusPort("s", tt.value)
		if tt.errMsg != "" {
			if err == nil || err.Error() != tt.errMsg {
				t.Errorf("parseStatusPort(%q) error = %v, want %q", tt.value, err, tt.errMsg)
			}
			continue
		}
		if err != nil || port != tt.port || ok != tt.ok {
			t.Errorf("parseStatusPort(%q) = %d, %v, %v; want %d, %v, nil", tt.value, port, ok, err, tt.port, tt.ok)
		}
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		value  string
		id     uint32
		ok     bool
		errMsg string
	}{
		{value: "", ok: false},
		{value: "0", id: 0, ok: true},
		{value: "2102", id: 2102, ok: true},
		{value: "4294967294", id: 4294967294, ok: true},
		{value: "4294967295", errMsg: `annotation u: "4294967295" is not a user/group id (want 0-4294967294)`},
		{value: "-1", errMsg: `annotation u: "-1" is not a user/group id (want 0-4294967294)`},
		{value: "root", errMsg: `annotation u: "root" is not a user/group id (want 0-4294967294)`},
	}
	for _, tt := range tests {
		id, ok, err := parseID("u", tt.value)
		if tt.errMsg != "" {
			if err == nil || err.Error() != tt.errMsg {
				t.Errorf("parseID(%q) error = %v, want %q", tt.value, err, tt.errMsg)
			}
			continue
		}
		if err != nil || id != tt.id || ok != tt.ok {
			t.Errorf("parseID(%q) = %d, %v, %v; want %d, %v, nil", tt.value, id, ok, err, tt.id, tt.ok)
		}
	}
}
