package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/podns"
)

// What to do about an entry the agent wrote that is missing or wrong. A
// restarting agent re-applies every meshed pod it holds (UpsertPod rewrites
// the entries and removes the pod's stale ones), so a restart repairs it.
const fixRestart = "restart meshlane-agent on this node: at start it rewrites every meshed pod's datapath entries " +
	"(kubectl -n meshlane-system delete pod <the meshlane-agent pod on this node>)"

// Entries for a pod the agent never wrote any for are not its own: only a
// new network namespace (a new cookie) gets rid of them for sure.
const fixForeign = "these entries were not written by the agent: recreate the pod (a new sandbox gets a new netns cookie) " +
	"and report it with the output of `meshlanectl check <pod> -o json`"

// checker collects the checks of one report.
type checker struct{ items []api.CheckItem }

func (c *checker) pass(name, detail string) {
	c.items = append(c.items, api.CheckItem{Name: name, OK: true, Detail: detail})
}

func (c *checker) fail(name, detail, fix string) {
	c.items = append(c.items, api.CheckItem{Name: name, Detail: detail, Fix: fix})
}

// SelfCheck tests the datapath entries of the pod q names against what the
// agent decided for it: its network namespace still the one it was added
// with, and for a meshed pod its settings, IPs, port and CIDR rules in the
// maps exactly as computed; for any other pod, no entries at all. Every
// failed check says what to do.
func (a *Agent) SelfCheck(q string) (api.CheckReport, error) {
	if a.view == nil {
		return api.CheckReport{}, errNoView
	}
	rec, err := a.FindPod(q)
	if err != nil {
		return api.CheckReport{}, err
	}
	rep := api.CheckReport{
		Pod:         displayName(rec),
		ContainerID: rec.Event.ContainerID,
		NetnsCookie: rec.NetnsCookie,
		State:       rec.State,
		Reason:      rec.Reason,
	}
	var c checker
	checkNetns(&c, rec)
	if rec.State == api.StateMeshed && rec.Pod != nil {
		a.checkMeshed(&c, rec)
	} else {
		c.pass("state", fmt.Sprintf("%s: %s", rec.State, rec.Reason))
		a.checkNothingWritten(&c, rec)
	}
	rep.Checks = c.items
	rep.OK = !slices.ContainsFunc(c.items, func(i api.CheckItem) bool { return !i.OK })
	return rep, nil
}

func checkNetns(c *checker, rec PodRecord) {
	const name = "network namespace"
	cookie, err := podns.NetnsCookie(rec.Event.Netns)
	switch {
	case errors.Is(err, podns.ErrGone):
		c.fail(name, fmt.Sprintf("%s is gone: the pod was removed without a CNI DEL", rec.Event.Netns),
			"nothing to repair: the agent's background GC drops the pod and its entries within its --gc-interval")
	case err != nil:
		c.fail(name, fmt.Sprintf("cannot read the netns cookie of %s: %v", rec.Event.Netns, err),
			"check that the agent runs privileged with the host's /var/run/netns (or the runtime's netns directory) mounted")
	case cookie != rec.NetnsCookie:
		c.fail(name, fmt.Sprintf("%s now names another network namespace (cookie %d, added with %d): the sandbox was recreated without a DEL",
			rec.Event.Netns, cookie, rec.NetnsCookie),
			"nothing to repair: the background GC drops the stale pod; the runtime's next ADD adds the new sandbox")
	default:
		c.pass(name, fmt.Sprintf("%s, netns cookie %d", rec.Event.Netns, cookie))
	}
}

// checkMeshed compares the maps with the pod the agent wrote.
func (a *Agent) checkMeshed(c *checker, rec PodRecord) {
	want := *rec.Pod
	got, found, err := a.view.ReadPod(rec.NetnsCookie)
	if err != nil {
		c.fail("datapath maps", err.Error(), "check the agent's log: the pinned maps must be readable")
		return
	}
	if !found {
		c.fail("meshlane_pods", fmt.Sprintf("no entry for netns cookie %d: the pod's connections are not redirected to its sidecar", rec.NetnsCookie), fixRestart)
	} else if diffs := settingsDiff(want, got); len(diffs) > 0 {
		c.fail("meshlane_pods", "entry differs from what the agent computed: "+strings.Join(diffs, "; "), fixRestart)
	} else {
		c.pass("meshlane_pods", fmt.Sprintf("proxy uid %d gid %d, outbound listener %d, inbound listener %d",
			want.ProxyUID, want.ProxyGID, want.OutboundPort, want.InboundPort))
	}

	a.checkIPs(c, rec, want.IPs, got.IPs)

	var ports []string
	ports = append(ports, listDiff("inbound include port", want.InboundInclude, got.InboundInclude)...)
	ports = append(ports, listDiff("inbound exclude port", want.InboundExclude, got.InboundExclude)...)
	ports = append(ports, listDiff("outbound include port", want.OutboundIncludePorts, got.OutboundIncludePorts)...)
	ports = append(ports, listDiff("outbound exclude port", want.OutboundExcludePorts, got.OutboundExcludePorts)...)
	if len(ports) > 0 {
		c.fail("meshlane_ports", strings.Join(ports, "; "), fixRestart)
	} else {
		c.pass("meshlane_ports", fmt.Sprintf("%d port rules as computed", portRules(want)))
	}

	switch detail, err := a.view.InboundHooks(want); {
	case errors.Is(err, datapath.ErrListenerNotRegistered):
		// Fine while the sidecar is not listening yet; broken once it is.
		if up, lerr := podns.ListenerUp(want.Interface.Netns, want.InboundPort); lerr == nil && !up {
			c.pass("inbound hooks", fmt.Sprintf("sk_lookup program on the pod's network namespace; the sidecar is not listening on :%d yet "+
				"(connections from other nodes are dropped until it does)", want.InboundPort))
			break
		}
		c.fail("inbound hooks", err.Error(), "the sidecar listens, so its listener is an MPTCP socket and "+
			"the tc fallback failed (see the agent's log): run meshlane-agent with --inbound-hooks tcx, or have the sidecar listen with plain TCP")
	case err != nil:
		c.fail("inbound hooks", err.Error()+": connections from other nodes reach the app without its sidecar", fixRestart)
	default:
		c.pass("inbound hooks", detail)
	}
	if want.Cgroup != "" {
		if err := a.view.CgroupHooks(want); err != nil {
			c.fail("pod cgroup hooks", err.Error()+": the pod's own connections are not redirected to its sidecar", fixRestart)
		} else {
			c.pass("pod cgroup hooks", "connect, sendmsg, recvmsg, sockops and getsockopt programs on "+want.Cgroup)
		}
	}

	var cidrs []string
	cidrs = append(cidrs, listDiff("outbound include CIDR", masked(want.OutboundIncludeCIDRs), got.OutboundIncludeCIDRs)...)
	cidrs = append(cidrs, listDiff("outbound exclude CIDR", masked(want.OutboundExcludeCIDRs), got.OutboundExcludeCIDRs)...)
	if len(cidrs) > 0 {
		c.fail("meshlane_cidrs", strings.Join(cidrs, "; "), fixRestart)
	} else {
		c.pass("meshlane_cidrs", fmt.Sprintf("%d CIDR rules as computed", cidrRules(want)))
	}
}

// checkIPs checks that every pod IP points at the pod and that no other
// address does.
func (a *Agent) checkIPs(c *checker, rec PodRecord, want, pointing []netip.Addr) {
	var problems, ok []string
	names := a.podNamesByCookie()
	for _, ip := range set(want) {
		owner, found, err := a.view.PodIPOwner(ip)
		switch {
		case err != nil:
			problems = append(problems, err.Error())
		case !found:
			problems = append(problems, fmt.Sprintf("%s is missing: connections to it are not sent to the pod's inbound listener", ip))
		case owner != rec.NetnsCookie:
			problems = append(problems, fmt.Sprintf("%s points at netns cookie %d (%s): its connections go to that pod's sidecar", ip, owner, ownerName(names, owner)))
		default:
			ok = append(ok, ip.String())
		}
	}
	for _, ip := range pointing {
		if !slices.Contains(want, ip) {
			problems = append(problems, fmt.Sprintf("%s points at this pod but is not one of its IPs", ip))
		}
	}
	if len(problems) > 0 {
		c.fail("meshlane_podips", strings.Join(problems, "; "), fixRestart)
		return
	}
	c.pass("meshlane_podips", fmt.Sprintf("%s -> netns cookie %d", strings.Join(ok, ", "), rec.NetnsCookie))
}

// checkNothingWritten checks that a pod the agent did not mesh has no
// entries: none under its cookie, and none of its IPs in meshlane_podips.
func (a *Agent) checkNothingWritten(c *checker, rec PodRecord) {
	got, found, err := a.view.ReadPod(rec.NetnsCookie)
	if err != nil {
		c.fail("datapath maps", err.Error(), "check the agent's log: the pinned maps must be readable")
		return
	}
	if n := portRules(got) + cidrRules(got) + len(got.IPs); found || n > 0 {
		c.fail("datapath entries", fmt.Sprintf("the pod is %s, yet the maps hold entries for netns cookie %d (pod entry: %v, %d IPs and rules)",
			rec.State, rec.NetnsCookie, found, n), fixForeign)
	}
	names := a.podNamesByCookie()
	var problems []string
	for _, s := range rec.Event.IPs {
		ip, err := parseIP(s)
		if err != nil {
			continue
		}
		owner, found, err := a.view.PodIPOwner(ip)
		switch {
		case err != nil:
			problems = append(problems, err.Error())
		case found:
			problems = append(problems, fmt.Sprintf("%s points at netns cookie %d (%s): connections to this pod go to that pod's sidecar", ip, owner, ownerName(names, owner)))
		}
	}
	if len(problems) > 0 {
		c.fail("meshlane_podips", strings.Join(problems, "; "), fixForeign)
		return
	}
	if !found && portRules(got)+cidrRules(got)+len(got.IPs) == 0 {
		c.pass("datapath entries", "none, as expected for a pod that is not meshed")
	}
}

func ownerName(names map[uint64]string, cookie uint64) string {
	if n, ok := names[cookie]; ok {
		return "pod " + n
	}
	return "no pod the agent holds"
}

// settingsDiff lists the pod-entry fields where the maps differ from what
// the agent computed.
func settingsDiff(want, got datapath.Pod) []string {
	var out []string
	field := func(name string, w, g any) {
		if w != g {
			out = append(out, fmt.Sprintf("%s is %v in the map, computed %v", name, g, w))
		}
	}
	field("proxy uid", want.ProxyUID, got.ProxyUID)
	field("proxy gid", want.ProxyGID, got.ProxyGID)
	field("outbound listener port", want.OutboundPort, got.OutboundPort)
	field("inbound listener port", want.InboundPort, got.InboundPort)
	field("inbound all ports", want.InboundAll, got.InboundAll)
	field("outbound all CIDRs", want.OutboundAllCIDRs, got.OutboundAllCIDRs)
	field("DNS capture", want.DNSCapture, got.DNSCapture)
	field("DNS proxy port", want.DNSPort, got.DNSPort)
	field("proxy loopback to inbound", want.ProxyLoopbackInbound, got.ProxyLoopbackInbound)
	return out
}

// listDiff names what is missing from got and what is extra in it,
// ignoring order and duplicates.
func listDiff[T comparable](what string, want, got []T) []string {
	var out []string
	w, g := set(want), set(got)
	for _, v := range w {
		if !slices.Contains(g, v) {
			out = append(out, fmt.Sprintf("%s %v missing", what, v))
		}
	}
	for _, v := range g {
		if !slices.Contains(w, v) {
			out = append(out, fmt.Sprintf("%s %v present but not computed", what, v))
		}
	}
	return out
}

// set returns l without duplicates, in first-seen order.
func set[T comparable](l []T) []T {
	var out []T
	for _, v := range l {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// masked is what the datapath stores of a prefix list: each prefix masked
// to its length.
func masked(l []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, len(l))
	for i, p := range l {
		out[i] = p.Masked()
	}
	return out
}

func portRules(p datapath.Pod) int {
	return len(set(p.InboundInclude)) + len(set(p.InboundExclude)) + len(set(p.OutboundIncludePorts)) + len(set(p.OutboundExcludePorts))
}

func cidrRules(p datapath.Pod) int {
	return len(set(p.OutboundIncludeCIDRs)) + len(set(p.OutboundExcludeCIDRs))
}
