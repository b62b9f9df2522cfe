package agent

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
)

// DatapathView is the read-only side of the datapath behind the status,
// debug and metrics endpoints. *datapath.Datapath implements it.
type DatapathView interface {
	// Counters returns the decision counters by name.
	Counters() (map[string]uint64, error)
	// MapFill returns each listable map's entries and capacity.
	MapFill() (map[string]datapath.MapFill, error)
	// Conns lists the live redirected sockets; datapath.ErrConnsUnsupported
	// when the kernel cannot.
	Conns() ([]datapath.Conn, error)
	// Info says where the datapath is attached and what the kernel has.
	Info() datapath.Info
	// ReadPod returns the pod with this netns cookie as the maps hold it,
	// and whether meshlane_pods has it.
	ReadPod(netns uint64) (datapath.Pod, bool, error)
	// PodIPOwner returns the netns cookie meshlane_podips maps ip to.
	PodIPOwner(ip netip.Addr) (uint64, bool, error)
	// InboundHooks says what steers the pod's connections from other
	// nodes, or what is missing of it.
	InboundHooks(p datapath.Pod) (string, error)
	// CgroupHooks says what is missing of the pod's cgroup programs in pod
	// scope.
	CgroupHooks(p datapath.Pod) error
}

// errNoView answers the datapath endpoints of an agent built without a
// datapath view.
var errNoView = withStatus(http.StatusServiceUnavailable,
	errors.New("this agent runs without a datapath view: datapath details are unavailable"))

// SetInstallState gives /v1/status and the meshlane_installer_state metric
// the CNI plugin installer's state; fn is called on every request, so it
// must be cheap and safe for concurrent use.
func (a *Agent) SetInstallState(fn func() api.InstallStatus) {
	a.install.Store(&fn)
}

func (a *Agent) installState() (api.InstallStatus, bool) {
	fn := a.install.Load()
	if fn == nil {
		return api.InstallStatus{}, false
	}
	return (*fn)(), true
}

func (a *Agent) debugRoutes() map[string]func(http.ResponseWriter, *http.Request) {
	return map[string]func(http.ResponseWriter, *http.Request){
		api.PathStatus:    a.handleStatus,
		api.PathCounters:  a.handleCounters,
		api.PathEvents:    a.handleEvents,
		api.PathConns:     a.handleConns,
		api.PathSelfCheck: a.handleSelfCheck,
		api.PathMetrics:   a.metrics.handler().ServeHTTP,
	}
}

// Status reports the agent, its kernel, its pods and, with a datapath
// view, the attached programs, features and map fill levels.
func (a *Agent) Status() api.Status {
	now := time.Now()
	st := api.Status{
		Version:       a.version,
		Kernel:        kernelRelease(),
		StartedAt:     a.started,
		UptimeSeconds: now.Sub(a.started).Seconds(),
		Profile:       a.profile.Name,
		Pods:          a.podsByState(),
	}
	if is, ok := a.installState(); ok {
		st.Install = &is
	}
	if a.view == nil {
		return st
	}
	info := a.view.Info()
	ds := &api.DatapathStatus{
		Cgroup:  info.CgroupPath,
		Scope:   info.Scope,
		BPFFS:   info.BPFFS,
		MapsDir: info.MapsDir,
		Sockmap: info.Sockmap,
		Inbound: info.Inbound,
	}
	for _, l := range info.Links {
		ds.Links = append(ds.Links, api.Link{Name: l.Name, LinkID: l.LinkID, ProgramID: l.ProgramID, Pin: l.Pin, Error: l.Error})
	}
	for _, f := range info.Features {
		ds.Features = append(ds.Features, api.Feature{Name: f.Name, Available: f.Available, Detail: f.Detail})
	}
	if fill, err := a.view.MapFill(); err != nil {
		ds.MapsError = err.Error()
	} else {
		ds.Maps = make(map[string]api.MapFill, len(fill))
		for name, f := range fill {
			ds.Maps[name] = api.MapFill{Entries: f.Entries, Capacity: f.Capacity}
		}
	}
	st.Datapath = ds
	return st
}

// podStates are the states a held pod can be in, for the status and the
// pods gauge, which report every state even at zero.
var podStates = []string{api.StateMeshed, api.StateWaiting, api.StateNotMeshed}

func (a *Agent) podsByState() map[string]int {
	out := make(map[string]int, len(podStates))
	for _, s := range podStates {
		out[s] = 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, e := range a.pods {
		out[e.rec.State]++
	}
	return out
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func (a *Agent) handleStatus(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.Status())
}

func (a *Agent) handleCounters(w http.ResponseWriter, _ *http.Request) {
	if a.view == nil {
		writeOpError(w, errNoView)
		return
	}
	c, err := a.view.Counters()
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, api.Counters{Time: time.Now(), Counters: c})
}

func (a *Agent) handleEvents(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.Events())
}

// Conns lists the live redirected sockets; with a non-empty pod query only
// those of that pod: a local, remote or original address that is one of
// its IPs, or its sidecar as the listener.
func (a *Agent) Conns(podQuery string) (api.Conns, error) {
	if a.view == nil {
		return api.Conns{}, errNoView
	}
	keep := func(datapath.Conn) bool { return true }
	if podQuery != "" {
		rec, err := a.FindPod(podQuery)
		if err != nil {
			return api.Conns{}, err
		}
		ips := map[netip.Addr]bool{}
		for _, s := range rec.Event.IPs {
			if ip, err := parseIP(s); err == nil {
				ips[ip] = true
			}
		}
		keep = func(c datapath.Conn) bool {
			return c.ListenerNetns == rec.NetnsCookie || ips[c.Local.Addr()] || ips[c.Remote.Addr()] || ips[c.Original.Addr()]
		}
	}
	conns, err := a.view.Conns()
	if errors.Is(err, datapath.ErrConnsUnsupported) {
		return api.Conns{}, withStatus(http.StatusNotImplemented, err)
	}
	if err != nil {
		return api.Conns{}, withStatus(http.StatusInternalServerError, err)
	}
	names := a.podNamesByCookie()
	out := api.Conns{Conns: []api.Conn{}, Truncated: len(conns) >= datapath.MaxConns}
	for _, c := range conns {
		if !keep(c) {
			continue
		}
		out.Conns = append(out.Conns, api.Conn{
			Local: c.Local, Remote: c.Remote, Original: c.Original,
			Kind: c.Kind, Side: c.Side, Family: c.Family, State: c.State,
			ListenerNetns: c.ListenerNetns, ListenerPod: names[c.ListenerNetns],
			ShortCircuited: c.ShortCircuited,
		})
	}
	return out, nil
}

func (a *Agent) podNamesByCookie() map[uint64]string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[uint64]string, len(a.pods))
	for _, e := range a.pods {
		out[e.rec.NetnsCookie] = displayName(e.rec)
	}
	return out
}

// displayName is namespace/name, or the container id for a pod reported
// without a name.
func displayName(rec PodRecord) string {
	if n := podName(rec.Event); n != "" {
		return n
	}
	return rec.Event.ContainerID
}

func (a *Agent) handleConns(w http.ResponseWriter, r *http.Request) {
	out, err := a.Conns(r.URL.Query().Get(api.QueryPod))
	if err != nil {
		writeOpError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *Agent) handleSelfCheck(w http.ResponseWriter, r *http.Request) {
	rep, err := a.SelfCheck(r.URL.Query().Get(api.QueryPod))
	if err != nil {
		writeOpError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

// FindPod returns the held pod that q names: its container id, then
// namespace/name, a name, or one of its IPs, then a unique prefix of its
// container id. 404 when none matches, 409 when several do.
func (a *Agent) FindPod(q string) (PodRecord, error) {
	q = strings.TrimSpace(q)
	if q == "" {
		return PodRecord{}, withStatus(http.StatusBadRequest,
			errors.New("no pod named: give namespace/name, a name, an IP or a container id"))
	}
	ip, ipErr := netip.ParseAddr(q)
	recs := a.Pods()
	tiers := []func(PodRecord) bool{
		func(r PodRecord) bool { return r.Event.ContainerID == q },
		func(r PodRecord) bool {
			if ipErr == nil {
				return hasIP(r, ip.Unmap())
			}
			if strings.Contains(q, "/") {
				return podName(r.Event) == q
			}
			return r.Event.PodName == q
		},
		func(r PodRecord) bool { return strings.HasPrefix(r.Event.ContainerID, q) },
	}
	for _, match := range tiers {
		var found []PodRecord
		for _, r := range recs {
			if match(r) {
				found = append(found, r)
			}
		}
		switch len(found) {
		case 0:
			continue
		case 1:
			return found[0], nil
		}
		var names []string
		for _, r := range found {
			names = append(names, fmt.Sprintf("%s (%s)", displayName(r), r.Event.ContainerID))
		}
		return PodRecord{}, withStatus(http.StatusConflict,
			fmt.Errorf("%q matches %d pods: %s; name one by its container id", q, len(found), strings.Join(names, ", ")))
	}
	return PodRecord{}, withStatus(http.StatusNotFound,
		fmt.Errorf("no pod matching %q on this node: `meshlanectl pods` lists the pods this node's agent holds", q))
}

func hasIP(r PodRecord, ip netip.Addr) bool {
	for _, s := range r.Event.IPs {
		if a, err := parseIP(s); err == nil && a == ip {
			return true
		}
	}
	return false
}
