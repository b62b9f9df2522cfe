package agent_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap/zaptest"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
)

// fakeView is the read-only datapath over fakeMaps: it reads back what the
// agent wrote, as the real maps would, so an entry removed from fakeMaps
// behind the agent's back is missing from the view too.
type fakeView struct {
	maps     *fakeMaps
	counters map[string]uint64
	conns    []datapath.Conn
	connsErr error
	// ipOwners are extra meshlane_podips entries no pod wrote.
	ipOwners map[netip.Addr]uint64
	// inbound is Info's hook mode; inboundErr, when set, is what
	// InboundHooks says of every pod.
	inbound    string
	inboundErr error
}

func (v *fakeView) Counters() (map[string]uint64, error) { return v.counters, nil }

func (v *fakeView) MapFill() (map[string]datapath.MapFill, error) {
	v.maps.mu.Lock()
	defer v.maps.mu.Unlock()
	ips := len(v.ipOwners)
	for _, p := range v.maps.pods {
		ips += len(p.IPs)
	}
	return map[string]datapath.MapFill{
		"meshlane_pods":   {Entries: len(v.maps.pods), Capacity: 16384},
		"meshlane_podips": {Entries: ips, Capacity: 32768},
	}, nil
}

func (v *fakeView) Conns() ([]datapath.Conn, error) { return v.conns, v.connsErr }

func (v *fakeView) Info() datapath.Info {
	return datapath.Info{
		CgroupPath: "/sys/fs/cgroup/test", BPFFS: "/sys/fs/bpf/meshlane", MapsDir: "/sys/fs/bpf/meshlane/maps-v1",
		Links:    []datapath.LinkInfo{{Name: "connect4", LinkID: 7, ProgramID: 70, Pin: "/sys/fs/bpf/meshlane/links/connect4"}},
		Features: []datapath.Feature{{Name: "connections view", Available: true}},
		Inbound:  v.inbound,
	}
}

// ReadPod returns the written pod with its lists sorted, as the real maps
// give them back.
func (v *fakeView) ReadPod(netns uint64) (datapath.Pod, bool, error) {
	p, ok := v.maps.get(netns)
	if !ok {
		return datapath.Pod{NetnsCookie: netns}, false, nil
	}
	p.IPs = slices.Clone(p.IPs)
	slices.SortFunc(p.IPs, netip.Addr.Compare)
	return p, true, nil
}

func (v *fakeView) CgroupHooks(p datapath.Pod) error {
	if w, ok := v.maps.get(p.NetnsCookie); !ok || w.Cgroup == "" {
		return errors.New("no cgroup hooks")
	}
	return nil
}

func (v *fakeView) InboundHooks(p datapath.Pod) (string, error) {
	if v.inboundErr != nil {
		return "", v.inboundErr
	}
	if w, ok := v.maps.get(p.NetnsCookie); !ok || w.Interface.Name == "" {
		return "", errors.New("no hooks")
	}
	return v.inbound + " program", nil
}

func (v *fakeView) PodIPOwner(ip netip.Addr) (uint64, bool, error) {
	if c, ok := v.ipOwners[ip]; ok {
		return c, true, nil
	}
	v.maps.mu.Lock()
	defer v.maps.mu.Unlock()
	for c, p := range v.maps.pods {
		if slices.Contains(p.IPs, ip) {
			return c, true, nil
		}
	}
	return 0, false, nil
}

// newDebugAgent is an agent with a fake datapath and its view, served on a
// socket.
func newDebugAgent(t *testing.T, view *fakeView) (*agent.Agent, *http.Client) {
	t.Helper()
	if view.maps == nil {
		view.maps = newFakeMaps()
	}
	a, err := agent.New(agent.Config{
		Maps: view.maps, Profile: mesh.Istio, StateDir: t.TempDir(),
		Logger: zaptest.NewLogger(t), Debug: view, Version: "v9.8.7-test",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a, client(serve(t, a))
}

func getJSON(t *testing.T, c *http.Client, path string, out any) int {
	t.Helper()
	code, body := do(t, c, http.MethodGet, path, nil)
	if code == http.StatusOK {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("GET %s: %v in %s", path, err, body)
		}
	}
	return code
}

func TestSelfCheck(t *testing.T) {
	view := &fakeView{}
	a, c := newDebugAgent(t, view)
	meshed := newPod(t, "ctr-meshed", istioAnn, "10.1.0.7/24", "fd00::7/64")
	plain := newPod(t, "ctr-plain", plainAnn, "10.1.0.8/24")
	mustAdd(t, a, meshed.ev)
	mustAdd(t, a, plain.ev)

	var rep api.CheckReport
	if code := getJSON(t, c, "/v1/check?pod=default/pod-ctr-meshed", &rep); code != http.StatusOK {
		t.Fatalf("check: %d", code)
	}
	if !rep.OK || rep.State != api.StateMeshed || rep.NetnsCookie != meshed.cookie(t) {
		t.Fatalf("healthy meshed pod: %+v", rep)
	}
	for _, want := range []string{"network namespace", "meshlane_pods", "meshlane_podips", "meshlane_ports", "meshlane_cidrs"} {
		if !slices.ContainsFunc(rep.Checks, func(i api.CheckItem) bool { return i.Name == want && i.OK }) {
			t.Errorf("check %q missing or failed: %+v", want, rep.Checks)
		}
	}

	// Behind the agent's back: the pod's entry disappears from the maps.
	view.maps.mu.Lock()
	delete(view.maps.pods, meshed.cookie(t))
	view.maps.mu.Unlock()
	rep = api.CheckReport{}
	getJSON(t, c, "/v1/check?pod=10.1.0.7", &rep)
	if rep.OK {
		t.Fatalf("check passed with the pod's entry gone: %+v", rep)
	}
	i := slices.IndexFunc(rep.Checks, func(i api.CheckItem) bool { return i.Name == "meshlane_pods" })
	if i < 0 || rep.Checks[i].OK || !strings.Contains(rep.Checks[i].Detail, "no entry") || !strings.Contains(rep.Checks[i].Fix, "restart meshlane-agent") {
		t.Fatalf("missing entry not explained: %+v", rep.Checks)
	}

	// A pod that is not meshed passes, and says why it is not meshed...
	rep = api.CheckReport{}
	getJSON(t, c, "/v1/check?pod=pod-ctr-plain", &rep)
	if !rep.OK || !slices.ContainsFunc(rep.Checks, func(i api.CheckItem) bool {
		return i.Name == "state" && strings.Contains(i.Detail, api.StateNotMeshed)
	}) {
		t.Fatalf("not-meshed pod: %+v", rep)
	}
	// ...unless one of its IPs points at some pod's sidecar.
	view.ipOwners = map[netip.Addr]uint64{netip.MustParseAddr("10.1.0.8"): 777}
	rep = api.CheckReport{}
	getJSON(t, c, "/v1/check?pod=ctr-plain", &rep)
	if rep.OK || !slices.ContainsFunc(rep.Checks, func(i api.CheckItem) bool {
		return i.Name == "meshlane_podips" && !i.OK && strings.Contains(i.Detail, "10.1.0.8 points at netns cookie 777")
	}) {
		t.Fatalf("foreign podips entry not reported: %+v", rep)
	}
}

// TestSelfCheckSettings: a rule the agent computed but the maps lack, and
// one the maps hold that it never computed, are both named.
func TestSelfCheckSettings(t *testing.T) {
	view := &fakeView{}
	a, _ := newDebugAgent(t, view)
	p := newPod(t, "ctr-x", map[string]string{
		mesh.Istio.Marker: "{}",
		"traffic.sidecar.istio.io/excludeInboundPorts": "9090",
	})
	mustAdd(t, a, p.ev)
	cookie := p.cookie(t)
	view.maps.mu.Lock()
	w := view.maps.pods[cookie]
	w.InboundExclude = slices.DeleteFunc(slices.Clone(w.InboundExclude), func(v uint16) bool { return v == 9090 })
	w.OutboundExcludePorts = append(slices.Clone(w.OutboundExcludePorts), 5555)
	w.ProxyUID = 42
	view.maps.pods[cookie] = w
	view.maps.mu.Unlock()

	rep, err := a.SelfCheck("ctr-x")
	if err != nil {
		t.Fatal(err)
	}
	text := fmt.Sprintf("%+v", rep.Checks)
	for _, want := range []string{"inbound exclude port 9090 missing", "outbound exclude port 5555 present but not computed", "proxy uid is 42 in the map, computed 1337"} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q: %s", want, text)
		}
	}
	if rep.OK {
		t.Fatal("report OK despite differences")
	}
}

// TestSelfCheckInboundHooks: the inbound hooks row shows what the
// datapath found; in sk_lookup mode a listener that is not registered is
// told apart from a missing hook, since the fix differs (the sidecar, not
// the agent).
func TestSelfCheckInboundHooks(t *testing.T) {
	view := &fakeView{inbound: datapath.InboundSkLookup}
	a, _ := newDebugAgent(t, view)
	p := newPod(t, "ctr-x", istioAnn, "10.1.0.7/24")
	mustAdd(t, a, p.ev)
	row := func() api.CheckItem {
		t.Helper()
		rep, err := a.SelfCheck("ctr-x")
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(rep.Checks, func(i api.CheckItem) bool { return i.Name == "inbound hooks" })
		if i < 0 {
			t.Fatalf("no inbound hooks row: %+v", rep.Checks)
		}
		return rep.Checks[i]
	}
	if r := row(); !r.OK || !strings.Contains(r.Detail, "sk_lookup program") {
		t.Fatalf("healthy sk_lookup pod: %+v", r)
	}
	// No listener in the pod yet: nothing of meshlane is wrong.
	view.inboundErr = fmt.Errorf("%w on port 15006", datapath.ErrListenerNotRegistered)
	if r := row(); !r.OK || !strings.Contains(r.Detail, "not listening on :15006 yet") {
		t.Fatalf("no sidecar listener: %+v, want a pass that says the sidecar is not listening yet", r)
	}
	// A listener up but not registered (an MPTCP one whose fallback failed).
	ln := p.ns.Listen(t, "tcp4", "0.0.0.0:15006")
	defer ln.Close()
	if r := row(); r.OK || !strings.Contains(r.Fix, "MPTCP") {
		t.Fatalf("unregistered listener: %+v, want a fix about the sidecar's listener", r)
	}
	view.inboundErr = errors.New("sk_lookup link of the pod netns: no such file")
	if r := row(); r.OK || !strings.Contains(r.Fix, "restart meshlane-agent") {
		t.Fatalf("missing hook: %+v, want the restart fix", r)
	}
}

func TestFindPod(t *testing.T) {
	a, c := newDebugAgent(t, &fakeView{})
	one := newPod(t, "abc111", istioAnn, "10.1.0.11/24")
	two := newPod(t, "abc222", istioAnn, "10.1.0.12/24")
	two.ev.PodNamespace = "other"
	mustAdd(t, a, one.ev)
	mustAdd(t, a, two.ev)
	for q, want := range map[string]string{
		"abc111": "abc111", "abc2": "abc222", "default/pod-abc111": "abc111",
		"pod-abc222": "abc222", "10.1.0.12": "abc222", "::ffff:10.1.0.11": "abc111",
	} {
		rec, err := a.FindPod(q)
		if err != nil || rec.Event.ContainerID != want {
			t.Errorf("FindPod(%q) = %s, %v; want %s", q, rec.Event.ContainerID, err, want)
		}
	}
	for q, code := range map[string]int{"": 400, "abc": 409, "nope": 404, "10.1.0.99": 404} {
		got, body := do(t, c, http.MethodGet, "/v1/pods?pod="+q, nil)
		if got != code {
			t.Errorf("GET /v1/pods?pod=%s: %d %s, want %d", q, got, body, code)
		}
	}
	var pods []agent.PodRecord
	if getJSON(t, c, "/v1/pods?pod=abc1", &pods); len(pods) != 1 || pods[0].Event.ContainerID != "abc111" {
		t.Fatalf("/v1/pods?pod=abc1: %+v", pods)
	}
}

func TestConnsEndpoint(t *testing.T) {
	view := &fakeView{}
	a, c := newDebugAgent(t, view)
	p := newPod(t, "ctr-c", istioAnn, "10.1.0.20/24")
	mustAdd(t, a, p.ev)
	ap := netip.MustParseAddrPort
	view.conns = []datapath.Conn{
		{Local: ap("127.0.0.1:40000"), Remote: ap("127.0.0.1:15001"), Original: ap("10.1.0.30:8080"), Kind: datapath.KindOutbound, Side: datapath.SideClient, ListenerNetns: p.cookie(t)},
		{Local: ap("10.1.0.40:41000"), Remote: ap("10.1.0.50:15006"), Original: ap("10.1.0.50:80"), Kind: datapath.KindInbound, Side: datapath.SideClient, ListenerNetns: 999},
	}
	var all api.Conns
	if getJSON(t, c, "/v1/conns", &all); len(all.Conns) != 2 {
		t.Fatalf("all conns: %+v", all)
	}
	var mine api.Conns
	getJSON(t, c, "/v1/conns?pod=ctr-c", &mine)
	if len(mine.Conns) != 1 || mine.Conns[0].ListenerPod != "default/pod-ctr-c" || mine.Conns[0].Original != ap("10.1.0.30:8080") {
		t.Fatalf("conns of the pod: %+v", mine)
	}
	view.connsErr = fmt.Errorf("datapath: %w", datapath.ErrConnsUnsupported)
	if code, body := do(t, c, http.MethodGet, "/v1/conns", nil); code != http.StatusNotImplemented || !strings.Contains(errorBody(t, body), "5.9") {
		t.Fatalf("unsupported kernel: %d %s", code, body)
	}
}

func TestStatusEndpoint(t *testing.T) {
	view := &fakeView{}
	a, c := newDebugAgent(t, view)
	mustAdd(t, a, newPod(t, "ctr-s", istioAnn).ev)
	var st api.Status
	getJSON(t, c, "/v1/status", &st)
	if st.Version != "v9.8.7-test" || st.Kernel == "" || st.Profile != "istio" || st.Pods[api.StateMeshed] != 1 || st.Pods[api.StateWaiting] != 0 {
		t.Fatalf("status: %+v", st)
	}
	if st.Datapath == nil || st.Datapath.Maps["meshlane_pods"].Entries != 1 || len(st.Datapath.Links) != 1 || st.Datapath.Links[0].ProgramID != 70 {
		t.Fatalf("status datapath: %+v", st.Datapath)
	}
	if st.Install != nil {
		t.Fatalf("install state without a hook: %+v", st.Install)
	}
	a.SetInstallState(func() api.InstallStatus { return api.InstallStatus{State: "chained", Detail: "10-bridge.conflist"} })
	getJSON(t, c, "/v1/status", &st)
	if st.Install == nil || st.Install.State != "chained" {
		t.Fatalf("install state: %+v", st.Install)
	}
}

// TestNoView: an agent without a datapath view still serves status and
// events, and answers the datapath endpoints 503.
func TestNoView(t *testing.T) {
	a := newAgent(t, opts{})
	c := client(serve(t, a))
	var st api.Status
	if code := getJSON(t, c, "/v1/status", &st); code != http.StatusOK || st.Datapath != nil {
		t.Fatalf("status: %d %+v", code, st)
	}
	var evs []api.Event
	if code := getJSON(t, c, "/v1/events", &evs); code != http.StatusOK {
		t.Fatalf("events: %d", code)
	}
	for _, p := range []string{"/v1/counters", "/v1/conns", "/v1/check?pod=x"} {
		if code, _ := do(t, c, http.MethodGet, p, nil); code != http.StatusServiceUnavailable {
			t.Errorf("GET %s: %d, want 503", p, code)
		}
	}
}

// TestEventsJSON: the agent's events decode as api.Event with nothing lost.
func TestEventsJSON(t *testing.T) {
	a, c := newDebugAgent(t, &fakeView{})
	mustAdd(t, a, newPod(t, "ctr-e", istioAnn).ev)
	code, body := do(t, c, http.MethodGet, "/v1/events", nil)
	if code != http.StatusOK {
		t.Fatal(code)
	}
	var evs []api.Event
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&evs); err != nil {
		t.Fatal(err)
	}
	again, _ := json.Marshal(evs)
	if !bytes.Equal(bytes.TrimSpace(body), again) || len(evs) != 1 || evs[0].Kind != agent.EventAdded {
		t.Fatalf("events differ after a round trip:\n%s\n%s", body, again)
	}
}

// TestPodStatusJSON: a held meshed pod decodes as api.PodStatus, settings
// included, with no field lost.
func TestPodStatusJSON(t *testing.T) {
	a, c := newDebugAgent(t, &fakeView{})
	mustAdd(t, a, newPod(t, "ctr-j", map[string]string{
		mesh.Istio.Marker: "{}",
		"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12",
		"traffic.sidecar.istio.io/includeOutboundPorts":    "3306",
	}, "10.1.0.9/24", "fd00::9/64").ev)
	code, body := do(t, c, http.MethodGet, "/v1/pods", nil)
	if code != http.StatusOK {
		t.Fatal(code)
	}
	var pods []api.PodStatus
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&pods); err != nil {
		t.Fatal(err)
	}
	again, _ := json.Marshal(pods)
	if !bytes.Equal(bytes.TrimSpace(body), again) {
		t.Fatalf("pods differ after a round trip:\n%s\n%s", body, again)
	}
	s := pods[0].Pod
	if s == nil || len(s.IPs) != 2 || !slices.Contains(s.OutboundIncludePorts, 3306) || len(s.OutboundExcludeCIDRs) != 1 {
		t.Fatalf("settings: %+v", s)
	}
}

func parseMetrics(t *testing.T, r io.Reader) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		t.Fatalf("parse metrics: %v", err)
	}
	return fams
}

// sample returns the value of the family's series with these labels.
func sample(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

func TestMetrics(t *testing.T) {
	view := &fakeView{counters: map[string]uint64{"redirect_outbound": 5, "pass_loopback": 2, "msg_redirected_bytes": 4096}}
	a, c := newDebugAgent(t, view)
	a.SetInstallState(func() api.InstallStatus { return api.InstallStatus{State: "waiting-for-primary"} })
	p := newPod(t, "ctr-m", istioAnn)
	for range 2 {
		if code, _, msg := call(t, c, api.PathAdd, p.ev); code != http.StatusOK {
			t.Fatalf("ADD: %d %s", code, msg)
		}
	}
	if code, _, _ := call(t, c, api.PathAdd, api.PodEvent{ContainerID: "bad id!"}); code != http.StatusBadRequest {
		t.Fatalf("bad ADD: %d", code)
	}
	if code, _, _ := call(t, c, api.PathCheck, api.PodEvent{ContainerID: "unknown"}); code != http.StatusNotFound {
		t.Fatalf("CHECK of an unknown pod: %d", code)
	}

	code, body := do(t, c, http.MethodGet, api.PathMetrics, nil)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	fams := parseMetrics(t, bytes.NewReader(body))
	for _, w := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"meshlane_datapath_decisions_total", []string{"reason", "redirect_outbound"}, 5},
		{"meshlane_datapath_decisions_total", []string{"reason", "pass_loopback"}, 2},
		{"meshlane_datapath_bytes_total", []string{"reason", "msg_redirected"}, 4096},
		{"meshlane_cni_requests_total", []string{"verb", "ADD", "result", "ok"}, 2},
		{"meshlane_cni_requests_total", []string{"verb", "ADD", "result", "rejected"}, 1},
		{"meshlane_cni_requests_total", []string{"verb", "CHECK", "result", "rejected"}, 1},
		{"meshlane_cni_requests_total", []string{"verb", "DEL", "result", "ok"}, 0},
		{"meshlane_cni_request_duration_seconds", []string{"verb", "ADD"}, 3},
		{"meshlane_pods", []string{"state", api.StateMeshed}, 1},
		{"meshlane_pods", []string{"state", api.StateNotMeshed}, 0},
		{"meshlane_map_entries", []string{"map", "meshlane_pods"}, 1},
		{"meshlane_map_capacity", []string{"map", "meshlane_pods"}, 16384},
		{"meshlane_installer_state", []string{"state", "waiting-for-primary"}, 1},
		{"meshlane_build_info", []string{"version", "v9.8.7-test"}, 1},
	} {
		if got, ok := sample(fams, w.name, w.labels...); !ok || got != w.want {
			t.Errorf("%s%v = %v (present %v), want %v", w.name, w.labels, got, ok, w.want)
		}
	}
	if _, ok := sample(fams, "meshlane_datapath_decisions_total", "reason", "msg_redirected_bytes"); ok {
		t.Error("a byte counter is exported as a decision")
	}

	// The TCP probe handler: health, readiness and the same metrics, and
	// nothing of the socket's API.
	srv := httptest.NewServer(a.ProbeHandler())
	defer srv.Close()
	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200, "/metrics": 200, "/v1/pods": 404, "/v1/status": 404} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("probe GET %s: %d, want %d", path, resp.StatusCode, want)
		}
		if path == "/metrics" {
			if got, _ := sample(parseMetrics(t, bytes.NewReader(b)), "meshlane_datapath_decisions_total", "reason", "redirect_outbound"); got != 5 {
				t.Errorf("probe /metrics redirect_outbound = %v", got)
			}
		}
	}
	resp, err := http.Post(srv.URL+"/metrics", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("probe POST /metrics: %d", resp.StatusCode)
	}
}

// errView fails every read, as a datapath whose maps went away would.
type errView struct{ fakeView }

func (errView) Counters() (map[string]uint64, error) { return nil, errors.New("maps gone") }

// TestMetricsDatapathError: a failing datapath read fails the scrape's
// datapath metrics only; the rest is still served.
func TestMetricsDatapathError(t *testing.T) {
	v := &errView{fakeView{maps: newFakeMaps()}}
	a, err := agent.New(agent.Config{Maps: v.maps, Profile: mesh.Istio, StateDir: t.TempDir(), Logger: zaptest.NewLogger(t), Debug: v})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	rec := httptest.NewRecorder()
	a.ProbeHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	fams := parseMetrics(t, rec.Body)
	if _, ok := fams["meshlane_datapath_decisions_total"]; ok {
		t.Error("decisions exported despite the read error")
	}
	if _, ok := sample(fams, "meshlane_map_capacity", "map", "meshlane_pods"); !ok {
		t.Errorf("other metrics dropped along with the failing one: %v", rec.Code)
	}
}
