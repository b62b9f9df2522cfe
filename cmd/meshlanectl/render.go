package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// shortID is how long a container id is shown in tables at least, as
// crictl does.
const shortID = 13

func table(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
}

// row writes one tab-separated line; empty cells show as "-" so columns
// stay aligned and scripts splitting on spaces keep their column count.
func row(w io.Writer, cells ...string) {
	for i, c := range cells {
		if c == "" {
			cells[i] = "-"
		}
	}
	fmt.Fprintln(w, strings.Join(cells, "\t"))
}

// shortener shortens the container ids of one table to the shortest
// length from shortID on at which different ids stay distinct.
func shortener(ids []string) func(string) string {
	ids = slices.Compact(slices.Sorted(slices.Values(ids)))
	n := shortID
	for ; ; n++ {
		seen := map[string]bool{}
		distinct, longer := true, false
		for _, id := range ids {
			p := id[:min(n, len(id))]
			distinct = distinct && !seen[p]
			seen[p] = true
			longer = longer || len(id) > n
		}
		if distinct || !longer {
			break
		}
	}
	return func(id string) string { return id[:min(n, len(id))] }
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func join[T any](l []T) string {
	s := make([]string, len(l))
	for i, v := range l {
		s[i] = fmt.Sprint(v)
	}
	return strings.Join(s, ",")
}

func podName(ev api.PodEvent) string {
	if ev.PodNamespace == "" && ev.PodName == "" {
		return ev.ContainerID
	}
	return ev.PodNamespace + "/" + ev.PodName
}

// podIPs shows the reported addresses without their prefix length.
func podIPs(ev api.PodEvent) string {
	out := make([]string, 0, len(ev.IPs))
	for _, s := range ev.IPs {
		if p, err := netip.ParsePrefix(s); err == nil {
			s = p.Addr().String()
		}
		out = append(out, s)
	}
	return strings.Join(out, ",")
}

func renderStatus(w io.Writer, st api.Status) error {
	tw := table(w)
	uptime := (time.Duration(st.UptimeSeconds * float64(time.Second))).Round(time.Second)
	fmt.Fprintf(tw, "Agent:\t%s, up %s (since %s)\n", st.Version, uptime, st.StartedAt.Local().Format(time.RFC3339))
	fmt.Fprintf(tw, "Kernel:\t%s\n", st.Kernel)
	fmt.Fprintf(tw, "Default profile:\t%s\n", st.Profile)
	var pods []string
	for _, s := range slices.Sorted(maps.Keys(st.Pods)) {
		pods = append(pods, fmt.Sprintf("%d %s", st.Pods[s], s))
	}
	fmt.Fprintf(tw, "Pods:\t%s\n", strings.Join(pods, ", "))
	if st.Install != nil {
		fmt.Fprintf(tw, "CNI plugin install:\t%s\n", st.Install.State)
	}
	ds := st.Datapath
	if ds == nil {
		fmt.Fprintf(tw, "Datapath:\tnot shown by this agent\n")
		return tw.Flush()
	}
	if ds.Scope == "pod" {
		fmt.Fprintf(tw, "Cgroup:\teach meshed pod's own (pod scope); pods: %s\n", ds.Cgroup)
	} else {
		fmt.Fprintf(tw, "Cgroup:\t%s\n", ds.Cgroup)
	}
	fmt.Fprintf(tw, "Pinned maps:\t%s\n", ds.MapsDir)
	fast := "off (meshlane-agent --sockmap turns it on)"
	if ds.Sockmap {
		fast = "on (sockops + sk_msg short-circuit between local sockets)"
	}
	fmt.Fprintf(tw, "Fast path:\t%s\n", fast)
	from := fmt.Sprintf("%s programs on each meshed pod's interface", ds.Inbound)
	if ds.Inbound == "sk_lookup" {
		from = "sk_lookup programs on each meshed pod's network namespace"
	}
	fmt.Fprintf(tw, "From other nodes:\t%s\n", from)
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w)
	tw = table(w)
	row(tw, "PROGRAM", "LINK ID", "PROG ID", "PIN")
	for _, l := range ds.Links {
		link := fmt.Sprint(l.LinkID)
		if l.LinkID == 0 {
			link = "none"
		}
		pin := l.Pin
		if l.Error != "" {
			pin = "error: " + l.Error
		}
		row(tw, l.Name, link, fmt.Sprint(l.ProgramID), pin)
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w)
	tw = table(w)
	row(tw, "FEATURE", "AVAILABLE", "DETAIL")
	for _, f := range ds.Features {
		row(tw, f.Name, yesNo(f.Available), f.Detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w)
	if ds.MapsError != "" {
		_, err := fmt.Fprintf(w, "Map fill levels unavailable: %s\n", ds.MapsError)
		return err
	}
	tw = table(w)
	row(tw, "MAP", "ENTRIES", "CAPACITY", "FILL")
	for _, name := range slices.Sorted(maps.Keys(ds.Maps)) {
		m := ds.Maps[name]
		fill := "-"
		if m.Capacity > 0 {
			fill = fmt.Sprintf("%.1f%%", 100*float64(m.Entries)/float64(m.Capacity))
		}
		row(tw, name, fmt.Sprint(m.Entries), fmt.Sprint(m.Capacity), fill)
	}
	return tw.Flush()
}

func renderPods(w io.Writer, pods []api.PodStatus) error {
	slices.SortStableFunc(pods, func(a, b api.PodStatus) int {
		return cmp.Compare(podName(a.Event), podName(b.Event))
	})
	ids := make([]string, len(pods))
	for i, p := range pods {
		ids[i] = p.Event.ContainerID
	}
	short := shortener(ids)
	tw := table(w)
	row(tw, "POD", "CONTAINER", "IPS", "NETNS COOKIE", "PROFILE", "STATE", "REASON")
	for _, p := range pods {
		row(tw, podName(p.Event), short(p.Event.ContainerID), podIPs(p.Event), fmt.Sprint(p.NetnsCookie), p.Profile, p.State, p.Reason)
	}
	return tw.Flush()
}

func renderPod(w io.Writer, p api.PodStatus) error {
	tw := table(w)
	fmt.Fprintf(tw, "Pod:\t%s\n", podName(p.Event))
	fmt.Fprintf(tw, "Container:\t%s\n", p.Event.ContainerID)
	fmt.Fprintf(tw, "Netns:\t%s (cookie %d)\n", p.Event.Netns, p.NetnsCookie)
	fmt.Fprintf(tw, "IPs:\t%s\n", podIPs(p.Event))
	fmt.Fprintf(tw, "State:\t%s\n", p.State)
	fmt.Fprintf(tw, "Reason:\t%s\n", p.Reason)
	fmt.Fprintf(tw, "Profile:\t%s\n", dash(p.Profile))
	fmt.Fprintf(tw, "Added:\t%s\n", p.Added.Local().Format(time.RFC3339))
	fmt.Fprintf(tw, "Changed:\t%s\n", p.Changed.Local().Format(time.RFC3339))
	if s := p.Pod; s != nil {
		fmt.Fprintf(tw, "Proxy:\tuid %d, gid %d (their connections are never sent back to the sidecar)\n", s.ProxyUID, s.ProxyGID)
		fmt.Fprintf(tw, "Listeners:\toutbound %d, inbound %d\n", s.OutboundPort, s.InboundPort)
		if s.Cgroup != "" {
			fmt.Fprintf(tw, "Cgroup:\t%s (pod scope: the cgroup programs sit there)\n", s.Cgroup)
		}
		fmt.Fprintf(tw, "Inbound ports:\t%s\n", describe(s.InboundAll, "all", s.InboundInclude, s.InboundExclude))
		fmt.Fprintf(tw, "Outbound ports:\tall%s%s\n", except(s.OutboundExcludePorts), also(s.OutboundIncludePorts))
		fmt.Fprintf(tw, "Outbound CIDRs:\t%s\n", describe(s.OutboundAllCIDRs, "all", s.OutboundIncludeCIDRs, s.OutboundExcludeCIDRs))
		if s.DNSCapture {
			fmt.Fprintf(tw, "DNS:\tcaptured: port 53 to the DNS proxy on loopback port %d\n", s.DNSPort)
		} else {
			fmt.Fprintf(tw, "DNS:\tnot captured\n")
		}
	} else {
		fmt.Fprintf(tw, "Datapath:\tnothing written (the pod is not meshed)\n")
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// describe words an include/exclude setting: "all except 15090" or
// "80,8080 except 9090" or "none".
func describe[T any](all bool, allWord string, include, exclude []T) string {
	base := join(include)
	switch {
	case all:
		base = allWord
	case len(include) == 0:
		return "none"
	}
	return base + except(exclude)
}

func except[T any](l []T) string {
	if len(l) == 0 {
		return ""
	}
	return " except " + join(l)
}

func also[T any](l []T) string {
	if len(l) == 0 {
		return ""
	}
	return "; always " + join(l) + " (whatever the address)"
}

func renderConns(w io.Writer, c api.Conns) error {
	conns := slices.Clone(c.Conns)
	slices.SortFunc(conns, func(a, b api.Conn) int {
		return cmp.Or(
			cmp.Compare(a.ListenerPod, b.ListenerPod),
			cmp.Compare(a.Kind, b.Kind),
			a.Original.Compare(b.Original),
			cmp.Compare(a.Side, b.Side),
			a.Local.Compare(b.Local),
			a.Remote.Compare(b.Remote),
		)
	})
	tw := table(w)
	row(tw, "SIDECAR POD", "KIND", "SIDE", "LOCAL", "REMOTE", "ORIGINAL DST", "STATE", "SHORT-CIRCUIT")
	for _, x := range conns {
		pod := x.ListenerPod
		if pod == "" {
			pod = fmt.Sprintf("netns %d", x.ListenerNetns)
		}
		row(tw, pod, x.Kind, x.Side, x.Local.String(), x.Remote.String(), x.Original.String(), x.State, yesNo(x.ShortCircuited))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if c.Truncated {
		_, err := fmt.Fprintf(w, "(the node has more redirected sockets than the agent lists at once: %d shown)\n", len(conns))
		return err
	}
	return nil
}

func renderCounters(w io.Writer, c map[string]uint64) error {
	tw := table(w)
	row(tw, "COUNTER", "VALUE")
	for _, name := range slices.Sorted(maps.Keys(c)) {
		row(tw, name, fmt.Sprint(c[name]))
	}
	return tw.Flush()
}

func renderRates(w io.Writer, r rates) error {
	fmt.Fprintf(w, "%s, over %.1fs:\n", r.Time.Local().Format(time.TimeOnly), r.IntervalSeconds)
	tw := table(w)
	row(tw, "COUNTER", "TOTAL", "PER SECOND")
	for _, name := range slices.Sorted(maps.Keys(r.Totals)) {
		row(tw, name, fmt.Sprint(r.Totals[name]), fmt.Sprintf("%.1f", r.PerSecond[name]))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w)
	return err
}

func renderEvents(w io.Writer, evs []api.Event) error {
	ids := make([]string, len(evs))
	for i, e := range evs {
		ids[i] = e.ContainerID
	}
	short := shortener(ids)
	tw := table(w)
	row(tw, "TIME", "KIND", "POD", "CONTAINER", "STATE", "MESSAGE")
	for _, e := range evs {
		row(tw, e.Time.Local().Format(time.DateTime), e.Kind, e.Pod, short(e.ContainerID), e.State, e.Message)
	}
	return tw.Flush()
}

func renderCheck(w io.Writer, rep api.CheckReport) error {
	fmt.Fprintf(w, "Pod %s (container %s, netns cookie %d): %s\n", rep.Pod, rep.ContainerID, rep.NetnsCookie, rep.State)
	tw := table(w)
	row(tw, "CHECK", "RESULT", "DETAIL")
	for _, c := range rep.Checks {
		res := "ok"
		if !c.OK {
			res = "FAIL"
		}
		row(tw, c.Name, res, c.Detail)
		if c.Fix != "" {
			fmt.Fprintf(tw, "\t\tfix: %s\n", c.Fix)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	verdict := "all checks passed"
	if !rep.OK {
		verdict = "PROBLEMS FOUND: see the fixes above"
	}
	_, err := fmt.Fprintln(w, verdict)
	return err
}
