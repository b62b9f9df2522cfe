package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// pluginTypes lists the plugin types of a conflist file.
func pluginTypes(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Type)
	}
	return types
}

// TestInstallAndUninstall: the agent's own installer (the DaemonSet mode)
// copies the plugin and chains the primary conflist; a pod created through
// that chain is redirected; `meshlane-agent uninstall` removes the entry,
// the binary and the datapath, and new requests of the running pods then
// go the normal way and succeed.
func TestInstallAndUninstall(t *testing.T) {
	e := newEnvOpts(t, func(o *cninode.Options) { o.Install = true })
	conf := filepath.Join(e.node.ConfDir, "10-primary.conflist")
	if got := strings.Join(pluginTypes(t, conf), ","); got != "bridge,meshlane-cni" {
		t.Fatalf("installed chain %s, want bridge,meshlane-cni", got)
	}
	if _, err := os.Stat(filepath.Join(e.node.BinDir, "meshlane-cni")); err != nil {
		t.Fatalf("plugin not installed: %v", err)
	}

	client, server, events := meshedPair(e)
	to := fmt.Sprintf("%s:8080", server.IPv4)
	if out, err := runIn(e, client, 1000, "client", "--to", to); err != nil {
		t.Fatalf("client: %v %s", err, out)
	}
	ev, _ := testenv.ReadEvents[wire.SidecarEvent](events)
	if !hasOrig(ev, to) {
		t.Fatalf("the pod made through the installed chain was not redirected: %+v", ev)
	}

	if err := e.node.StopAgent(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	uninstall := exec.Command(binaries(t).Agent, "uninstall", "--log-format", "console",
		"--cni-bin-dir", e.node.BinDir, "--cni-conf-dir", e.node.ConfDir, "--bpffs", e.bpffs)
	if out, err := uninstall.CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if got := strings.Join(pluginTypes(t, conf), ","); got != "bridge" {
		t.Fatalf("after uninstall the chain is %s, want bridge", got)
	}
	if _, err := os.Stat(filepath.Join(e.node.BinDir, "meshlane-cni")); !os.IsNotExist(err) {
		t.Fatalf("plugin binary still there: %v", err)
	}
	if _, err := os.Stat(e.bpffs); !os.IsNotExist(err) {
		t.Fatalf("datapath pins still there: %v", err)
	}
	// A second uninstall finds nothing to do.
	if out, err := exec.Command(uninstall.Path, uninstall.Args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("second uninstall: %v\n%s", err, out)
	}

	seen := len(ev)
	if out, err := runIn(e, client, 1000, "client", "--to", to); err != nil {
		t.Fatalf("a new request after uninstall failed: %v %s", err, out)
	}
	ev, _ = testenv.ReadEvents[wire.SidecarEvent](events)
	if len(ev) != seen {
		t.Fatalf("requests still redirected after uninstall: %+v", ev[seen:])
	}

	// The runtime tears pods down with the config it now reads.
	if err := e.node.LoadChain(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*cninode.Pod{client, server} {
		if err := e.node.DelPod(context.Background(), p); err != nil {
			t.Fatalf("DEL after uninstall: %v", err)
		}
	}
}
