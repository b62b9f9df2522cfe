// Package mesh knows the service meshes meshlane redirects for (Istio and
// Linkerd): their fixed ports and proxy identity (profiles), how to tell
// from a pod's annotations whether the pod carries a sidecar (Decide), and
// how to turn the pod's per-pod traffic annotations into the settings the
// datapath enforces (Settings.Pod).
//
// Everything here is plain data read at load time: the agent picks a profile
// from its configuration and writes the resulting datapath.Pod into maps, so
// changing a port never means recompiling the eBPF programs.
package mesh

import (
	"fmt"
	"net/netip"
	"slices"
)

// Profile is what is fixed for one mesh: where its sidecar listens, which
// identity its proxy runs as and which annotations it uses.
type Profile struct {
	// Name is the mesh's name, as used in configuration ("istio", "linkerd").
	// It also selects which annotation dialect Decide reads.
	Name string

	// ProxyUID and ProxyGID are the defaults the proxy runs as; Linkerd
	// pods may override them by annotation.
	ProxyUID uint32
	ProxyGID uint32

	// OutboundPort and InboundPort are the sidecar's redirect listeners.
	OutboundPort uint16
	InboundPort  uint16

	// ProxyPorts are the sidecar's own ports, never intercepted inbound:
	// redirecting them to the inbound listener would loop the proxy's admin,
	// health and metrics traffic back into itself.
	ProxyPorts []uint16

	// Marker is the annotation the mesh's injector writes on every pod it
	// injected; its presence is what makes a pod meshed.
	Marker string

	// ReadyPort is the sidecar listener whose appearance shows the sidecar
	// is up, for pods whose annotations the runtime did not pass.
	ReadyPort uint16

	// DNSPort is the sidecar's DNS proxy on loopback, where DNS goes when
	// a pod asks for DNS capture; 0 when the mesh has none.
	DNSPort uint16

	// ProxyLoopbackInbound: the proxy's connections to a loopback address
	// other than 127.0.0.1/::1 go to its inbound listener (istio-iptables
	// behaviour, which Istio's validation init container checks).
	ProxyLoopbackInbound bool

	// OptOutAnnotation and OptOutValue are the mesh's explicit "do not inject"
	// annotation; they only serve to explain a NotMeshed decision.
	OptOutAnnotation string
	OptOutValue      string

	// LoopbackAddrs6 are addresses the mesh's init container puts on lo of
	// IPv6 pods, which the agent adds in its place.
	LoopbackAddrs6 []netip.Prefix
}

// Istio is the Istio sidecar profile (Envoy run by pilot-agent).
var Istio = Profile{
	Name:         "istio",
	ProxyUID:     1337,
	ProxyGID:     1337,
	OutboundPort: 15001,
	InboundPort:  15006,
	// 15000 Envoy admin, 15001 outbound, 15004 debug, 15006 inbound,
	// 15008 HBONE tunnel, 15020 merged metrics/status, 15021 health,
	// 15053 DNS proxy, 15090 Envoy metrics.
	ProxyPorts:       []uint16{15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090},
	Marker:           "sidecar.istio.io/status",
	ReadyPort:        15001,
	OptOutAnnotation: "sidecar.istio.io/inject",
	OptOutValue:      "false",
	// Envoy connects to the app from ::6 for IPv6 inbound passthrough
	// (127.0.0.6 needs nothing: all of 127/8 is on lo).
	LoopbackAddrs6: []netip.Prefix{netip.MustParsePrefix("::6/128")},
	DNSPort:        15053,
	// istio-validation dials 127.0.0.6:15002 as the proxy user and expects
	// its 127.0.0.1:15006 listener to answer.
	ProxyLoopbackInbound: true,
}

// Linkerd is the Linkerd2 proxy profile.
var Linkerd = Profile{
	Name:         "linkerd",
	ProxyUID:     2102,
	ProxyGID:     2102,
	OutboundPort: 4140,
	InboundPort:  4143,
	// 4140 outbound, 4143 inbound, 4190 tap/control, 4191 admin.
	ProxyPorts:       []uint16{4140, 4143, 4190, 4191},
	Marker:           "linkerd.io/proxy-version",
	ReadyPort:        4140,
	OptOutAnnotation: "linkerd.io/inject",
	OptOutValue:      "disabled",
}

// builtin lists the profiles in the order Decide looks for their markers.
var builtin = []*Profile{&Istio, &Linkerd}

// ProfileByName returns a copy of the named built-in profile, so a caller
// may adjust it (say, a site-specific proxy uid) without touching the
// package's own.
func ProfileByName(name string) (Profile, error) {
	for _, p := range builtin {
		if p.Name == name {
			return p.clone(), nil
		}
	}
	return Profile{}, fmt.Errorf("unknown mesh profile %q: want %s", name, profileNames())
}

// clone copies p deeply enough that no slice is shared with the original.
func (p Profile) clone() Profile {
	p.ProxyPorts = slices.Clone(p.ProxyPorts)
	p.LoopbackAddrs6 = slices.Clone(p.LoopbackAddrs6)
	return p
}

// validate rejects a profile the datapath could not use; it catches a
// hand-built or mis-adjusted profile at start rather than on the first pod.
func (p Profile) validate() error {
	if _, ok := readers[p.Name]; !ok {
		return fmt.Errorf("mesh profile %q: unknown mesh name: want %s", p.Name, profileNames())
	}
	if p.OutboundPort == 0 || p.InboundPort == 0 || p.ReadyPort == 0 {
		return fmt.Errorf("mesh profile %q: outbound (%d), inbound (%d) and ready (%d) ports must all be set",
			p.Name, p.OutboundPort, p.InboundPort, p.ReadyPort)
	}
	if p.Marker == "" {
		return fmt.Errorf("mesh profile %q: marker annotation must be set", p.Name)
	}
	return nil
}

// profileNames lists the built-in names for error messages.
func profileNames() string {
	s := ""
	for i, p := range builtin {
		if i > 0 {
			s += " or "
		}
		s += fmt.Sprintf("%q", p.Name)
	}
	return s
}
