package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

// istioNatRules is the IPv4 nat table istio-init (istio-iptables, default
// settings: every inbound port, every outbound address) leaves in a
// sidecar-injected pod, for profile p. Outbound TCP goes to the sidecar's
// outbound port unless the sidecar's own uid or gid sends it or it is for
// 127.0.0.1; the sidecar's passthrough from 127.0.0.6 is left alone; inbound
// TCP goes to the inbound port except for the sidecar's own ports.
func istioNatRules(p mesh.Profile) string {
	lines := []string{"*nat",
		":ISTIO_INBOUND - [0:0]", ":ISTIO_IN_REDIRECT - [0:0]", ":ISTIO_OUTPUT - [0:0]", ":ISTIO_REDIRECT - [0:0]",
		"-A PREROUTING -p tcp -j ISTIO_INBOUND",
		"-A OUTPUT -p tcp -j ISTIO_OUTPUT",
	}
	for _, port := range p.ProxyPorts {
		lines = append(lines, fmt.Sprintf("-A ISTIO_INBOUND -p tcp --dport %d -j RETURN", port))
	}
	lines = append(lines,
		"-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
		fmt.Sprintf("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports %d", p.InboundPort),
		fmt.Sprintf("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports %d", p.OutboundPort),
		"-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
	)
	// The sidecar calling its own pod's address over lo is inbound traffic;
	// the app's own loopback traffic stays put; the sidecar's upstream
	// connections leave as they are. Once for the uid, once for the gid.
	for _, owner := range []string{fmt.Sprintf("--uid-owner %d", p.ProxyUID), fmt.Sprintf("--gid-owner %d", p.ProxyGID)} {
		lines = append(lines,
			"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner "+owner+" -j ISTIO_IN_REDIRECT",
			"-A ISTIO_OUTPUT -o lo -m owner ! "+owner+" -j RETURN",
			"-A ISTIO_OUTPUT -m owner "+owner+" -j RETURN",
		)
	}
	lines = append(lines, "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN", "-A ISTIO_OUTPUT -j ISTIO_REDIRECT", "COMMIT")
	return strings.Join(lines, "\n") + "\n"
}

// istioInit loads istioNatRules into each pod's netns, as istio-init
// would have before the app started, with the first iptables-restore that
// works here (Debian's is the nftables one; the legacy one is the
// fallback). Without any, the test is skipped (a failure on CI).
func istioInit(e *env, pods ...*cninode.Pod) {
	e.t.Helper()
	rules := filepath.Join(e.t.TempDir(), "istio-nat")
	if err := os.WriteFile(rules, []byte(istioNatRules(mesh.Istio)), 0o644); err != nil {
		e.t.Fatal(err)
	}
	load := func(tool string, p *cninode.Pod) error {
		out, err := os.CreateTemp(e.t.TempDir(), "iptables-*")
		if err != nil {
			return err
		}
		defer out.Close()
		proc, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{Args: []string{tool, "--noflush", rules}, Stdout: out, Stderr: out})
		if err != nil {
			return err
		}
		if err := proc.Wait(15 * time.Second); err != nil {
			proc.Kill()
			b, _ := os.ReadFile(out.Name())
			return fmt.Errorf("%s in %s: %v: %s", tool, p.Name, err, b)
		}
		return nil
	}
	var tried []string
	for _, tool := range []string{"iptables-restore", "iptables-legacy-restore"} {
		path, err := exec.LookPath(tool)
		if err != nil {
			tried = append(tried, err.Error())
			continue
		}
		if err := load(path, pods[0]); err != nil {
			tried = append(tried, err.Error())
			continue
		}
		for _, p := range pods[1:] {
			if err := load(path, p); err != nil {
				e.t.Fatal(err)
			}
		}
		return
	}
	msg := "no iptables-restore loads the Istio rules here (apt-get install iptables): " + strings.Join(tried, "; ")
	if os.Getenv("CI") == "true" {
		e.t.Fatal(msg)
	}
	e.t.Skip(msg)
}

// TestUninstallUnderTrafficWithIptables: meshed pods that also hold the
// nat rules istio-init leaves (a mesh switched back to its own
// redirection, as docs/install.md's uninstall asks, or one that never
// stopped installing them) keep their requests flowing while the agent is
// stopped with SIGTERM and `meshlane-agent uninstall` removes the plugin
// and the datapath: no request fails, and every request still reaches both
// sidecars with the right original destination, through the eBPF
// redirect before and through iptables (conntrack answers SO_ORIGINAL_DST)
// after. The client's sidecar tells the two apart: the eBPF redirect
// connects the app to 127.0.0.1 from 127.0.0.1, iptables' REDIRECT keeps
// the pod address as the source.
//
// Without the rules (TestInstallAndUninstall) the requests after the
// uninstall succeed too, but go straight to the server, past the sidecars.
func TestUninstallUnderTrafficWithIptables(t *testing.T) {
	// Enough that plenty are left after the uninstall, which keeps serving
	// redirected connections for datapath.DetachGrace.
	const requests = 6000
	e := newEnvOpts(t, func(o *cninode.Options) { o.Install = true })
	client, server := e.add("client", istio()), e.add("server", istio())
	istioInit(e, client, server)
	scratch := testenv.ScratchDir(t)
	events := map[*cninode.Pod]string{}
	for _, p := range []*cninode.Pod{client, server} {
		ev := filepath.Join(scratch, "sidecar-"+p.Name)
		e.start(p, mesh.Istio.ProxyUID, "sidecar", "--events", ev, "--ready", ev+".ready")
		e.waitFile(ev + ".ready")
		events[p] = ev
	}
	e.startApp(server, "0.0.0.0:8080")
	to := netip.AddrPortFrom(server.IPv4, 8080).String()

	out, err := os.CreateTemp(t.TempDir(), "client-*")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	proc, err := testenv.StartProc(client.NetnsPath, testenv.ProcOpts{UID: 1000, GID: 1000, Cgroup: e.cg, Stdout: out,
		Args: []string{e.bin, "client", "--to", to, "--count", fmt.Sprint(requests), "--bytes", "512"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Kill() })

	// A sixth of the requests through the eBPF redirect first.
	deadline := time.Now().Add(time.Minute)
	for countLines(t, out.Name()) < requests/6 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d requests done after a minute", countLines(t, out.Name()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := e.node.StopAgent(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	uninstall := exec.Command(binaries(t).Agent, "uninstall", "--log-format", "console",
		"--cni-bin-dir", e.node.BinDir, "--cni-conf-dir", e.node.ConfDir, "--bpffs", e.bpffs)
	if b, err := uninstall.CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v\n%s", err, b)
	}
	done := time.Now()
	atUninstall := countLines(t, out.Name())
	if atUninstall >= requests*2/3 {
		t.Fatalf("%d of %d requests were done by the end of the uninstall: too few left to show the iptables path", atUninstall, requests)
	}
	if _, err := os.Stat(e.bpffs); !os.IsNotExist(err) {
		t.Fatalf("datapath pins still there after uninstall: %v", err)
	}
	if err := proc.Wait(5 * time.Minute); err != nil {
		t.Errorf("client: %v", err)
	}

	ok, failed := 0, 0
	f, err := os.Open(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var firstErr string
	for sc.Scan() {
		var r wire.ClientResult
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.OK && r.Match {
			ok++
			continue
		}
		failed++
		if firstErr == "" {
			firstErr = sc.Text()
		}
	}

	// The client's sidecar: which redirect brought each request.
	viaBPF, viaIptables, wrong, bpfAfter := 0, 0, 0, 0
	cev, err := testenv.ReadEvents[wire.SidecarEvent](events[client])
	if err != nil {
		t.Fatal(err)
	}
	// Connections a sidecar could not relay, to name the cause of a
	// failure: the redirect's last moments during the uninstall.
	var lost []string
	for _, x := range cev {
		if x.Event != wire.EventAccepted || x.Listener != wire.ListenerOutbound {
			continue
		}
		if x.OrigDst != to {
			wrong++
			lost = append(lost, fmt.Sprintf("client sidecar at %s: %s%s", x.Time.Format("15:04:05.000000"), x.OrigErr, x.UpstreamErr))
			continue
		}
		src, err := netip.ParseAddrPort(x.Remote)
		switch {
		case err != nil:
			wrong++
		case src.Addr() == client.IPv4:
			viaIptables++
		case src.Addr().IsLoopback():
			viaBPF++
			if x.Time.After(done) {
				bpfAfter++
			}
		default:
			wrong++
		}
	}
	inbound := 0
	sev, err := testenv.ReadEvents[wire.SidecarEvent](events[server])
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range sev {
		if x.Event != wire.EventAccepted || x.Listener != wire.ListenerInbound {
			continue
		}
		if x.OrigDst == to && x.UpstreamErr == "" {
			inbound++
		} else {
			lost = append(lost, fmt.Sprintf("server sidecar at %s: %s%s", x.Time.Format("15:04:05.000000"), x.OrigErr, x.UpstreamErr))
		}
	}
	t.Logf("%d requests, uninstall (agent stopped with SIGTERM first) took %s with %d done: %d ok, %d failed; "+
		"client sidecar: %d via eBPF, %d via iptables, %d wrong; server sidecar: %d inbound with the right original destination",
		requests, done.Sub(began).Round(time.Millisecond), atUninstall, ok, failed, viaBPF, viaIptables, wrong, inbound)
	if failed != 0 || ok != requests {
		t.Fatalf("%d of %d requests ok, %d failed; first failure: %s; uninstall ran from %s to %s; connections the sidecars could not relay:\n%s",
			ok, requests, failed, firstErr, began.Format("15:04:05.000000"), done.Format("15:04:05.000000"), strings.Join(lost, "\n"))
	}
	if viaBPF+viaIptables != requests || wrong != 0 || inbound != requests {
		t.Fatalf("not every request reached both sidecars with its original destination")
	}
	if viaBPF == 0 || viaIptables == 0 || bpfAfter != 0 {
		t.Fatalf("want requests via eBPF before the uninstall and only via iptables after it (%d via eBPF after it)", bpfAfter)
	}
}
