package mesh

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/meshlane/meshlane/daemon/datapath"
)

// Membership is whether a pod's traffic goes through a sidecar.
type Membership int

const (
	// Unknown: the runtime passed no annotations at all (the plugin entry
	// lacks the pod-annotations capability, or an old runtime). The caller
	// waits for the default profile's ready listener to appear in the pod
	// before redirecting, instead of guessing.
	Unknown Membership = iota
	// NotMeshed: annotations were passed and carry no mesh's marker; the
	// pod has no sidecar and its traffic is left alone.
	NotMeshed
	// Meshed: a mesh's marker annotation is present.
	Meshed
)

// String returns the name used in logs and status output.
func (m Membership) String() string {
	switch m {
	case Unknown:
		return "unknown"
	case NotMeshed:
		return "not-meshed"
	case Meshed:
		return "meshed"
	}
	return fmt.Sprintf("Membership(%d)", int(m))
}

// Decision is what Decide concluded about one pod.
type Decision struct {
	Membership Membership
	// Profile is the mesh whose marker is present (Meshed) or the default
	// profile (Unknown); zero for NotMeshed.
	Profile Profile
	// Reason explains the decision to a human, e.g.
	// "annotation sidecar.istio.io/status present".
	Reason string
	// Settings are the pod's datapath settings: from its annotations when
	// Meshed, the profile's defaults when Unknown, zero when NotMeshed.
	Settings Settings
}

// Settings are one pod's redirect settings: datapath.Pod without the
// identity of the pod (netns cookie and addresses), which comes from the
// CNI report rather than the annotations. Field meanings are those of
// datapath.Pod. Lists are sorted and unique.
type Settings struct {
	ProxyUID     uint32
	ProxyGID     uint32
	OutboundPort uint16
	InboundPort  uint16

	InboundAll     bool
	InboundInclude []uint16
	InboundExclude []uint16

	OutboundExcludePorts []uint16
	OutboundIncludePorts []uint16
	OutboundAllCIDRs     bool
	OutboundIncludeCIDRs []netip.Prefix
	OutboundExcludeCIDRs []netip.Prefix

	DNSCapture bool
	DNSPort    uint16

	ProxyLoopbackInbound bool
}

// Pod returns the datapath's view of the pod with network namespace cookie,
// addresses ips and interface ifc (where its inbound tc program goes; the
// zero value for none) and cgroup (where its cgroup programs go in pod
// scope; "" in node scope). It copies every slice, so the result may be kept
// and changed independently of s and ips; ips are sorted and deduplicated.
func (s Settings) Pod(cookie uint64, ips []netip.Addr, ifc datapath.PodInterface, cgroup string) datapath.Pod {
	addrs := slices.Clone(ips)
	slices.SortFunc(addrs, netip.Addr.Compare)
	return datapath.Pod{
		NetnsCookie:          cookie,
		IPs:                  slices.Compact(addrs),
		Interface:            ifc,
		Cgroup:               cgroup,
		ProxyUID:             s.ProxyUID,
		ProxyGID:             s.ProxyGID,
		OutboundPort:         s.OutboundPort,
		InboundPort:          s.InboundPort,
		InboundAll:           s.InboundAll,
		InboundInclude:       slices.Clone(s.InboundInclude),
		InboundExclude:       slices.Clone(s.InboundExclude),
		OutboundExcludePorts: slices.Clone(s.OutboundExcludePorts),
		OutboundIncludePorts: slices.Clone(s.OutboundIncludePorts),
		OutboundAllCIDRs:     s.OutboundAllCIDRs,
		OutboundIncludeCIDRs: slices.Clone(s.OutboundIncludeCIDRs),
		OutboundExcludeCIDRs: slices.Clone(s.OutboundExcludeCIDRs),
		DNSCapture:           s.DNSCapture,
		DNSPort:              s.DNSPort,
		ProxyLoopbackInbound: s.ProxyLoopbackInbound,
	}
}

// Decide tells from a pod's annotations whether the pod is meshed, by which
// mesh, and with which settings. ann is nil when the runtime passed no
// annotations (Unknown); an empty non-nil map is a pod without annotations
// (NotMeshed).
//
// defaultProfile is the agent's configured mesh. It is the profile of an
// Unknown pod, and it replaces the built-in profile of the same name for
// Meshed pods, so a site's adjusted profile applies to every pod of that
// mesh. It must be one of the built-in meshes, possibly adjusted.
//
// A malformed traffic annotation on a meshed pod is an error naming the
// annotation and the bad item: redirecting with a guessed setting could
// capture traffic the user excluded. On that error the Decision still
// carries the Membership, Profile and Reason found, but no Settings.
func Decide(ann map[string]string, defaultProfile Profile) (Decision, error) {
	if err := defaultProfile.validate(); err != nil {
		return Decision{}, err
	}
	if ann == nil {
		p := defaultProfile.clone()
		s, err := settingsFor(p, nil)
		if err != nil {
			return Decision{}, err
		}
		return Decision{
			Membership: Unknown,
			Profile:    p,
			Reason: fmt.Sprintf("runtime passed no pod annotations: treat the pod as meshed once the %s sidecar listens on port %d",
				p.Name, p.ReadyPort),
			Settings: s,
		}, nil
	}

	profiles := candidates(defaultProfile)
	var found []Profile
	for _, p := range profiles {
		if _, ok := ann[p.Marker]; ok {
			found = append(found, p)
		}
	}
	if len(found) == 0 {
		return Decision{Membership: NotMeshed, Reason: notMeshedReason(ann, profiles)}, nil
	}
	if len(found) > 1 {
		return Decision{}, fmt.Errorf("pod carries the markers of two meshes (annotations %s and %s): remove one mesh's sidecar",
			found[0].Marker, found[1].Marker)
	}

	p := found[0]
	d := Decision{
		Membership: Meshed,
		Profile:    p,
		Reason:     fmt.Sprintf("annotation %s present", p.Marker),
	}
	s, err := settingsFor(p, ann)
	if err != nil {
		return d, fmt.Errorf("%s pod: %w", p.Name, err)
	}
	d.Settings = s
	return d, nil
}

// notMeshedReason explains a NotMeshed decision, naming an explicit opt-out
// when there is one so that a user who expected a sidecar sees why.
func notMeshedReason(ann map[string]string, profiles []Profile) string {
	markers := ""
	for _, p := range profiles {
		if p.OptOutAnnotation != "" && ann[p.OptOutAnnotation] == p.OptOutValue {
			return fmt.Sprintf("annotation %s=%q opts the pod out and no %s is present",
				p.OptOutAnnotation, p.OptOutValue, p.Marker)
		}
		if markers != "" {
			markers += " or "
		}
		markers += p.Marker
	}
	return fmt.Sprintf("no %s annotation: the pod has no sidecar", markers)
}

// candidates returns copies of the built-in profiles, with def in place of
// the one of the same name.
func candidates(def Profile) []Profile {
	out := make([]Profile, len(builtin))
	for i, b := range builtin {
		if b.Name == def.Name {
			out[i] = def.clone()
		} else {
			out[i] = b.clone()
		}
	}
	return out
}

// readers holds each built-in mesh's annotation reader, by profile name;
// Profile.validate refuses a name without one.
var readers = map[string]func(s *Settings, p Profile, ann map[string]string) error{
	Istio.Name:   istioSettings,
	Linkerd.Name: linkerdSettings,
}

// settingsFor reads p's mesh's per-pod annotations; ann may be nil, giving
// the profile's defaults. p must have passed validate.
func settingsFor(p Profile, ann map[string]string) (Settings, error) {
	s := Settings{
		ProxyUID:     p.ProxyUID,
		ProxyGID:     p.ProxyGID,
		OutboundPort: p.OutboundPort,
		InboundPort:  p.InboundPort,

		ProxyLoopbackInbound: p.ProxyLoopbackInbound,
	}
	if err := readers[p.Name](&s, p, ann); err != nil {
		return Settings{}, err
	}
	return s, nil
}

// Istio's per-pod traffic annotations.
const (
	istioIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	istioExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	istioIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
	istioExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	istioIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	istioExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	istioStatusPort              = "status.sidecar.istio.io/port"
	// istioProxyConfig holds a ProxyConfig (YAML or JSON); its
	// proxyMetadata ISTIO_META_DNS_CAPTURE="true" turns DNS capture on.
	istioProxyConfig = "proxy.istio.io/config"
)

// istioSettings applies Istio's annotations. Absent includes default to
// "*" (everything); a present but empty include means nothing, as in Istio.
// The proxy uid has no annotation in Istio: it stays the profile's.
func istioSettings(s *Settings, p Profile, ann map[string]string) error {
	inInc, err := parsePorts(istioIncludeInboundPorts, valueOr(ann, istioIncludeInboundPorts, "*"), portSyntax{wildcard: true})
	if err != nil {
		return err
	}
	inExc, err := parsePorts(istioExcludeInboundPorts, ann[istioExcludeInboundPorts], portSyntax{})
	if err != nil {
		return err
	}
	statusPort, hasStatus, err := parseStatusPort(istioStatusPort, ann[istioStatusPort])
	if err != nil {
		return err
	}
	outInc, err := parsePorts(istioIncludeOutboundPorts, ann[istioIncludeOutboundPorts], portSyntax{})
	if err != nil {
		return err
	}
	outExc, err := parsePorts(istioExcludeOutboundPorts, ann[istioExcludeOutboundPorts], portSyntax{})
	if err != nil {
		return err
	}
	cidrInc, err := parseCIDRs(istioIncludeOutboundIPRanges, valueOr(ann, istioIncludeOutboundIPRanges, "*"), true)
	if err != nil {
		return err
	}
	cidrExc, err := parseCIDRs(istioExcludeOutboundIPRanges, ann[istioExcludeOutboundIPRanges], false)
	if err != nil {
		return err
	}

	s.InboundAll = inInc.all
	s.InboundInclude = inInc.ports
	// The status port is served by the sidecar's agent and probed by the
	// kubelet: capturing it would send health checks into Envoy.
	var status []uint16
	if hasStatus {
		status = []uint16{statusPort}
	}
	s.InboundExclude = mergePorts(p.ProxyPorts, inExc.ports, status)
	s.OutboundIncludePorts = outInc.ports
	s.OutboundExcludePorts = outExc.ports
	s.OutboundAllCIDRs = cidrInc.all
	s.OutboundIncludeCIDRs = cidrInc.prefixes
	s.OutboundExcludeCIDRs = cidrExc.prefixes
	capture, err := parseDNSCapture(ann[istioProxyConfig])
	if err != nil {
		return err
	}
	if capture && p.DNSPort != 0 {
		s.DNSCapture, s.DNSPort = true, p.DNSPort
	}
	return nil
}

// parseDNSCapture reads ISTIO_META_DNS_CAPTURE from the proxyMetadata of a
// proxy.istio.io/config annotation; every other field of the ProxyConfig
// is the proxy's business.
func parseDNSCapture(value string) (bool, error) {
	if strings.TrimSpace(value) == "" {
		return false, nil
	}
	var pc struct {
		ProxyMetadata map[string]string `json:"proxyMetadata"`
	}
	if err := yaml.Unmarshal([]byte(value), &pc); err != nil {
		return false, fmt.Errorf("annotation %s: not a ProxyConfig (YAML or JSON): %v", istioProxyConfig, err)
	}
	switch v := pc.ProxyMetadata["ISTIO_META_DNS_CAPTURE"]; v {
	case "", "false":
		return false, nil
	case "true":
		return true, nil
	default:
		return false, fmt.Errorf("annotation %s: proxyMetadata.ISTIO_META_DNS_CAPTURE %q (want \"true\" or \"false\")", istioProxyConfig, v)
	}
}

// Linkerd's per-pod traffic annotations.
const (
	linkerdSkipInboundPorts  = "config.linkerd.io/skip-inbound-ports"
	linkerdSkipOutboundPorts = "config.linkerd.io/skip-outbound-ports"
	linkerdSkipSubnets       = "config.linkerd.io/skip-subnets"
	linkerdProxyUID          = "config.linkerd.io/proxy-uid"
	linkerdProxyGID          = "config.linkerd.io/proxy-gid"
)

// linkerdSettings applies Linkerd's annotations. Linkerd redirects every
// inbound port and every outbound address except what is skipped; its
// port lists accept ranges.
func linkerdSettings(s *Settings, p Profile, ann map[string]string) error {
	inSkip, err := parsePorts(linkerdSkipInboundPorts, ann[linkerdSkipInboundPorts], portSyntax{ranges: true})
	if err != nil {
		return err
	}
	outSkip, err := parsePorts(linkerdSkipOutboundPorts, ann[linkerdSkipOutboundPorts], portSyntax{ranges: true})
	if err != nil {
		return err
	}
	subnets, err := parseCIDRs(linkerdSkipSubnets, ann[linkerdSkipSubnets], false)
	if err != nil {
		return err
	}
	uid, hasUID, err := parseID(linkerdProxyUID, ann[linkerdProxyUID])
	if err != nil {
		return err
	}
	gid, hasGID, err := parseID(linkerdProxyGID, ann[linkerdProxyGID])
	if err != nil {
		return err
	}

	if hasUID {
		s.ProxyUID = uid
	}
	if hasGID {
		s.ProxyGID = gid
	}
	s.InboundAll = true
	s.InboundExclude = mergePorts(p.ProxyPorts, inSkip.ports)
	s.OutboundExcludePorts = outSkip.ports
	s.OutboundAllCIDRs = true
	s.OutboundExcludeCIDRs = subnets.prefixes
	return nil
}

// valueOr returns ann[key], or def when the annotation is absent (not when
// it is present and empty: for Istio's includes "" means "nothing").
func valueOr(ann map[string]string, key, def string) string {
	if v, ok := ann[key]; ok {
		return v
	}
	return def
}

// mergePorts returns the sorted union of lists, nil when empty.
func mergePorts(lists ...[]uint16) []uint16 {
	out := slices.Concat(lists...)
	slices.Sort(out)
	return slices.Compact(out)
}
