package agent

import (
	"bytes"
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/meshlane/meshlane/daemon/api"
)

// FuzzDecodePodEvent feeds arbitrary bodies to the request decoder and
// the ADD validation. Neither may panic, and an event they accept must
// survive a JSON round trip unchanged and still be accepted, with one
// parsed address per reported IP.
func FuzzDecodePodEvent(f *testing.F) {
	f.Add([]byte(`{"containerID":"abc","netns":"/var/run/netns/cni-1","ifName":"eth0","ips":["10.0.0.1/24"]}`))
	f.Add([]byte(`{"containerID":"a","netns":"/n","ifName":"eth0","ips":["fd00::1","::ffff:10.0.0.1"],"annotations":{"sidecar.istio.io/status":"{}"}}`))
	f.Add([]byte(`{"containerID":"a"} trailing`))
	f.Add([]byte(`{"containerID":7}`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, body []byte) {
		ev, err := DecodePodEvent(bytes.NewReader(body))
		if err != nil {
			if !strings.Contains(err.Error(), "JSON") && !strings.Contains(err.Error(), "empty request body") {
				t.Fatalf("decode error does not say what was wrong: %v", err)
			}
			return
		}
		ips, err := validateAdd(ev)
		if err != nil {
			return
		}
		if len(ips) != len(ev.IPs) || len(ips) == 0 {
			t.Fatalf("%d addresses parsed from %d reported", len(ips), len(ev.IPs))
		}
		for _, ip := range ips {
			if !ip.IsValid() || ip.Zone() != "" || ip.Is4In6() {
				t.Fatalf("accepted address %v", ip)
			}
		}
		data, err := json.Marshal(ev)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		again, err := DecodePodEvent(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("decode of re-encoded %s: %v", data, err)
		}
		if !sameEvent(ev, again) {
			t.Fatalf("round trip changed the event:\n%+v\n%+v", ev, again)
		}
		if _, err := validateAdd(again); err != nil {
			t.Fatalf("re-decoded event rejected: %v", err)
		}
	})
}

// sameEvent compares events treating empty and absent lists and maps as
// equal, as the wire format does (omitempty).
func sameEvent(a, b api.PodEvent) bool {
	return a.ContainerID == b.ContainerID && a.Netns == b.Netns && a.IfName == b.IfName &&
		a.PodName == b.PodName && a.PodNamespace == b.PodNamespace && a.PodUID == b.PodUID &&
		a.InfraContainerID == b.InfraContainerID && slices.Equal(a.IPs, b.IPs) &&
		maps.Equal(a.Annotations, b.Annotations)
}
