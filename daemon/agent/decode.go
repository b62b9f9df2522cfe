package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/meshlane/meshlane/daemon/api"
)

// maxContainerIDLen bounds a container id; runtimes use 64 hex digits. The
// id names the pod's state file, <id>.json, and a file name on Linux is at
// most 255 bytes: a longer id would be accepted and then fail at the write.
const maxContainerIDLen = 255 - len(podFileExt)

// DecodePodEvent reads exactly one JSON PodEvent from r. Unknown fields
// are ignored so that a newer plugin can talk to an older agent; trailing
// data after the object is an error. It does not validate the event: see
// validateAdd and validateID.
func DecodePodEvent(r io.Reader) (api.PodEvent, error) {
	var ev api.PodEvent
	if err := decodeJSON(r, &ev); err != nil {
		return api.PodEvent{}, err
	}
	return ev, nil
}

// decodeJSON decodes one JSON value into v and rejects anything after it.
func decodeJSON(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("empty request body: send a JSON object")
		}
		return fmt.Errorf("malformed JSON request: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("malformed JSON request: data after the JSON object")
	}
	return nil
}

// validateID checks a container id as the CNI spec defines it: starts
// with an alphanumeric, then alphanumerics, '_', '.' and '-'.
func validateID(id string) error {
	if id == "" {
		return errors.New("containerID is empty")
	}
	if len(id) > maxContainerIDLen {
		return fmt.Errorf("containerID is %d bytes long, at most %d allowed", len(id), maxContainerIDLen)
	}
	for i, c := range id {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if alnum || i > 0 && (c == '_' || c == '.' || c == '-') {
			continue
		}
		return fmt.Errorf("containerID %q has invalid character %q at %d (CNI allows [A-Za-z0-9][A-Za-z0-9_.-]*)", id, c, i)
	}
	return nil
}

// validateAdd checks what ADD needs and returns the pod's addresses. An IP
// may be bare ("10.1.2.3") or in CNI result form ("10.1.2.3/24"); every
// one must parse, since a bad one means a broken plugin, not a pod to
// guess about.
func validateAdd(ev api.PodEvent) ([]netip.Addr, error) {
	if err := validateID(ev.ContainerID); err != nil {
		return nil, err
	}
	if ev.Netns == "" {
		return nil, errors.New("netns is empty: ADD needs the pod's network namespace path (CNI_NETNS)")
	}
	if !filepath.IsAbs(ev.Netns) {
		return nil, fmt.Errorf("netns %q is not an absolute path", ev.Netns)
	}
	if ev.IfName == "" {
		return nil, errors.New("ifName is empty: ADD needs the interface name (CNI_IFNAME)")
	}
	if len(ev.IPs) == 0 {
		return nil, errors.New("ips is empty: ADD needs the pod's addresses from prevResult; is meshlane chained after the main plugin?")
	}
	ips := make([]netip.Addr, 0, len(ev.IPs))
	for _, s := range ev.IPs {
		ip, err := parseIP(s)
		if err != nil {
			return nil, err
		}
		ips = append(ips, ip)
	}
	return ips, nil
}

// parseIP accepts "addr" or "addr/len" and rejects zones and unspecified
// addresses, which cannot be a pod's address.
func parseIP(s string) (netip.Addr, error) {
	var ip netip.Addr
	var err error
	if strings.Contains(s, "/") {
		var p netip.Prefix
		p, err = netip.ParsePrefix(s)
		ip = p.Addr()
	} else {
		ip, err = netip.ParseAddr(s)
	}
	if err != nil {
		return netip.Addr{}, fmt.Errorf("ips: %q is not an IP address: %v", s, err)
	}
	if ip.Zone() != "" || ip.IsUnspecified() {
		return netip.Addr{}, fmt.Errorf("ips: %q cannot be a pod address", s)
	}
	return ip.Unmap(), nil
}
