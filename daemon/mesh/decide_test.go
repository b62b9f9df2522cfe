package mesh

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/meshlane/meshlane/daemon/datapath"
)

var istioProxyPorts = ports(15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090)
var linkerdProxyPorts = ports(4140, 4143, 4190, 4191)

// istioDefaults is what an injected Istio pod without traffic annotations gets.
func istioDefaults() Settings {
	return Settings{
		ProxyUID: 1337, ProxyGID: 1337, OutboundPort: 15001, InboundPort: 15006,
		InboundAll:           true,
		InboundExclude:       istioProxyPorts,
		OutboundAllCIDRs:     true,
		ProxyLoopbackInbound: true,
	}
}

// linkerdDefaults is what an injected Linkerd pod without traffic annotations gets.
func linkerdDefaults() Settings {
	return Settings{
		ProxyUID: 2102, ProxyGID: 2102, OutboundPort: 4140, InboundPort: 4143,
		InboundAll:       true,
		InboundExclude:   linkerdProxyPorts,
		OutboundAllCIDRs: true,
	}
}

// withMarker returns ann plus the marker of p.
func withMarker(p Profile, ann map[string]string) map[string]string {
	out := map[string]string{p.Marker: "injected"}
	for k, v := range ann {
		out[k] = v
	}
	return out
}

func TestIstioSettings(t *testing.T) {
	tests := []struct {
		name string
		ann  map[string]string
		want func(*Settings)
		err  string
	}{
		{name: "defaults", want: func(*Settings) {}},
		{
			name: "include inbound list",
			ann:  map[string]string{istioIncludeInboundPorts: "8080, 80,80"},
			want: func(s *Settings) { s.InboundAll = false; s.InboundInclude = ports(80, 8080) },
		},
		{
			name: "include inbound empty means none",
			ann:  map[string]string{istioIncludeInboundPorts: ""},
			want: func(s *Settings) { s.InboundAll = false },
		},
		{
			name: "include inbound wildcard",
			ann:  map[string]string{istioIncludeInboundPorts: "*"},
			want: func(*Settings) {},
		},
		{
			name: "exclude inbound adds to the proxy ports",
			ann:  map[string]string{istioExcludeInboundPorts: "9000,8081,15021"},
			want: func(s *Settings) { s.InboundExclude = mergePorts(istioProxyPorts, ports(8081, 9000)) },
		},
		{
			name: "status port excluded inbound",
			ann:  map[string]string{istioStatusPort: "15999"},
			want: func(s *Settings) { s.InboundExclude = mergePorts(istioProxyPorts, ports(15999)) },
		},
		{
			name: "status port zero means none",
			ann:  map[string]string{istioStatusPort: "0"},
			want: func(*Settings) {},
		},
		{
			name: "include outbound ports",
			ann:  map[string]string{istioIncludeOutboundPorts: "3306"},
			want: func(s *Settings) { s.OutboundIncludePorts = ports(3306) },
		},
		{
			name: "exclude outbound ports",
			ann:  map[string]string{istioExcludeOutboundPorts: "6379, 5432"},
			want: func(s *Settings) { s.OutboundExcludePorts = ports(5432, 6379) },
		},
		{
			name: "include outbound ranges, both families",
			ann:  map[string]string{istioIncludeOutboundIPRanges: "fd00::/8,10.96.0.0/12"},
			want: func(s *Settings) {
				s.OutboundAllCIDRs = false
				s.OutboundIncludeCIDRs = prefixes(t, "10.96.0.0/12", "fd00::/8")
			},
		},
		{
			name: "include outbound ranges empty means none",
			ann:  map[string]string{istioIncludeOutboundIPRanges: ""},
			want: func(s *Settings) { s.OutboundAllCIDRs = false },
		},
		{
			name: "exclude outbound ranges",
			ann:  map[string]string{istioExcludeOutboundIPRanges: "169.254.169.254/32, 2001:db8::/32,10.1.2.3/16"},
			want: func(s *Settings) {
				s.OutboundExcludeCIDRs = prefixes(t, "10.1.0.0/16", "169.254.169.254/32", "2001:db8::/32")
			},
		},
		{
			name: "Linkerd annotations are not Istio's",
			ann:  map[string]string{linkerdSkipSubnets: "garbage", linkerdProxyUID: "7"},
			want: func(*Settings) {},
		},
		{
			name: "bad exclude outbound port",
			ann:  map[string]string{istioExcludeOutboundPorts: "abc"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/excludeOutboundPorts: "abc" is not a port (want 1-65535)`,
		},
		{
			name: "Istio takes no ranges",
			ann:  map[string]string{istioIncludeInboundPorts: "80-90"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/includeInboundPorts: "80-90" is not a port (want 1-65535; this annotation takes no ranges, list each port)`,
		},
		{
			name: "port 0 inbound",
			ann:  map[string]string{istioExcludeInboundPorts: "0"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/excludeInboundPorts: "0" is not a port (want 1-65535)`,
		},
		{
			name: "wildcard in exclude",
			ann:  map[string]string{istioExcludeOutboundPorts: "*"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/excludeOutboundPorts: "*" is not accepted here`,
		},
		{
			name: "include outbound ports takes no wildcard",
			ann:  map[string]string{istioIncludeOutboundPorts: "*"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/includeOutboundPorts: "*" is not accepted here`,
		},
		{
			name: "bad include range",
			ann:  map[string]string{istioIncludeOutboundIPRanges: "10.0.0.0/33"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0.0/33" is not a CIDR`,
		},
		{
			name: "wildcard in exclude ranges",
			ann:  map[string]string{istioExcludeOutboundIPRanges: "*"},
			err:  `istio pod: annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: "*" is not accepted here`,
		},
		{
			name: "bad status port",
			ann:  map[string]string{istioStatusPort: "health"},
			err:  `istio pod: annotation status.sidecar.istio.io/port: "health" is not a port`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Decide(withMarker(Istio, tt.ann), Istio)
			if tt.err != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.err) {
					t.Fatalf("error = %v, want prefix %q", err, tt.err)
				}
				if d.Membership != Meshed || d.Profile.Name != "istio" || !reflect.DeepEqual(d.Settings, Settings{}) {
					t.Fatalf("on error the decision should say meshed by istio with no settings, got %+v", d)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := istioDefaults()
			tt.want(&want)
			if !reflect.DeepEqual(d.Settings, want) {
				t.Fatalf("settings\n got %+v\nwant %+v", d.Settings, want)
			}
		})
	}
}

func TestLinkerdSettings(t *testing.T) {
	tests := []struct {
		name string
		ann  map[string]string
		want func(*Settings)
		err  string
	}{
		{name: "defaults", want: func(*Settings) {}},
		{
			name: "skip inbound ports with ranges",
			ann:  map[string]string{linkerdSkipInboundPorts: "4000-4003, 25,4190"},
			want: func(s *Settings) {
				s.InboundExclude = ports(25, 4000, 4001, 4002, 4003, 4140, 4143, 4190, 4191)
			},
		},
		{
			name: "skip outbound ports with ranges",
			ann:  map[string]string{linkerdSkipOutboundPorts: "5432-5433,3306"},
			want: func(s *Settings) { s.OutboundExcludePorts = ports(3306, 5432, 5433) },
		},
		{
			name: "skip subnets, both families",
			ann:  map[string]string{linkerdSkipSubnets: "fd00::/8, 10.0.0.0/8"},
			want: func(s *Settings) { s.OutboundExcludeCIDRs = prefixes(t, "10.0.0.0/8", "fd00::/8") },
		},
		{
			name: "proxy uid and gid",
			ann:  map[string]string{linkerdProxyUID: "1234", linkerdProxyGID: "5678"},
			want: func(s *Settings) { s.ProxyUID = 1234; s.ProxyGID = 5678 },
		},
		{
			name: "empty proxy uid is unset",
			ann:  map[string]string{linkerdProxyUID: ""},
			want: func(*Settings) {},
		},
		{
			name: "Istio annotations are not Linkerd's",
			ann:  map[string]string{istioIncludeInboundPorts: "junk", istioIncludeOutboundIPRanges: ""},
			want: func(*Settings) {},
		},
		{
			name: "reversed range",
			ann:  map[string]string{linkerdSkipInboundPorts: "4010-4000"},
			err:  `linkerd pod: annotation config.linkerd.io/skip-inbound-ports: "4010-4000" is a reversed range (want low-high, e.g. 4000-4010)`,
		},
		{
			name: "range from port 0",
			ann:  map[string]string{linkerdSkipOutboundPorts: "0-10"},
			err:  `linkerd pod: annotation config.linkerd.io/skip-outbound-ports: "0-10" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "bad port word",
			ann:  map[string]string{linkerdSkipOutboundPorts: "abc"},
			err:  `linkerd pod: annotation config.linkerd.io/skip-outbound-ports: "abc" is not a port (want 1-65535 or a range a-b)`,
		},
		{
			name: "no wildcard in skip lists",
			ann:  map[string]string{linkerdSkipInboundPorts: "*"},
			err:  `linkerd pod: annotation config.linkerd.io/skip-inbound-ports: "*" is not accepted here`,
		},
		{
			name: "bare address in skip-subnets",
			ann:  map[string]string{linkerdSkipSubnets: "10.0.0.1"},
			err:  `linkerd pod: annotation config.linkerd.io/skip-subnets: "10.0.0.1" is an address, not a CIDR (write 10.0.0.1/32)`,
		},
		{
			name: "negative uid",
			ann:  map[string]string{linkerdProxyUID: "-1"},
			err:  `linkerd pod: annotation config.linkerd.io/proxy-uid: "-1" is not a user/group id`,
		},
		{
			name: "bad gid",
			ann:  map[string]string{linkerdProxyGID: "proxy"},
			err:  `linkerd pod: annotation config.linkerd.io/proxy-gid: "proxy" is not a user/group id`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Decide(withMarker(Linkerd, tt.ann), Istio)
			if tt.err != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.err) {
					t.Fatalf("error = %v, want prefix %q", err, tt.err)
				}
				if d.Membership != Meshed || d.Profile.Name != "linkerd" || !reflect.DeepEqual(d.Settings, Settings{}) {
					t.Fatalf("on error the decision should say meshed by linkerd with no settings, got %+v", d)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := linkerdDefaults()
			tt.want(&want)
			if !reflect.DeepEqual(d.Settings, want) {
				t.Fatalf("settings\n got %+v\nwant %+v", d.Settings, want)
			}
		})
	}
}

func TestDecideMembership(t *testing.T) {
	tests := []struct {
		name    string
		ann     map[string]string
		def     Profile
		want    Membership
		profile string // Profile.Name
		reason  string
	}{
		{
			name: "no annotations passed: wait for the default sidecar",
			ann:  nil, def: Istio, want: Unknown, profile: "istio",
			reason: "runtime passed no pod annotations: treat the pod as meshed once the istio sidecar listens on port 15001",
		},
		{
			name: "no annotations passed, Linkerd default",
			ann:  nil, def: Linkerd, want: Unknown, profile: "linkerd",
			reason: "runtime passed no pod annotations: treat the pod as meshed once the linkerd sidecar listens on port 4140",
		},
		{
			name: "annotations passed, none of a mesh",
			ann:  map[string]string{}, def: Istio, want: NotMeshed,
			reason: "no sidecar.istio.io/status or linkerd.io/proxy-version annotation: the pod has no sidecar",
		},
		{
			name: "unrelated annotations",
			ann:  map[string]string{"prometheus.io/scrape": "true", istioExcludeOutboundPorts: "abc"}, def: Istio, want: NotMeshed,
			reason: "no sidecar.istio.io/status or linkerd.io/proxy-version annotation: the pod has no sidecar",
		},
		{
			name: "Istio opt-out",
			ann:  map[string]string{"sidecar.istio.io/inject": "false"}, def: Istio, want: NotMeshed,
			reason: `annotation sidecar.istio.io/inject="false" opts the pod out and no sidecar.istio.io/status is present`,
		},
		{
			name: "Linkerd opt-out",
			ann:  map[string]string{"linkerd.io/inject": "disabled"}, def: Istio, want: NotMeshed,
			reason: `annotation linkerd.io/inject="disabled" opts the pod out and no linkerd.io/proxy-version is present`,
		},
		{
			name: "Istio marker wins over an opt-out: the injector did inject",
			ann:  map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`, "sidecar.istio.io/inject": "false"},
			def:  Istio, want: Meshed, profile: "istio",
			reason: "annotation sidecar.istio.io/status present",
		},
		{
			name: "empty marker value still marks",
			ann:  map[string]string{"linkerd.io/proxy-version": ""}, def: Istio, want: Meshed, profile: "linkerd",
			reason: "annotation linkerd.io/proxy-version present",
		},
		{
			name: "Linkerd pod with an Istio default",
			ann:  map[string]string{"linkerd.io/proxy-version": "edge-25.1.1"}, def: Istio, want: Meshed, profile: "linkerd",
			reason: "annotation linkerd.io/proxy-version present",
		},
		{
			name: "Istio pod with a Linkerd default",
			ann:  map[string]string{"sidecar.istio.io/status": "{}"}, def: Linkerd, want: Meshed, profile: "istio",
			reason: "annotation sidecar.istio.io/status present",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Decide(tt.ann, tt.def)
			if err != nil {
				t.Fatal(err)
			}
			if d.Membership != tt.want || d.Profile.Name != tt.profile || d.Reason != tt.reason {
				t.Fatalf("got %v/%q/%q, want %v/%q/%q", d.Membership, d.Profile.Name, d.Reason, tt.want, tt.profile, tt.reason)
			}
			switch d.Membership {
			case NotMeshed:
				if !reflect.DeepEqual(d, Decision{Membership: NotMeshed, Reason: tt.reason}) {
					t.Fatalf("not-meshed decision carries more than a reason: %+v", d)
				}
			case Unknown:
				// The caller programs these once the sidecar shows up.
				want := istioDefaults()
				if tt.def.Name == "linkerd" {
					want = linkerdDefaults()
				}
				if !reflect.DeepEqual(d.Settings, want) || !reflect.DeepEqual(d.Profile, tt.def) {
					t.Fatalf("unknown decision: %+v", d)
				}
			}
		})
	}
}

func TestDecideBothMarkers(t *testing.T) {
	_, err := Decide(map[string]string{"sidecar.istio.io/status": "{}", "linkerd.io/proxy-version": "x"}, Istio)
	want := "pod carries the markers of two meshes (annotations sidecar.istio.io/status and linkerd.io/proxy-version): remove one mesh's sidecar"
	if err == nil || err.Error() != want {
		t.Fatalf("error = %v, want %q", err, want)
	}
}

// A site's adjusted default profile applies to pods of its mesh only.
func TestDecideAdjustedDefault(t *testing.T) {
	def, err := ProfileByName("istio")
	if err != nil {
		t.Fatal(err)
	}
	def.ProxyUID, def.ProxyGID = 1000, 1001

	d, err := Decide(map[string]string{Istio.Marker: "{}"}, def)
	if err != nil {
		t.Fatal(err)
	}
	if d.Settings.ProxyUID != 1000 || d.Settings.ProxyGID != 1001 || d.Profile.ProxyUID != 1000 {
		t.Fatalf("istio pod did not get the adjusted profile: %+v", d)
	}

	d, err = Decide(map[string]string{Linkerd.Marker: "x"}, def)
	if err != nil {
		t.Fatal(err)
	}
	if d.Settings.ProxyUID != 2102 || d.Settings.ProxyGID != 2102 {
		t.Fatalf("linkerd pod got the istio adjustment: %+v", d.Settings)
	}
}

func TestDecideBadDefault(t *testing.T) {
	bad := Istio.clone()
	bad.Name = "consul"
	noPort := Linkerd.clone()
	noPort.OutboundPort = 0
	noMarker := Istio.clone()
	noMarker.Marker = ""
	tests := []struct {
		p   Profile
		err string
	}{
		{bad, `mesh profile "consul": unknown mesh name: want "istio" or "linkerd"`},
		{Profile{}, `mesh profile "": unknown mesh name: want "istio" or "linkerd"`},
		{noPort, `mesh profile "linkerd": outbound (0), inbound (4143) and ready (4140) ports must all be set`},
		{noMarker, `mesh profile "istio": marker annotation must be set`},
	}
	for _, tt := range tests {
		for _, ann := range []map[string]string{nil, {}, {Istio.Marker: "{}"}} {
			if _, err := Decide(ann, tt.p); err == nil || err.Error() != tt.err {
				t.Errorf("Decide(%v, %q) error = %v, want %q", ann, tt.p.Name, err, tt.err)
			}
		}
	}
}

// Nothing a caller does with a Decision or a looked-up profile may change
// the package's profiles, which every later pod uses.
func TestProfilesAreNotShared(t *testing.T) {
	p, err := ProfileByName("linkerd")
	if err != nil {
		t.Fatal(err)
	}
	p.ProxyPorts[0] = 1
	d, err := Decide(nil, Istio)
	if err != nil {
		t.Fatal(err)
	}
	d.Profile.ProxyPorts[0] = 1
	d.Settings.InboundExclude[0] = 1
	d, err = Decide(map[string]string{Linkerd.Marker: "x"}, Istio)
	if err != nil {
		t.Fatal(err)
	}
	d.Profile.ProxyPorts[0] = 1
	d.Settings.InboundExclude[0] = 1

	if !slices.Equal(Istio.ProxyPorts, istioProxyPorts) || !slices.Equal(Linkerd.ProxyPorts, linkerdProxyPorts) {
		t.Fatalf("package profiles changed: %v %v", Istio.ProxyPorts, Linkerd.ProxyPorts)
	}
}

func TestProfileByName(t *testing.T) {
	for _, want := range []Profile{Istio, Linkerd} {
		got, err := ProfileByName(want.Name)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("ProfileByName(%q) = %+v, want %+v", want.Name, got, want)
		}
	}
	_, err := ProfileByName("Istio")
	if want := `unknown mesh profile "Istio": want "istio" or "linkerd"`; err == nil || err.Error() != want {
		t.Fatalf("error = %v, want %q", err, want)
	}
}

// The profiles' fixed facts, spelled out once more so an accidental edit
// of profile.go shows up here.
func TestProfileFacts(t *testing.T) {
	tests := []struct {
		p                        Profile
		uid, gid                 uint32
		out, in, ready           uint16
		marker, optOut, optValue string
		proxyPorts               []uint16
	}{
		{Istio, 1337, 1337, 15001, 15006, 15001, "sidecar.istio.io/status", "sidecar.istio.io/inject", "false", istioProxyPorts},
		{Linkerd, 2102, 2102, 4140, 4143, 4140, "linkerd.io/proxy-version", "linkerd.io/inject", "disabled", linkerdProxyPorts},
	}
	for _, tt := range tests {
		p := tt.p
		if p.ProxyUID != tt.uid || p.ProxyGID != tt.gid || p.OutboundPort != tt.out || p.InboundPort != tt.in ||
			p.ReadyPort != tt.ready || p.Marker != tt.marker || p.OptOutAnnotation != tt.optOut ||
			p.OptOutValue != tt.optValue || !slices.Equal(p.ProxyPorts, tt.proxyPorts) {
			t.Errorf("profile %q = %+v", p.Name, p)
		}
		if err := p.validate(); err != nil {
			t.Errorf("built-in profile invalid: %v", err)
		}
	}
}

func TestMembershipString(t *testing.T) {
	for m, want := range map[Membership]string{
		Unknown: "unknown", NotMeshed: "not-meshed", Meshed: "meshed", Membership(7): "Membership(7)",
	} {
		if got := m.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", int(m), got, want)
		}
	}
}

// Pod must fill every datapath.Pod field: a field added to the contract and
// forgotten here would reach the maps as zero.
func TestSettingsPodFillsEveryField(t *testing.T) {
	s := Settings{
		ProxyUID: 1, ProxyGID: 2, OutboundPort: 3, InboundPort: 4,
		InboundAll:           true,
		InboundInclude:       ports(5),
		InboundExclude:       ports(6),
		OutboundExcludePorts: ports(7),
		OutboundIncludePorts: ports(8),
		OutboundAllCIDRs:     true,
		OutboundIncludeCIDRs: prefixes(t, "10.0.0.0/8"),
		OutboundExcludeCIDRs: prefixes(t, "fd00::/8"),
		DNSCapture:           true,
		DNSPort:              9,
		ProxyLoopbackInbound: true,
	}
	ip4, ip6 := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::5")
	ips := []netip.Addr{ip6, ip4, ip6}
	pod := s.Pod(42, ips, datapath.PodInterface{Netns: "/run/netns/x", Name: "eth0"}, "/sys/fs/cgroup/kubepods/pod1")

	v := reflect.ValueOf(pod)
	for i := range v.NumField() {
		if v.Field(i).IsZero() {
			t.Errorf("datapath.Pod.%s left zero", v.Type().Field(i).Name)
		}
	}
	// Field by field, by name, so the mapping cannot be crossed.
	sv := reflect.ValueOf(s)
	for i := range sv.NumField() {
		name := sv.Type().Field(i).Name
		if !reflect.DeepEqual(sv.Field(i).Interface(), v.FieldByName(name).Interface()) {
			t.Errorf("Pod().%s = %v, want %v", name, v.FieldByName(name), sv.Field(i))
		}
	}
	if pod.NetnsCookie != 42 || !slices.Equal(pod.IPs, []netip.Addr{ip4, ip6}) {
		t.Errorf("identity: cookie %d ips %v", pod.NetnsCookie, pod.IPs)
	}

	// The pod is the caller's to keep: no slice shared with s or ips.
	pod.InboundInclude[0] = 99
	pod.OutboundIncludeCIDRs[0] = netip.MustParsePrefix("192.168.0.0/16")
	pod.IPs[0] = netip.MustParseAddr("10.9.9.9")
	if s.InboundInclude[0] != 5 || s.OutboundIncludeCIDRs[0] != netip.MustParsePrefix("10.0.0.0/8") || ips[1] != ip4 {
		t.Fatal("Pod() shares slices with its inputs")
	}
}

// TestIstioDNSCapture: ISTIO_META_DNS_CAPTURE in the pod's ProxyConfig
// annotation, YAML or JSON, turns DNS capture on with the profile's DNS
// proxy port; anything but "true"/"false" is an error naming the annotation.
func TestIstioDNSCapture(t *testing.T) {
	cases := []struct {
		value   string
		capture bool
		err     string
	}{
		{"", false, ""},
		{"proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n", true, ""},
		{`{"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true","OTHER":"x"},"holdApplicationUntilProxyStarts":true}`, true, ""},
		{"proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n", false, ""},
		{"concurrency: 2\n", false, ""},
		{"proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"yes\"\n", false, "ISTIO_META_DNS_CAPTURE"},
		{"proxyMetadata: [1, 2", false, "proxy.istio.io/config"},
	}
	for _, c := range cases {
		ann := map[string]string{Istio.Marker: "{}"}
		if c.value != "" {
			ann["proxy.istio.io/config"] = c.value
		}
		d, err := Decide(ann, Istio)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: error %v, want one naming %s", c.value, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", c.value, err)
			continue
		}
		pod := d.Settings.Pod(1, nil, datapath.PodInterface{}, "")
		if pod.DNSCapture != c.capture || (c.capture && pod.DNSPort != 15053) {
			t.Errorf("%q: capture %v port %d, want %v", c.value, pod.DNSCapture, pod.DNSPort, c.capture)
		}
	}
	// Linkerd has no DNS proxy: its pods never capture DNS.
	d, err := Decide(map[string]string{Linkerd.Marker: "x", "proxy.istio.io/config": "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}"}, Istio)
	if err != nil || d.Settings.DNSCapture {
		t.Fatalf("linkerd pod: %v %+v", err, d.Settings)
	}
}
