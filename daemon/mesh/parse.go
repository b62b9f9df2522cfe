package mesh

import (
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The parsers below read the comma-separated lists the meshes put in pod
// annotations. Both meshes tolerate blanks around items and empty items, so
// do we; anything else that is not a valid item is an error naming the
// annotation and the item, never skipped: a silently dropped exclusion
// would redirect traffic the user asked us to leave alone. There is no cap
// on the number of items, and results are sorted and deduplicated so that
// the same annotations always give the same maps.

// portSyntax says what a port-list annotation accepts, mirroring what its
// mesh accepts.
type portSyntax struct {
	// wildcard: the whole value may be "*", meaning every port
	// (Istio's includeInboundPorts).
	wildcard bool
	// ranges: items may be "a-b" ranges (Linkerd); Istio's lists take
	// single numbers only.
	ranges bool
}

// portList is a parsed port-list annotation.
type portList struct {
	all   bool     // the value was "*"
	ports []uint16 // sorted, unique, never 0; nil when all or empty
}

// parsePorts parses value, the content of annotation name.
func parsePorts(name, value string, syn portSyntax) (portList, error) {
	items := splitList(value)
	if slices.Contains(items, "*") {
		if err := wildcardAlone(name, items, syn.wildcard); err != nil {
			return portList{}, err
		}
		return portList{all: true}, nil
	}
	// A set of all 65535 ports is an 8 KiB bitmap, which also bounds the
	// work: overlapping or repeated ranges cost nothing extra, and no
	// input can expand past 65535 ports because every bound is checked.
	var set [1 << 16 / 64]uint64
	for _, item := range items {
		lo, hi, err := parsePortItem(name, item, syn.ranges)
		if err != nil {
			return portList{}, err
		}
		for p := uint32(lo); p <= uint32(hi); p++ {
			set[p/64] |= 1 << (p % 64)
		}
	}
	var out []uint16
	for w, word := range set {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			out = append(out, uint16(w*64+b))
			word &= word - 1
		}
	}
	return portList{ports: out}, nil
}

// parsePortItem parses one item of a port list into an inclusive range.
func parsePortItem(name, item string, ranges bool) (lo, hi uint16, err error) {
	want := "want 1-65535"
	if ranges {
		want = "want 1-65535 or a range a-b"
	} else if strings.Contains(item, "-") {
		want = "want 1-65535; this annotation takes no ranges, list each port"
	}
	bad := fmt.Errorf("annotation %s: %q is not a port (%s)", name, item, want)

	first, last, isRange := strings.Cut(item, "-")
	if !ranges && isRange {
		return 0, 0, bad
	}
	lo, ok := parsePort(first)
	if !ok {
		return 0, 0, bad
	}
	if !isRange {
		return lo, lo, nil
	}
	hi, ok = parsePort(last)
	if !ok {
		return 0, 0, bad
	}
	if hi < lo {
		return 0, 0, fmt.Errorf("annotation %s: %q is a reversed range (want low-high, e.g. %d-%d)", name, item, hi, lo)
	}
	return lo, hi, nil
}

// parsePort parses a decimal port number in 1-65535. Port 0 is refused:
// no connection has it, so listing it is a typo.
func parsePort(s string) (uint16, bool) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, false
	}
	return uint16(n), true
}

// cidrList is a parsed CIDR-list annotation.
type cidrList struct {
	all      bool           // the value was "*"
	prefixes []netip.Prefix // masked, sorted, unique; nil when all or empty
}

// parseCIDRs parses value, the content of annotation name: IPv4 and IPv6
// CIDRs, and "*" alone when wildcard is set (Istio's
// includeOutboundIPRanges).
func parseCIDRs(name, value string, wildcard bool) (cidrList, error) {
	items := splitList(value)
	if slices.Contains(items, "*") {
		if err := wildcardAlone(name, items, wildcard); err != nil {
			return cidrList{}, err
		}
		return cidrList{all: true}, nil
	}
	var out []netip.Prefix
	for _, item := range items {
		p, err := netip.ParsePrefix(item)
		if err != nil {
			// A bare address is the most likely slip; say how to fix it.
			if a, aerr := netip.ParseAddr(item); aerr == nil && a.Zone() == "" {
				return cidrList{}, fmt.Errorf("annotation %s: %q is an address, not a CIDR (write %s/%d)",
					name, item, a, a.BitLen())
			}
			return cidrList{}, fmt.Errorf("annotation %s: %q is not a CIDR (want e.g. 10.0.0.0/8 or fd00::/8)", name, item)
		}
		// Host bits set ("10.1.2.3/8") are accepted and dropped, as the
		// meshes' own iptables setup does.
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, netip.Prefix.Compare)
	return cidrList{prefixes: slices.Compact(out)}, nil
}

// splitList splits a comma-separated annotation value into its items,
// trimming blanks and dropping empty items.
func splitList(value string) []string {
	var items []string
	for item := range strings.SplitSeq(value, ",") {
		if item = strings.TrimSpace(item); item != "" {
			items = append(items, item)
		}
	}
	return items
}

// wildcardAlone checks a list that contains "*": the annotation must take
// the wildcard, and it must be the whole value, as the meshes require
// ("*,80" is rejected by Istio's injector too).
func wildcardAlone(name string, items []string, allowed bool) error {
	if !allowed {
		return fmt.Errorf("annotation %s: %q is not accepted here (only include annotations take it; list the items instead)", name, "*")
	}
	if len(items) > 1 {
		return fmt.Errorf("annotation %s: %q must be the whole value, not one item of a list (%q)", name, "*", strings.Join(items, ","))
	}
	return nil
}

// parseStatusPort parses Istio's status.sidecar.istio.io/port: one port,
// where 0 means the sidecar serves no status port (Istio allows that).
// It returns ok=false when there is no port to keep clear.
func parseStatusPort(name, value string) (port uint16, ok bool, err error) {
	v := strings.TrimSpace(value)
	if v == "" {
		return 0, false, nil
	}
	n, perr := strconv.ParseUint(v, 10, 16)
	if perr != nil {
		return 0, false, fmt.Errorf("annotation %s: %q is not a port (want 1-65535, or 0 for no status port)", name, value)
	}
	return uint16(n), n != 0, nil
}

// parseID parses a user or group id annotation (Linkerd's proxy-uid and
// proxy-gid). An empty value means unset, as Linkerd treats it.
// 4294967295 is refused: it is (uid_t)-1, which the kernel reads as
// "no id" and no process runs as.
func parseID(name, value string) (id uint32, ok bool, err error) {
	v := strings.TrimSpace(value)
	if v == "" {
		return 0, false, nil
	}
	n, perr := strconv.ParseUint(v, 10, 32)
	if perr != nil || n == 1<<32-1 {
		return 0, false, fmt.Errorf("annotation %s: %q is not a user/group id (want 0-4294967294)", name, value)
	}
	return uint32(n), true, nil
}
