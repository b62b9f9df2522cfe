package plugin

import (
	"bytes"
	"encoding/json"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/meshlane/meshlane/daemon/api"
)

const (
	testContainer = "3f2a9c1d7e"
	testNetns     = "/var/run/netns/cni-5e1f"
	testK8sArgs   = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9;K8S_POD_UID=0b6c-11;K8S_POD_INFRA_CONTAINER_ID=" + testContainer
)

// chainVersions are the cniVersions a primary conflist may declare for a
// chain: chaining (prevResult) exists from 0.3.0 on.
var chainVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// prevResultJSON is what a bridge-like primary plugin returns: a host-side
// interface, the pod's eth0 in the sandbox, a v4 and a v6 address on eth0
// and a host-side gateway address that is not the pod's.
func prevResultJSON(ver string) string {
	ipVer := func(v string) string {
		if strings.HasPrefix(ver, "0.") {
			return `"version":"` + v + `",`
		}
		return ""
	}
	return `{"cniVersion":"` + ver + `",
		"interfaces":[{"name":"cni0","mac":"0a:58:0a:01:02:01"},{"name":"eth0","mac":"0a:58:0a:01:02:03","sandbox":"` + testNetns + `"}],
		"ips":[{` + ipVer("4") + `"interface":1,"address":"10.1.2.3/24","gateway":"10.1.2.1"},
		       {` + ipVer("6") + `"interface":1,"address":"fd00:1::3/64","gateway":"fd00:1::1"},
		       {` + ipVer("4") + `"interface":0,"address":"10.1.2.1/24"}],
		"routes":[{"dst":"0.0.0.0/0","gw":"10.1.2.1"},{"dst":"::/0"}],
		"dns":{"nameservers":["10.96.0.10"],"domain":"cluster.local","search":["shop.svc.cluster.local"]}}`
}

// confJSON builds the plugin's stdin; prev is left out when empty.
func confJSON(t *testing.T, ver string, fields map[string]any, prev string) []byte {
	t.Helper()
	m := map[string]any{"cniVersion": ver, "name": "podnet", "type": "meshlane-cni"}
	for k, v := range fields {
		m[k] = v
	}
	if prev != "" {
		m["prevResult"] = json.RawMessage(prev)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func cmdArgs(stdin []byte) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: testContainer,
		Netns:       testNetns,
		IfName:      "eth0",
		Args:        testK8sArgs,
		Path:        "/opt/cni/bin",
		StdinData:   stdin,
	}
}

func newTestRunner() (*runner, *bytes.Buffer) {
	var buf bytes.Buffer
	return &runner{stderr: &buf}, &buf
}

// add runs ADD the way the runtime would see it and returns stdout.
func add(r *runner, args *skel.CmdArgs) ([]byte, error) {
	_, out, err := testutils.CmdAddWithArgs(args, func() error { return r.cmdAdd(args) })
	return out, err
}

func jsonMap(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("not a JSON object: %v\n%s", err, b)
	}
	return m
}

func wantCode(t *testing.T, err error, code uint, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want code %d", code)
	}
	terr := asCNIError(t, err)
	if terr.Code != code {
		t.Fatalf("code %d, want %d: %v", terr.Code, code, err)
	}
	for _, p := range parts {
		if !strings.Contains(terr.Error(), p) {
			t.Errorf("error %q does not contain %q", terr.Error(), p)
		}
	}
}

func TestAddPassesPrevResultThroughEveryVersion(t *testing.T) {
	for _, ver := range chainVersions {
		t.Run(ver, func(t *testing.T) {
			agent := newFakeAgent(t)
			r, _ := newTestRunner()
			prev := prevResultJSON(ver)
			out, err := add(r, cmdArgs(confJSON(t, ver, map[string]any{"socket": agent.socket}, prev)))
			if err != nil {
				t.Fatal(err)
			}
			if got, want := jsonMap(t, out), jsonMap(t, []byte(prev)); !reflect.DeepEqual(got, want) {
				t.Errorf("result changed\n got: %v\nwant: %v", got, want)
			}
			agent.only(t, api.PathAdd)
		})
	}
}

func TestAddReportsPod(t *testing.T) {
	agent := newFakeAgent(t)
	r, _ := newTestRunner()
	annotations := map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`, "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}
	args := cmdArgs(confJSON(t, "1.0.0", map[string]any{
		"socket":        agent.socket,
		"runtimeConfig": map[string]any{annotationsCapability: annotations, "cgroupPath": "kubepods-burstable-pod0b6c_11.slice"},
	}, prevResultJSON("1.0.0")))
	// Runtimes add keys of their own, not always with IgnoreUnknown=1;
	// they must not matter.
	args.Args = strings.TrimPrefix(testK8sArgs, "IgnoreUnknown=1;") + ";K8S_POD_EXTRA=1"
	if _, err := add(r, args); err != nil {
		t.Fatal(err)
	}
	req := agent.only(t, api.PathAdd)
	if req.Method != http.MethodPost {
		t.Errorf("method %s, want POST", req.Method)
	}
	var got api.PodEvent
	if err := json.Unmarshal(req.Body, &got); err != nil {
		t.Fatal(err)
	}
	want := api.PodEvent{
		ContainerID:      testContainer,
		Netns:            testNetns,
		IfName:           "eth0",
		IPs:              []string{"10.1.2.3", "fd00:1::3"},
		PodName:          "cart-7d9",
		PodNamespace:     "shop",
		PodUID:           "0b6c-11",
		InfraContainerID: testContainer,
		Annotations:      annotations,
		CgroupPath:       "kubepods-burstable-pod0b6c_11.slice",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("event\n got: %+v\nwant: %+v", got, want)
	}
}

func TestPodIPsWithoutInterfaceIndexes(t *testing.T) {
	c, err := parseConfig(confJSON(t, "0.3.1", nil,
		`{"ips":[{"version":"4","address":"192.0.2.7/32"},{"version":"6","address":"2001:db8::7/128"},{"version":"4","address":"192.0.2.7/24"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	prev, err := requirePrevResult(c)
	if err != nil {
		t.Fatal(err)
	}
	ips, err := podIPs(prev)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"192.0.2.7", "2001:db8::7"}; !reflect.DeepEqual(ips, want) {
		t.Errorf("ips %v, want %v", ips, want)
	}
}

func TestAddWithoutPrevResult(t *testing.T) {
	for _, ver := range chainVersions {
		agent := newFakeAgent(t)
		r, _ := newTestRunner()
		_, err := add(r, cmdArgs(confJSON(t, ver, map[string]any{"socket": agent.socket}, "")))
		wantCode(t, err, types.ErrInvalidNetworkConfig, "must be called as a chained plugin")
		if n := len(agent.requests(api.PathAdd)); n != 0 {
			t.Errorf("%s: agent got %d ADD requests without prevResult", ver, n)
		}
	}
}

func TestAddBadPrevResult(t *testing.T) {
	r, _ := newTestRunner()
	_, err := add(r, cmdArgs(confJSON(t, "1.0.0", nil, `{"ips":[{"address":"not-an-ip"}]}`)))
	wantCode(t, err, types.ErrInvalidNetworkConfig, `invalid config field "prevResult"`)
}

func TestAddBadConfig(t *testing.T) {
	r, _ := newTestRunner()
	_, err := add(r, cmdArgs(confJSON(t, "1.0.0", map[string]any{"failPolicy": "maybe"}, prevResultJSON("1.0.0"))))
	wantCode(t, err, types.ErrInvalidNetworkConfig, `invalid config field "failPolicy"`)

	_, err = add(r, cmdArgs([]byte(`{"cniVersion":"1.0.0",`)))
	wantCode(t, err, types.ErrDecodingFailure, "cannot decode the network config")
}

func TestAddBadCNIArgs(t *testing.T) {
	agent := newFakeAgent(t)
	r, _ := newTestRunner()
	args := cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket}, prevResultJSON("1.0.0")))
	args.Args = "K8S_POD_NAME"
	_, err := add(r, args)
	wantCode(t, err, types.ErrInvalidEnvironmentVariables, "CNI_ARGS")
}

func TestAddAgentDown(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "absent.sock")
	prev := prevResultJSON("0.3.1")
	conf := func(fields map[string]any) []byte {
		fields["socket"] = missing
		return confJSON(t, "0.3.1", fields, prev)
	}

	r, stderr := newTestRunner()
	_, err := add(r, cmdArgs(conf(map[string]any{})))
	wantCode(t, err, types.ErrTryAgainLater, missing, "shop/cart-7d9", "meshlane-agent DaemonSet")
	if !strings.Contains(stderr.String(), "level=ERROR") {
		t.Errorf("closed failure not logged:\n%s", stderr)
	}

	r, stderr = newTestRunner()
	out, err := add(r, cmdArgs(conf(map[string]any{"failPolicy": "open"})))
	if err != nil {
		t.Fatalf("failPolicy open: %v", err)
	}
	if !reflect.DeepEqual(jsonMap(t, out), jsonMap(t, []byte(prev))) {
		t.Errorf("failPolicy open changed the result: %s", out)
	}
	if !strings.Contains(stderr.String(), "level=WARN") || !strings.Contains(stderr.String(), "failPolicy") {
		t.Errorf("fail-open not logged as a warning:\n%s", stderr)
	}

	r, _ = newTestRunner()
	if _, err := add(r, cmdArgs(conf(map[string]any{"excludeNamespaces": []string{"meshlane-system", "shop"}}))); err != nil {
		t.Errorf("excluded namespace failed: %v", err)
	}
}

func TestAddAgentFailsWith5xx(t *testing.T) {
	agent := newFakeAgent(t)
	agent.respond(api.PathAdd, http.StatusServiceUnavailable, `{"error":"datapath not loaded yet"}`)
	r, _ := newTestRunner()
	_, err := add(r, cmdArgs(confJSON(t, "1.1.0", map[string]any{"socket": agent.socket}, prevResultJSON("1.1.0"))))
	wantCode(t, err, types.ErrTryAgainLater, "datapath not loaded yet", agent.socket)
}

func TestAddTimeoutBoundsTheCall(t *testing.T) {
	agent := newFakeAgent(t)
	agent.stall(api.PathAdd, 10*time.Second)
	r, _ := newTestRunner()
	start := time.Now()
	_, err := add(r, cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket, "timeout": "200ms"}, prevResultJSON("1.0.0"))))
	wantCode(t, err, types.ErrTryAgainLater, "deadline exceeded")
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("ADD took %v with a 200ms timeout", d)
	}
}

func TestAddAgentRejects(t *testing.T) {
	const reason = `annotation traffic.sidecar.istio.io/includeInboundPorts: "eighty" is not a port list`
	agent := newFakeAgent(t)
	agent.respond(api.PathAdd, http.StatusBadRequest, `{"error":"`+strings.ReplaceAll(reason, `"`, `\"`)+`"}`)
	prev := prevResultJSON("0.4.0")

	r, _ := newTestRunner()
	_, err := add(r, cmdArgs(confJSON(t, "0.4.0", map[string]any{"socket": agent.socket}, prev)))
	wantCode(t, err, types.ErrInvalidNetworkConfig, reason, "rejected pod shop/cart-7d9")

	r, _ = newTestRunner()
	out, err := add(r, cmdArgs(confJSON(t, "0.4.0", map[string]any{"socket": agent.socket, "failPolicy": "open"}, prev)))
	if err != nil {
		t.Fatalf("failPolicy open: %v", err)
	}
	if !reflect.DeepEqual(jsonMap(t, out), jsonMap(t, []byte(prev))) {
		t.Errorf("failPolicy open changed the result: %s", out)
	}
	// Both outcomes reach the agent's log with the rejection in them.
	logs := agent.logs(t)
	if len(logs) != 2 {
		t.Fatalf("relayed logs = %+v", logs)
	}
	for i, level := range []string{"error", "warn"} {
		rec := logs[i]
		if rec.Level != level || rec.ContainerID != testContainer || rec.Fields["pod"] != "shop/cart-7d9" || !strings.Contains(rec.Fields["error"], reason) {
			t.Errorf("relayed log %d = %+v, want level %s", i, rec, level)
		}
	}
}

func TestLogRelay(t *testing.T) {
	prev := prevResultJSON("1.0.0")

	// At the default level a successful ADD relays nothing: one request.
	agent := newFakeAgent(t)
	r, stderr := newTestRunner()
	if _, err := add(r, cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket}, prev))); err != nil {
		t.Fatal(err)
	}
	if logs := agent.logs(t); len(logs) != 0 {
		t.Errorf("info level relayed %+v", logs)
	}
	if !strings.Contains(stderr.String(), "level=INFO") || !strings.Contains(stderr.String(), "state=meshed") {
		t.Errorf("stderr:\n%s", stderr)
	}

	// At debug level every line goes to the agent too.
	agent = newFakeAgent(t)
	r, stderr = newTestRunner()
	if _, err := add(r, cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket, "logLevel": "debug"}, prev))); err != nil {
		t.Fatal(err)
	}
	logs := agent.logs(t)
	if len(logs) != 2 || logs[0].Level != "debug" || logs[1].Level != "info" {
		t.Fatalf("relayed logs = %+v", logs)
	}
	if logs[0].Fields["cmd"] != "ADD" || logs[0].Fields["ips"] != "10.1.2.3,fd00:1::3" || logs[0].ContainerID != testContainer {
		t.Errorf("debug record = %+v", logs[0])
	}
	if lines := strings.Count(stderr.String(), "\n"); lines != 2 {
		t.Errorf("stderr has %d lines, want 2:\n%s", lines, stderr)
	}

	// A broken relay never fails the call.
	agent = newFakeAgent(t)
	agent.respond(api.PathLog, http.StatusInternalServerError, `{"error":"log sink full"}`)
	r, _ = newTestRunner()
	if _, err := add(r, cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket, "logLevel": "debug"}, prev))); err != nil {
		t.Errorf("failing relay failed ADD: %v", err)
	}
}

func TestDel(t *testing.T) {
	agent := newFakeAgent(t)
	r, _ := newTestRunner()
	// DEL may come without prevResult and netns.
	args := cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket}, ""))
	args.Netns = ""
	if err := testutils.CmdDelWithArgs(args, func() error { return r.cmdDel(args) }); err != nil {
		t.Fatal(err)
	}
	var ev api.PodEvent
	if err := json.Unmarshal(agent.only(t, api.PathDel).Body, &ev); err != nil {
		t.Fatal(err)
	}
	want := api.PodEvent{ContainerID: testContainer, IfName: "eth0", PodName: "cart-7d9", PodNamespace: "shop", PodUID: "0b6c-11", InfraContainerID: testContainer}
	if !reflect.DeepEqual(ev, want) {
		t.Errorf("event\n got: %+v\nwant: %+v", ev, want)
	}

	// With a prevResult the addresses are reported too.
	args = cmdArgs(confJSON(t, "0.3.1", map[string]any{"socket": agent.socket}, prevResultJSON("0.3.1")))
	if err := r.cmdDel(args); err != nil {
		t.Fatal(err)
	}
	reqs := agent.requests(api.PathDel)
	if len(reqs) != 2 || !strings.Contains(string(reqs[1].Body), `"ips":["10.1.2.3","fd00:1::3"]`) {
		t.Errorf("DEL with prevResult sent %s", reqs[len(reqs)-1].Body)
	}
}

func TestDelAlwaysSucceeds(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "absent.sock")
	agent := newFakeAgent(t)
	agent.respond(api.PathDel, http.StatusInternalServerError, `{"error":"map update failed"}`)
	cases := map[string]*skel.CmdArgs{
		"agent down":      cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": missing}, "")),
		"agent 5xx":       cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": agent.socket}, "")),
		"garbage config":  cmdArgs([]byte("\x00\xffnot json")),
		"bad field":       cmdArgs(confJSON(t, "1.0.0", map[string]any{"timeout": "forever"}, "")),
		"bad prevResult":  cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": missing}, `{"ips":[{"address":"x"}]}`)),
		"bad CNI_ARGS":    {ContainerID: testContainer, IfName: "eth0", Args: "garbage", StdinData: confJSON(t, "1.0.0", map[string]any{"socket": missing}, "")},
		"closed and down": cmdArgs(confJSON(t, "1.1.0", map[string]any{"socket": missing, "failPolicy": "closed"}, prevResultJSON("1.1.0"))),
	}
	for name, args := range cases {
		r, stderr := newTestRunner()
		if err := r.cmdDel(args); err != nil {
			t.Errorf("%s: DEL failed: %v", name, err)
		}
		if !strings.Contains(stderr.String(), "level=WARN") && !strings.Contains(stderr.String(), "level=ERROR") {
			t.Errorf("%s: DEL problem not logged:\n%s", name, stderr)
		}
	}
}

func TestCheck(t *testing.T) {
	agent := newFakeAgent(t)
	prev := prevResultJSON("0.4.0")
	args := cmdArgs(confJSON(t, "0.4.0", map[string]any{"socket": agent.socket}, prev))
	r, _ := newTestRunner()
	if err := testutils.CmdCheckWithArgs(args, func() error { return r.cmdCheck(args) }); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(agent.only(t, api.PathCheck).Body), `"containerID":"`+testContainer+`"`) {
		t.Error("CHECK did not name the container")
	}

	agent.respond(api.PathCheck, http.StatusNotFound, `{"error":"no pod with this container id"}`)
	err := r.cmdCheck(args)
	wantCode(t, err, types.ErrUnknownContainer, "meshlane agent does not hold container "+testContainer, "no pod with this container id")
	if n := len(agent.requests(api.PathCheck)); n != 2 {
		t.Errorf("CHECK made %d requests in two calls", n)
	}

	excluded := cmdArgs(confJSON(t, "0.4.0", map[string]any{"socket": agent.socket, "excludeNamespaces": []string{"shop"}}, prev))
	if err := r.cmdCheck(excluded); err != nil {
		t.Errorf("excluded namespace: %v", err)
	}
	open := cmdArgs(confJSON(t, "0.4.0", map[string]any{"socket": agent.socket, "failPolicy": "open"}, prev))
	if err := r.cmdCheck(open); err != nil {
		t.Errorf("failPolicy open: %v", err)
	}

	err = r.cmdCheck(cmdArgs(confJSON(t, "0.4.0", map[string]any{"socket": agent.socket}, "")))
	wantCode(t, err, types.ErrInvalidNetworkConfig, "must be called as a chained plugin")

	down := cmdArgs(confJSON(t, "1.0.0", map[string]any{"socket": filepath.Join(t.TempDir(), "absent.sock")}, prevResultJSON("1.0.0")))
	wantCode(t, r.cmdCheck(down), types.ErrTryAgainLater, "could not check pod shop/cart-7d9")
}

func TestStatus(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "absent.sock")
	r, _ := newTestRunner()
	status := func(conf []byte) error {
		return testutils.CmdStatus(func() error { return r.cmdStatus(&skel.CmdArgs{StdinData: conf}) })
	}

	err := status(confJSON(t, "1.1.0", map[string]any{"socket": missing}, ""))
	wantCode(t, err, types.ErrPluginNotAvailable, missing, "meshlane-agent DaemonSet")

	if err := status(confJSON(t, "1.1.0", map[string]any{"socket": missing, "failPolicy": "open"}, "")); err != nil {
		t.Errorf("failPolicy open: %v", err)
	}

	agent := newFakeAgent(t)
	if err := status(confJSON(t, "1.1.0", map[string]any{"socket": agent.socket}, "")); err != nil {
		t.Errorf("healthy agent: %v", err)
	}
	if req := agent.only(t, api.PathHealthz); req.Method != http.MethodGet {
		t.Errorf("STATUS used %s", req.Method)
	}

	agent.respond(api.PathHealthz, http.StatusServiceUnavailable, "bpf maps not pinned")
	wantCode(t, status(confJSON(t, "1.1.0", map[string]any{"socket": agent.socket}, "")), types.ErrPluginNotAvailable, "bpf maps not pinned")
	if err := status(confJSON(t, "1.1.0", map[string]any{"socket": agent.socket, "failPolicy": "open"}, "")); err != nil {
		t.Errorf("failPolicy open, unhealthy agent: %v", err)
	}
	if n := len(agent.requests(api.PathHealthz)); n != 2 {
		t.Errorf("failPolicy open asked the agent: %d health requests, want 2", n)
	}
}

func TestGC(t *testing.T) {
	agent := newFakeAgent(t)
	r, stderr := newTestRunner()
	attachments := []map[string]string{{"containerID": "c-1", "ifname": "eth0"}, {"containerID": "c-2", "ifname": "net1"}}
	conf := confJSON(t, "1.1.0", map[string]any{"socket": agent.socket, "cni.dev/valid-attachments": attachments}, "")
	if err := r.cmdGC(&skel.CmdArgs{StdinData: conf}); err != nil {
		t.Fatal(err)
	}
	var got api.GCRequest
	if err := json.Unmarshal(agent.only(t, api.PathGC).Body, &got); err != nil {
		t.Fatal(err)
	}
	want := api.GCRequest{ValidAttachments: []api.Attachment{{ContainerID: "c-1", IfName: "eth0"}, {ContainerID: "c-2", IfName: "net1"}}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("GC request %+v, want %+v", got, want)
	}
	if !strings.Contains(stderr.String(), "removed=gone-1") {
		t.Errorf("GC result not logged:\n%s", stderr)
	}

	// No valid attachment left means every pod is stale: say so with [].
	if err := r.cmdGC(&skel.CmdArgs{StdinData: confJSON(t, "1.1.0", map[string]any{"socket": agent.socket}, "")}); err != nil {
		t.Fatal(err)
	}
	if body := agent.requests(api.PathGC)[1].Body; !strings.Contains(string(body), `"validAttachments":[]`) {
		t.Errorf("empty GC request %s", body)
	}

	missing := filepath.Join(t.TempDir(), "absent.sock")
	err := r.cmdGC(&skel.CmdArgs{StdinData: confJSON(t, "1.1.0", map[string]any{"socket": missing, "failPolicy": "open"}, "")})
	wantCode(t, err, types.ErrTryAgainLater, missing)
}
