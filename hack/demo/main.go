// Command demo brings up a simulated node on this machine: a bridge and
// pods in network namespaces created through the real CNI chain (bridge +
// host-local + meshlane-cni, via libcni), the meshlane agent with its
// datapath attached to a dedicated cgroup, a sidecar and an app in each
// pod, and traffic between them. It shows what meshlane does with
// meshlanectl, then tears everything down (also on Ctrl-C).
//
//	go run ./hack/demo [--pods 3] [--profile istio|linkerd] [--sockmap] [--wait]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/cninode"
	"github.com/meshlane/meshlane/test/podbin/wire"
	"github.com/meshlane/meshlane/test/testenv"
)

const appUID = 1000

func main() {
	pods := flag.Int("pods", 3, "pods on the simulated node (2-20)")
	profile := flag.String("profile", "istio", "mesh profile of the pods: istio or linkerd")
	sockmap := flag.Bool("sockmap", false, "turn on the sk_msg short-circuit (see docs/benchmarks.md for its kernel hazards)")
	requests := flag.Int("requests", 20, "connections each app opens to the next pod's app")
	wait := flag.Bool("wait", false, "keep the node up until Ctrl-C, for exploring with meshlanectl")
	scope := flag.String("cgroup-scope", "node", "where the agent attaches the cgroup programs: node (the demo's cgroup) or pod (each pod's own cgroup, passed to the chain as cgroupPath)")
	inbound := flag.String("inbound-hooks", "auto", "how the agent steers connections from other nodes into meshed pods: auto, tcx, tc (on the pod's interface) or sk_lookup (on its network namespace)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: demo [flags]\n\nBrings up a simulated meshlane node on this machine (root, Linux >= 5.15, cgroup v2).\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := run(options{pods: *pods, profile: *profile, sockmap: *sockmap, requests: *requests, wait: *wait, scope: *scope, inbound: *inbound}); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

// podCgroup is where p's processes run: its own cgroup in pod scope, the
// demo's otherwise.
func podCgroup(p *cninode.Pod, node *testenv.Cgroup) *testenv.Cgroup {
	if p.Cgroup != nil {
		return p.Cgroup
	}
	return node
}

// inboundArgs passes the demo's --inbound-hooks on to the agent, which
// checks the value.
func inboundArgs(mode string) []string {
	if mode == "" {
		return nil
	}
	return []string{"--inbound-hooks", mode}
}

// step prints what the demo does next.
func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...)
}

// teardown runs cleanup functions in reverse order.
type teardown []func() error

func (t *teardown) add(f func() error) { *t = append(*t, f) }

func (t teardown) run() {
	for i := len(t) - 1; i >= 0; i-- {
		if err := t[i](); err != nil {
			fmt.Fprintf(os.Stderr, "demo: teardown: %v\n", err)
		}
	}
}

// options are the demo's flags.
type options struct {
	pods     int
	profile  string
	sockmap  bool
	requests int
	wait     bool
	// scope is the agent's --cgroup-scope, inbound its --inbound-hooks
	// (empty: the agent's default).
	scope, inbound string
}

func run(o options) error {
	npods, profileName, sockmap, requests, wait := o.pods, o.profile, o.sockmap, o.requests, o.wait
	if o.scope != "node" && o.scope != "pod" {
		return fmt.Errorf("--cgroup-scope %q: want node or pod", o.scope)
	}
	if os.Geteuid() != 0 {
		return errors.New("run as root: the demo creates network namespaces, a cgroup and a bpffs mount")
	}
	if npods < 2 || npods > 20 {
		return errors.New("--pods must be between 2 and 20")
	}
	prof, err := mesh.ProfileByName(profileName)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var td teardown
	defer func() {
		step("tearing down: pods deleted through CNI, agent stopped, datapath detached, cgroup and bridge removed")
		td.run()
	}()

	work, err := os.MkdirTemp("", "meshlane-demo-*")
	if err != nil {
		return err
	}
	td.add(func() error { return os.RemoveAll(work) })

	step("building meshlane-agent, meshlane-cni, the reference bridge and host-local plugins, and the demo pods' program")
	bins, err := cninode.Build(filepath.Join(work, "bin"))
	if err != nil {
		return err
	}
	podbin, err := testenv.Podbin()
	if err != nil {
		return err
	}
	ctl := filepath.Join(work, "bin", "meshlanectl")
	if out, err := exec.Command("go", "build", "-o", ctl, "github.com/meshlane/meshlane/cmd/meshlanectl").CombinedOutput(); err != nil {
		return fmt.Errorf("build meshlanectl: %v\n%s", err, out)
	}

	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		return err
	}
	cg, err := testenv.NewCgroup(mount, "meshlane-demo")
	if err != nil {
		return err
	}
	td.add(cg.Destroy)
	bpffs, unmount, err := testenv.MountBPFFS()
	if err != nil {
		return err
	}
	// Unmounting the private bpffs drops the pinned links and maps: the
	// datapath detaches with it.
	td.add(unmount)
	v4, v6, err := testenv.FreeSubnets()
	if err != nil {
		return err
	}
	bridge := testenv.LinkName()
	td.add(func() error { return testenv.DeleteLink(bridge) })

	where := "cgroup " + cg.Path
	if o.scope == "pod" {
		where = "each meshed pod's own cgroup below " + cg.Path
	}
	step("starting meshlane-agent: datapath on %s, pins in %s, socket in %s", where, bpffs, work)
	node, err := cninode.Start(cninode.Options{
		Bin: bins, Dir: work, Cgroup: cg, PodCgroups: o.scope == "pod", BPFFS: filepath.Join(bpffs, "meshlane"),
		Bridge: bridge, Subnet4: v4, Subnet6: v6, Profile: prof.Name, Sockmap: sockmap,
		AgentLog: mustCreate(filepath.Join(work, "agent.log")), AgentArgs: inboundArgs(o.inbound),
	})
	if err != nil {
		return fmt.Errorf("%w (agent log: %s)", err, filepath.Join(work, "agent.log"))
	}
	td.add(node.Close)
	meshlanectl := func(args ...string) {
		cmd := exec.Command(ctl, append([]string{"--socket", node.Sock}, args...)...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		fmt.Printf("$ meshlanectl %s\n", strings.Join(args, " "))
		cmd.Run()
	}

	step("creating %d %s pods through libcni (bridge + host-local + meshlane-cni), subnets %s and %s", npods, prof.Name, v4, v6)
	scratch, err := os.MkdirTemp("", "meshlane-demo-events-*")
	if err != nil {
		return err
	}
	td.add(func() error { return os.RemoveAll(scratch) })
	if err := os.Chmod(scratch, 0o777|os.ModeSticky); err != nil {
		return err
	}
	type demoPod struct {
		*cninode.Pod
		events string
	}
	var pods []demoPod
	for i := range npods {
		name := fmt.Sprintf("app-%d", i)
		p, err := node.AddPod(ctx, "demo", name, map[string]string{prof.Marker: "{}"})
		if err != nil {
			return fmt.Errorf("CNI ADD %s: %w", name, err)
		}
		td.add(func() error { return node.DelPod(context.Background(), p) })
		fmt.Printf("    pod demo/%s  %s  %s  netns %s\n", name, p.IPv4, p.IPv6, p.NetnsPath)
		events := filepath.Join(scratch, name+".events")
		sidecarArgs := []string{podbin, "sidecar", "--events", events, "--ready", events + ".ready"}
		if prof.Name == mesh.Linkerd.Name {
			// linkerd2-proxy reaches the app from the pod's own address
			// (nothing puts ::6 on a Linkerd pod's lo).
			sidecarArgs = append(sidecarArgs, "--outbound", "127.0.0.1:4140,[::1]:4140", "--inbound", "0.0.0.0:4143,[::]:4143",
				"--passthrough-src", "")
		}
		for _, proc := range []testenv.ProcOpts{
			{UID: prof.ProxyUID, GID: prof.ProxyGID, Cgroup: podCgroup(p, cg), Args: sidecarArgs},
			{UID: appUID, GID: appUID, Cgroup: podCgroup(p, cg), Args: []string{podbin, "server", "--name", name, "--listen", "0.0.0.0:8080,[::]:8080", "--ready", events + ".app"}},
		} {
			pr, err := testenv.StartProc(p.NetnsPath, proc)
			if err != nil {
				return err
			}
			td.add(pr.Kill)
		}
		for _, f := range []string{events + ".ready", events + ".app"} {
			if err := testenv.WaitFile(f, 10*time.Second); err != nil {
				return err
			}
		}
		pods = append(pods, demoPod{Pod: p, events: events})
	}
	meshlanectl("pods")

	step("traffic: each app opens %d connections to the next pod's app (IPv4 and IPv6), no iptables anywhere", requests)
	for i, p := range pods {
		next := pods[(i+1)%len(pods)]
		for _, ip := range []netip.Addr{next.IPv4, next.IPv6} {
			to := netip.AddrPortFrom(ip, 8080).String()
			out := mustCreate(filepath.Join(work, fmt.Sprintf("client-%d-%s.out", i, ip)))
			pr, err := testenv.StartProc(p.NetnsPath, testenv.ProcOpts{UID: appUID, GID: appUID, Cgroup: podCgroup(p.Pod, cg), Stdout: out,
				Args: []string{podbin, "client", "--to", to, "--count", fmt.Sprint(requests), "--bytes", "4096"}})
			if err != nil {
				return err
			}
			if err := pr.Wait(60 * time.Second); err != nil {
				return fmt.Errorf("client %s -> %s: %v (see %s)", p.Name, to, err, out.Name())
			}
			fmt.Printf("    %s -> %-42s %d connections ok, 4 KiB echoed each\n", p.Name, to, requests)
		}
	}

	// A pod plays another node: not meshed, its client in a cgroup with no
	// programs, so no connect hook sees it; the tc program on each meshed
	// pod's eth0 steers its connections to the inbound sidecar.
	step("traffic from another node: a pod whose processes no connect hook sees connects to every app")
	remoteCg, err := testenv.NewCgroup(mount, "meshlane-demo-remote")
	if err != nil {
		return err
	}
	td.add(remoteCg.Destroy)
	remote, err := node.AddPod(ctx, "demo", "remote-node", nil)
	if err != nil {
		return fmt.Errorf("CNI ADD remote-node: %w", err)
	}
	td.add(func() error { return node.DelPod(context.Background(), remote) })
	for _, p := range pods {
		for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
			to := netip.AddrPortFrom(ip, 8080).String()
			out := mustCreate(filepath.Join(work, fmt.Sprintf("remote-%s.out", ip)))
			pr, err := testenv.StartProc(remote.NetnsPath, testenv.ProcOpts{UID: appUID, GID: appUID, Cgroup: remoteCg, Stdout: out,
				Args: []string{podbin, "client", "--to", to, "--count", fmt.Sprint(requests)}})
			if err != nil {
				return err
			}
			if err := pr.Wait(60 * time.Second); err != nil {
				return fmt.Errorf("client remote-node -> %s: %v (see %s)", to, err, out.Name())
			}
			fmt.Printf("    remote-node -> %-35s %d connections ok\n", to, requests)
		}
	}
	for _, p := range pods {
		ev, err := testenv.ReadEvents[wire.SidecarEvent](p.events)
		if err != nil {
			return err
		}
		out, in := 0, 0
		var sample string
		for _, e := range ev {
			if e.Event != wire.EventAccepted {
				continue
			}
			if e.Listener == wire.ListenerOutbound {
				out++
			} else {
				in++
			}
			if sample == "" {
				sample = fmt.Sprintf("%s listener got %s, SO_ORIGINAL_DST %s", e.Listener, e.Remote, e.OrigDst)
			}
		}
		fmt.Printf("    sidecar of %s: %d outbound, %d inbound connections (e.g. %s)\n", p.Name, out, in, sample)
	}
	meshlanectl("counters")
	meshlanectl("status")
	meshlanectl("check", pods[0].Name)

	if wait {
		step("the node stays up until Ctrl-C; try: %s --socket %s pods", ctl, node.Sock)
		<-ctx.Done()
	}
	return nil
}

func mustCreate(path string) *os.File {
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	return f
}
