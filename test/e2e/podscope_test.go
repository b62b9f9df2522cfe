package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/podns"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/testenv"
)

// cgroupHooks are the hooks TestPodCgroupScope counts programs on.
var cgroupHooks = []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt}

// waitPrograms fails the test unless processes in cg come to run want
// meshlane programs on each hook.
func waitPrograms(t *testing.T, cg *testenv.Cgroup, want int, what string) {
	t.Helper()
	if err := cg.WaitMeshlanePrograms(want, cgroupHooks...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// TestPodCgroupScope: with --cgroup-scope pod and a runtime that passes
// cgroupPath, a meshed pod created through libcni is redirected from its
// first connection by programs on its own cgroup, while a pod that is not
// meshed runs none; meshlanectl check names the pod's cgroup; an agent
// restart keeps the redirect; DEL detaches the programs.
func TestPodCgroupScope(t *testing.T) {
	e := newEnvOpts(t, func(o *cninode.Options) { o.PodCgroups = true })
	client := e.add("client", istio())
	server := e.add("server", map[string]string{})
	if client.Cgroup == nil || server.Cgroup == nil {
		t.Fatal("the node made no pod cgroups")
	}
	e.startApp(server, "0.0.0.0:8080,[::]:8080")

	waitPrograms(t, client.Cgroup, 1, "meshed pod")
	waitPrograms(t, server.Cgroup, 0, "pod not meshed")
	waitPrograms(t, e.cg, 0, "the node's cgroup")

	for _, ip := range []string{server.IPv4.String() + ":8080", "[" + server.IPv6.String() + "]:8080"} {
		redirected(e, client, ip)
	}

	var rep api.CheckReport
	e.ctlJSON(0, &rep, "check", "default/client")
	found := false
	for _, c := range rep.Checks {
		if c.Name == "pod cgroup hooks" {
			found = c.OK && strings.Contains(c.Detail, client.Cgroup.Path)
		}
	}
	if !found {
		t.Fatalf("meshlanectl check: no passing pod cgroup hooks check naming %s: %+v", client.Cgroup.Path, rep.Checks)
	}

	if err := e.node.StopAgent(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	redirected(e, client, server.IPv4.String()+":8080") // no agent: the pins carry it
	if err := e.node.StartAgent(); err != nil {
		t.Fatalf("%v\n%s", err, e.log)
	}
	waitPrograms(t, client.Cgroup, 1, "meshed pod after a restart")
	redirected(e, client, server.IPv4.String()+":8080")

	cookie, err := podns.NetnsCookie(client.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.node.DelPod(context.Background(), client); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.bpffs, "cgroups", strconv.FormatUint(cookie, 10))); !os.IsNotExist(err) {
		t.Fatalf("the deleted pod's links are still pinned: %v", err)
	}
}
