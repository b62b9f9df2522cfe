package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

// fakeAgent answers the debug endpoints on a unix socket with canned
// data; counters grow by 10 redirect_outbound per read.
func fakeAgent(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mlctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var reads atomic.Uint64
	reply := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Query().Get("pod") {
		case "":
			reply(w, 200, samplePods())
		case "web":
			reply(w, 200, samplePods()[:1])
		default:
			reply(w, 404, api.Error{Error: "no pod matching \"x\" on this node"})
		}
	})
	mux.HandleFunc("GET /v1/check", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Query().Get("pod") {
		case "good":
			reply(w, 200, api.CheckReport{Pod: "default/good", OK: true, Checks: []api.CheckItem{{Name: "meshlane_pods", OK: true, Detail: "fine"}}})
		case "bad":
			reply(w, 200, sampleBadCheck())
		default:
			reply(w, 404, api.Error{Error: "no pod matching \"missing\" on this node"})
		}
	})
	mux.HandleFunc("GET /v1/counters", func(w http.ResponseWriter, _ *http.Request) {
		n := reads.Add(1)
		reply(w, 200, api.Counters{Time: time.Now(), Counters: map[string]uint64{"redirect_outbound": 10 * n, "pass_loopback": 3}})
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, 500, api.Error{Error: "datapath: read meshlane_pods: boom"})
	})
	srv := httptest.NewUnstartedServer(mux)
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

func samplePods() []api.PodStatus {
	return []api.PodStatus{
		{
			Event:       api.PodEvent{ContainerID: "ctr-0123456789abcdef", Netns: "/var/run/netns/web", PodNamespace: "shop", PodName: "web", IPs: []string{"10.1.0.7/24", "fd00::7/64"}},
			NetnsCookie: 4097, State: api.StateMeshed, Reason: "annotation sidecar.istio.io/status present", Profile: "istio",
			Pod: &api.PodSettings{
				NetnsCookie: 4097, IPs: []netip.Addr{netip.MustParseAddr("10.1.0.7"), netip.MustParseAddr("fd00::7")},
				ProxyUID: 1337, ProxyGID: 1337, OutboundPort: 15001, InboundPort: 15006,
				Cgroup:     "/sys/fs/cgroup/kubepods/pod1",
				InboundAll: true, InboundExclude: []uint16{15020, 15021},
				OutboundExcludePorts: []uint16{53}, OutboundAllCIDRs: true,
				OutboundExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")},
			},
		},
		{
			Event:       api.PodEvent{ContainerID: "ctr-ffff", PodNamespace: "default", PodName: "batch", IPs: []string{"10.1.0.8/24"}},
			NetnsCookie: 4098, State: api.StateNotMeshed, Reason: "no mesh marker annotation",
		},
	}
}

func sampleBadCheck() api.CheckReport {
	return api.CheckReport{
		Pod: "shop/web", ContainerID: "ctr-0123456789abcdef", NetnsCookie: 4097, State: api.StateMeshed,
		Checks: []api.CheckItem{
			{Name: "network namespace", OK: true, Detail: "/var/run/netns/web, netns cookie 4097"},
			{Name: "meshlane_pods", Detail: "no entry for netns cookie 4097", Fix: "restart meshlane-agent"},
		},
	}
}

func runCtl(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code := run(ctx, args, &out, &errOut, func(k string) string { return env[k] })
	return code, out.String(), errOut.String()
}

func TestExitCodes(t *testing.T) {
	sock := fakeAgent(t)
	gone := filepath.Join(t.TempDir(), "nothing.sock")
	for _, tc := range []struct {
		name   string
		env    map[string]string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"unreachable", nil, []string{"--socket", gone, "pods"}, exitUnreachable, "", "cannot reach the meshlane agent"},
		{"unreachable names the socket and the next step", nil, []string{"status", "--socket", gone}, exitUnreachable, "", "kubectl -n meshlane-system get pods"},
		{"socket from the environment", map[string]string{envSocket: gone}, []string{"events"}, exitUnreachable, "", gone},
		{"environment overridden by the flag", map[string]string{envSocket: gone}, []string{"--socket", sock, "check", "good"}, exitOK, "all checks passed", ""},
		{"no command", nil, nil, exitUsage, "", "usage: meshlanectl"},
		{"unknown command", nil, []string{"frobnicate"}, exitUsage, "", `unknown command "frobnicate"`},
		{"bad flag", nil, []string{"pods", "--nope"}, exitUsage, "", "usage: meshlanectl pods"},
		{"bad format", nil, []string{"--socket", sock, "-o", "yaml", "pods"}, exitUsage, "", "want table or json"},
		{"check without a pod", nil, []string{"--socket", sock, "check"}, exitUsage, "", "name exactly one POD"},
		{"count without watch", nil, []string{"--socket", sock, "counters", "--count", "2"}, exitUsage, "", "--count needs --watch"},
		{"tool help", nil, []string{"--help"}, exitOK, "Exit codes:", ""},
		{"command help", nil, []string{"check", "--help"}, exitOK, "usage: meshlanectl check POD", ""},
		{"healthy check", nil, []string{"--socket", sock, "check", "good"}, exitOK, "all checks passed", ""},
		{"failed check", nil, []string{"--socket", sock, "check", "bad"}, exitProblem, "fix: restart meshlane-agent", ""},
		{"failed check as json", nil, []string{"--socket", sock, "check", "bad", "-o", "json"}, exitProblem, `"ok": false`, ""},
		{"pod not found", nil, []string{"--socket", sock, "check", "missing"}, exitProblem, "", "no pod matching"},
		{"pod not found by pods", nil, []string{"--socket", sock, "pods", "missing"}, exitProblem, "", "404"},
		{"agent error", nil, []string{"--socket", sock, "status"}, exitProblem, "", "boom"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runCtl(t, tc.env, tc.args...)
			if code != tc.code || !strings.Contains(out, tc.stdout) || !strings.Contains(errOut, tc.stderr) {
				t.Fatalf("meshlanectl %q: exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", tc.args, code, tc.code, out, errOut)
			}
		})
	}
}

func TestRenderPods(t *testing.T) {
	var b bytes.Buffer
	if err := renderPods(&b, samplePods()); err != nil {
		t.Fatal(err)
	}
	want := `POD        CONTAINER      IPS                 NETNS COOKIE  PROFILE  STATE       REASON
default/batch  ctr-ffff       10.1.0.8            4098          -        not-meshed  no mesh marker annotation
shop/web       ctr-012345678  10.1.0.7,fd00::7    4097          istio    meshed      annotation sidecar.istio.io/status present
`
	if got := b.String(); got != alignLike(want) {
		t.Fatalf("pods table:\n%s\nwant:\n%s", got, alignLike(want))
	}
}

// alignLike re-aligns a hand-written table the way tabwriter does, so the
// expected output reads naturally in the source.
func alignLike(s string) string {
	var b bytes.Buffer
	tw := table(&b)
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		tw.Write([]byte(strings.Join(splitCells(sc.Text()), "\t") + "\n"))
	}
	tw.Flush()
	return b.String()
}

// splitCells splits on runs of two or more spaces.
func splitCells(line string) []string {
	var out []string
	for _, f := range strings.Split(line, "  ") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// TestShortener: container ids are cut to 13 characters, or longer where
// that is needed to tell them apart.
func TestShortener(t *testing.T) {
	ids := []string{"ctr-meshlane-test-1-client", "ctr-meshlane-test-1-server", "abc", ""}
	short := shortener(ids)
	for id, want := range map[string]string{
		"ctr-meshlane-test-1-client": "ctr-meshlane-test-1-c",
		"ctr-meshlane-test-1-server": "ctr-meshlane-test-1-s",
		"abc":                        "abc",
	} {
		if got := short(id); got != want {
			t.Errorf("short(%q) = %q, want %q", id, got, want)
		}
	}
	// The same id in several rows (events) is one id.
	if got := shortener([]string{"same-id-longer-than-13", "same-id-longer-than-13"})("same-id-longer-than-13"); got != "same-id-longe" {
		t.Errorf("repeated id: %q", got)
	}
	if got := shortener([]string{"0123456789abcdef0123"})("0123456789abcdef0123"); got != "0123456789abc" {
		t.Errorf("one id: %q", got)
	}
}

func TestRenderPod(t *testing.T) {
	var b bytes.Buffer
	if err := renderPod(&b, samplePods()[0]); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Netns:           /var/run/netns/web (cookie 4097)",
		"Proxy:           uid 1337, gid 1337",
		"Listeners:       outbound 15001, inbound 15006",
		"Cgroup:          /sys/fs/cgroup/kubepods/pod1 (pod scope: the cgroup programs sit there)",
		"Inbound ports:   all except 15020,15021",
		"Outbound ports:  all except 53\n",
		"Outbound CIDRs:  all except 10.96.0.0/12",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("pod detail lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	renderPod(&b, samplePods()[1])
	if !strings.Contains(b.String(), "nothing written (the pod is not meshed)") {
		t.Errorf("not-meshed pod detail:\n%s", b.String())
	}
}

func TestRenderCheck(t *testing.T) {
	var b bytes.Buffer
	if err := renderCheck(&b, sampleBadCheck()); err != nil {
		t.Fatal(err)
	}
	want := "Pod shop/web (container ctr-0123456789abcdef, netns cookie 4097): meshed\n" +
		"CHECK              RESULT  DETAIL\n" +
		"network namespace  ok      /var/run/netns/web, netns cookie 4097\n" +
		"meshlane_pods      FAIL    no entry for netns cookie 4097\n" +
		"                           fix: restart meshlane-agent\n" +
		"PROBLEMS FOUND: see the fixes above\n"
	if b.String() != want {
		t.Fatalf("check:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestRenderConns(t *testing.T) {
	ap := netip.MustParseAddrPort
	c := api.Conns{Conns: []api.Conn{
		{Local: ap("10.1.0.7:15006"), Remote: ap("10.1.0.9:40002"), Original: ap("10.1.0.7:8080"), Kind: "inbound", Side: "listener", State: "ESTABLISHED", ListenerPod: "shop/web", ShortCircuited: true},
		{Local: ap("127.0.0.1:40001"), Remote: ap("127.0.0.1:15001"), Original: ap("10.1.0.7:8080"), Kind: "outbound", Side: "client", State: "ESTABLISHED", ListenerNetns: 5000},
	}}
	var b bytes.Buffer
	if err := renderConns(&b, c); err != nil {
		t.Fatal(err)
	}
	want := alignLike(`SIDECAR POD  KIND  SIDE  LOCAL  REMOTE  ORIGINAL DST  STATE  SHORT-CIRCUIT
netns 5000  outbound  client  127.0.0.1:40001  127.0.0.1:15001  10.1.0.7:8080  ESTABLISHED  no
shop/web  inbound  listener  10.1.0.7:15006  10.1.0.9:40002  10.1.0.7:8080  ESTABLISHED  yes
`)
	if b.String() != want {
		t.Fatalf("conns:\n%s\nwant:\n%s", b.String(), want)
	}
}

// TestCountersWatch: --watch prints the per-second change of each counter
// over every interval, --count of them.
func TestCountersWatch(t *testing.T) {
	sock := fakeAgent(t)
	code, out, errOut := runCtl(t, nil, "--socket", sock, "counters", "--watch", "100ms", "--count", "2", "-o", "json")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 intervals, got:\n%s", out)
	}
	for i, l := range lines {
		var r rates
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		// Each read adds 10: the rate is 10 over the measured interval.
		want := 10 / r.IntervalSeconds
		if r.Totals["redirect_outbound"] != uint64(10*(i+2)) || r.PerSecond["redirect_outbound"] != want || r.PerSecond["pass_loopback"] != 0 {
			t.Fatalf("interval %d: %+v", i, r)
		}
	}
	code, out, _ = runCtl(t, nil, "--socket", sock, "counters")
	if code != exitOK || !strings.Contains(out, "redirect_outbound") || !strings.Contains(out, "COUNTER") {
		t.Fatalf("counters table: %d\n%s", code, out)
	}
}

func TestRateOfReset(t *testing.T) {
	t0 := time.Now()
	r := rateOf(api.Counters{Time: t0, Counters: map[string]uint64{"a": 100}},
		api.Counters{Time: t0.Add(2 * time.Second), Counters: map[string]uint64{"a": 8, "b": 4}})
	// a went down (datapath recreated): counted from zero.
	if r.PerSecond["a"] != 4 || r.PerSecond["b"] != 2 {
		t.Fatalf("rates: %+v", r.PerSecond)
	}
}
