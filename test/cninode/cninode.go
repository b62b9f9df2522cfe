// Package cninode runs a simulated Kubernetes node on this machine: the
// meshlane agent with its datapath attached to a cgroup, and a CNI chain
// of the reference bridge and host-local plugins with meshlane-cni chained
// last, through which pods are created and deleted with libcni exactly as
// containerd does. End-to-end tests and `make demo` use it.
package cninode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/test/testenv"
)

// Binaries are the programs a node runs.
type Binaries struct {
	Dir   string // the CNI bin dir: bridge, host-local, meshlane-cni
	Agent string
}

// Build compiles the node's programs into dir: the reference CNI plugins
// come from the module proxy at the versions go.mod pins as tools.
func Build(dir string) (Binaries, error) {
	root, err := moduleRoot()
	if err != nil {
		return Binaries{}, err
	}
	cmd := exec.Command("go", "build", "-o", dir+"/",
		"github.com/containernetworking/plugins/plugins/main/bridge",
		"github.com/containernetworking/plugins/plugins/ipam/host-local",
		"./cmd/meshlane-cni", "./cmd/meshlane-agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return Binaries{}, fmt.Errorf("build node binaries: %v\n%s", err, out)
	}
	return Binaries{Dir: dir, Agent: filepath.Join(dir, "meshlane-agent")}, nil
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the meshlane module: run from the repository")
	}
	return filepath.Dir(mod), nil
}

// Options configure a node.
type Options struct {
	Bin Binaries
	// Dir holds the node's socket, state, CNI cache and IPAM data.
	Dir string
	// Cgroup the agent attaches the datapath to; pod processes go there.
	// With PodCgroups, every pod gets a cgroup of its own below it.
	Cgroup *testenv.Cgroup
	// PodCgroups runs the agent with --cgroup-scope pod: each pod gets a
	// cgroup below Cgroup before its ADD, as kubelet makes one before the
	// sandbox, passed to the chain as the cgroupPath capability (relative
	// to the cgroup2 mount, as containerd passes it with the cgroupfs
	// driver), and removed after its DEL.
	PodCgroups bool
	// BPFFS is the agent's pin directory, on a bpf filesystem.
	BPFFS string
	// CNIVersion of the conflist (what the runtime injects into every
	// plugin); default 1.1.0.
	CNIVersion string
	// Bridge name, and its subnets.
	Bridge           string
	Subnet4, Subnet6 netip.Prefix
	// Profile is the agent's default mesh profile (istio when empty).
	Profile string
	// Sockmap turns on the short-circuit.
	Sockmap bool
	// FailPolicy of the plugin ("closed" when empty).
	FailPolicy string
	// AgentLog receives the agent's output.
	AgentLog io.Writer
	// AgentArgs are extra agent flags.
	AgentArgs []string
	// Install has the agent install the plugin itself, as in the
	// DaemonSet: the node starts with a primary conflist that does not
	// name meshlane-cni and a CNI bin dir without it, and the chain used
	// for pods is whatever the agent's installer wrote.
	Install bool
	// Unchained runs the primary network alone, without meshlane-cni and
	// with no agent: the baseline that shows what meshlane adds to a
	// pod's CNI ADD and DEL.
	Unchained bool
}

// Node is a running simulated node.
type Node struct {
	opts  Options
	cni   *libcni.CNIConfig
	list  *libcni.NetworkConfigList
	Sock  string
	State string
	// BinDir and ConfDir are the node's CNI directories in Install mode.
	BinDir, ConfDir string

	mu    sync.Mutex
	agent *exec.Cmd
	done  chan error
}

// Start writes the conflist and starts the agent (none when Unchained).
func Start(opts Options) (*Node, error) {
	if opts.CNIVersion == "" {
		opts.CNIVersion = "1.1.0"
	}
	if opts.Profile == "" {
		opts.Profile = "istio"
	}
	if opts.FailPolicy == "" {
		opts.FailPolicy = "closed"
	}
	n := &Node{opts: opts, Sock: filepath.Join(opts.Dir, "run", "meshlane.sock"), State: filepath.Join(opts.Dir, "state")}
	if opts.Install && opts.Unchained {
		return nil, errors.New("options Install and Unchained exclude each other: the installer chains meshlane-cni")
	}
	if opts.Install {
		return n, n.startInstalled()
	}
	conf, err := n.Conflist()
	if err != nil {
		return nil, err
	}
	if n.list, err = libcni.NetworkConfFromBytes(conf); err != nil {
		return nil, fmt.Errorf("parse conflist: %w", err)
	}
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{opts.Bin.Dir}, filepath.Join(opts.Dir, "cni-cache"), newPluginClock())
	if opts.Unchained {
		return n, nil
	}
	if err := n.StartAgent(); err != nil {
		return nil, err
	}
	return n, nil
}

// startInstalled prepares a node whose CNI directories hold only the
// primary network, starts the agent with its installer, and loads the
// chain the installer wrote, as the runtime would.
func (n *Node) startInstalled() error {
	n.BinDir, n.ConfDir = filepath.Join(n.opts.Dir, "cni-bin"), filepath.Join(n.opts.Dir, "net.d")
	for _, d := range []string{n.BinDir, n.ConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	for _, p := range []string{"bridge", "host-local"} {
		if err := os.Link(filepath.Join(n.opts.Bin.Dir, p), filepath.Join(n.BinDir, p)); err != nil {
			return fmt.Errorf("stage CNI plugin %s: %w", p, err)
		}
	}
	conf, err := n.conflist(false)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(n.ConfDir, "10-primary.conflist"), conf, 0o644); err != nil {
		return err
	}
	n.opts.AgentArgs = append(n.opts.AgentArgs, "--install-cni",
		"--cni-bin-dir", n.BinDir, "--cni-conf-dir", n.ConfDir,
		"--plugin-src", filepath.Join(n.opts.Bin.Dir, "meshlane-cni"))
	// Ready means the datapath is attached and the plugin chained.
	if err := n.StartAgent(); err != nil {
		return err
	}
	return n.LoadChain()
}

// LoadChain reads the network the runtime would use now: the first config
// file in the conf dir (Install mode).
func (n *Node) LoadChain() error {
	files, err := libcni.ConfFiles(n.ConfDir, []string{".conf", ".conflist", ".json"})
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no CNI config in %s: %v", n.ConfDir, err)
	}
	if n.list, err = libcni.ConfListFromFile(files[0]); err != nil {
		return fmt.Errorf("load %s: %w", files[0], err)
	}
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{n.BinDir}, filepath.Join(n.opts.Dir, "cni-cache"), newPluginClock())
	return nil
}

// Conflist is the node's CNI configuration: the primary network (bridge +
// host-local) with meshlane-cni chained last, declaring the capability
// that makes the runtime pass pod annotations; the primary network alone
// when the node is Unchained.
func (n *Node) Conflist() ([]byte, error) { return n.conflist(!n.opts.Unchained) }

func (n *Node) conflist(chained bool) ([]byte, error) {
	var ranges [][]map[string]string
	for _, p := range []netip.Prefix{n.opts.Subnet4, n.opts.Subnet6} {
		if p.IsValid() {
			ranges = append(ranges, []map[string]string{{"subnet": p.String()}})
		}
	}
	plugins := []any{
		map[string]any{
			"type":             "bridge",
			"bridge":           n.opts.Bridge,
			"isGateway":        true,
			"isDefaultGateway": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  ranges,
				"dataDir": filepath.Join(n.opts.Dir, "ipam"),
			},
		},
	}
	if chained {
		plugins = append(plugins, map[string]any{
			"type":         "meshlane-cni",
			"socket":       n.Sock,
			"failPolicy":   n.opts.FailPolicy,
			"timeout":      "5s",
			"logLevel":     "warn",
			"capabilities": map[string]bool{"io.kubernetes.cri.pod-annotations": true, "cgroupPath": true},
		})
	}
	conf := map[string]any{"cniVersion": n.opts.CNIVersion, "name": "meshlane-test", "plugins": plugins}
	return json.MarshalIndent(conf, "", "  ")
}

// StartAgent starts meshlane-agent and waits until its socket answers
// /readyz.
func (n *Node) StartAgent() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent != nil {
		return errors.New("agent already running")
	}
	args := []string{
		"--socket", n.Sock,
		"--bpffs", n.opts.BPFFS,
		"--cgroup", n.opts.Cgroup.Path,
		"--state-dir", n.State,
		"--profile", n.opts.Profile,
		"--log-format", "console",
		fmt.Sprintf("--sockmap=%v", n.opts.Sockmap),
		"--cgroup-scope", scope(n.opts.PodCgroups),
		// No TCP probe port: several simulated nodes may run at once.
		"--probe-addr=",
	}
	cmd := exec.Command(n.opts.Bin.Agent, append(args, n.opts.AgentArgs...)...)
	cmd.Stdout, cmd.Stderr = n.opts.AgentLog, n.opts.AgentLog
	// The agent must not be a pod process: keep it out of the test
	// cgroup, and let it die with us. Its own process group keeps a
	// terminal's Ctrl-C (sent to the whole foreground group) off it, so
	// `make demo` can still DEL its pods through it before stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	n.agent, n.done = cmd, done
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := n.ready(); err == nil {
			return nil
		}
		select {
		case err := <-done:
			n.agent = nil
			return fmt.Errorf("agent exited during start: %v (see its log)", err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("agent not ready within 30s (see its log)")
		}
	}
}

func scope(podCgroups bool) string {
	if podCgroups {
		return "pod"
	}
	return "node"
}

// AgentPid is the running agent's process ID, 0 when no agent runs: for
// reading its memory and CPU time in /proc.
func (n *Node) AgentPid() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent == nil {
		return 0
	}
	return n.agent.Process.Pid
}

func (n *Node) ready() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return api.NewClient(n.Sock).Ready(ctx)
}

// StopAgent sends sig to the agent and waits for it to exit.
func (n *Node) StopAgent(sig syscall.Signal) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent == nil {
		return nil
	}
	n.agent.Process.Signal(sig)
	select {
	case <-n.done:
	case <-time.After(20 * time.Second):
		n.agent.Process.Kill()
		<-n.done
		return errors.New("agent did not stop within 20s of the signal; killed")
	}
	n.agent = nil
	return nil
}

// Pod is a pod created through the CNI chain.
type Pod struct {
	Name, Namespace string
	ContainerID     string
	NetnsPath       string
	IPv4, IPv6      netip.Addr
	Annotations     map[string]string
	// AddTook and DelTook are how long the chain's ADD and DEL took
	// through libcni, namespace set-up and removal left out; DelTook is
	// set by DelPod. AddPlugins and DelPlugins split them by plugin (file
	// name): each plugin process's time within that call.
	AddTook, DelTook       time.Duration
	AddPlugins, DelPlugins map[string]time.Duration
	// Cgroup is the pod's own cgroup (PodCgroups); nil otherwise.
	Cgroup *testenv.Cgroup
	// cgroupPath is Cgroup as the runtime names it to the chain.
	cgroupPath string
	rt         *libcni.RuntimeConf
}

func (n *Node) runtimeConf(p *Pod) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{
		ContainerID: p.ContainerID,
		NetNS:       p.NetnsPath,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
			{"K8S_POD_UID", "uid-" + p.ContainerID},
		},
	}
	rt.CapabilityArgs = map[string]any{}
	if p.Annotations != nil {
		rt.CapabilityArgs["io.kubernetes.cri.pod-annotations"] = p.Annotations
	}
	if p.Cgroup != nil {
		rt.CapabilityArgs["cgroupPath"] = p.cgroupPath
	}
	return rt
}

// sandbox creates a pod's netns with lo up, as a runtime does before it
// runs the chain (containerd brings lo up itself; it is not part of the
// conflist, and the redirect to the sidecar's loopback listener needs it).
func (n *Node) sandbox(namespace, name string, annotations map[string]string) (*Pod, error) {
	path, err := testenv.CreateNetns(name)
	if err != nil {
		return nil, err
	}
	err = testenv.InNetns(path, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		testenv.DeleteNetns(path)
		return nil, fmt.Errorf("bring up lo in %s: %w", path, err)
	}
	p := &Pod{Name: name, Namespace: namespace, ContainerID: "ctr-" + filepath.Base(path), NetnsPath: path, Annotations: annotations}
	if n.opts.PodCgroups {
		if err := n.podCgroup(p); err != nil {
			testenv.DeleteNetns(path)
			return nil, err
		}
	}
	p.rt = n.runtimeConf(p)
	return p, nil
}

// podCgroup makes the pod's own cgroup below the node's.
func (n *Node) podCgroup(p *Pod) error {
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		return err
	}
	cg, err := testenv.NewCgroup(n.opts.Cgroup.Path, "pod-"+filepath.Base(p.NetnsPath))
	if err != nil {
		return err
	}
	p.Cgroup, p.cgroupPath = cg, strings.TrimPrefix(cg.Path, mount)
	return nil
}

// removeSandbox drops the pod's netns and cgroup, as a runtime and kubelet
// do once the pod is gone.
func removeSandbox(p *Pod) error {
	err := testenv.DeleteNetns(p.NetnsPath)
	if p.Cgroup != nil {
		err = errors.Join(err, p.Cgroup.Destroy())
	}
	return err
}

// AddPod creates the pod's netns and runs the chain's ADD. annotations nil
// means the runtime passes none (the agent then waits for a sidecar).
func (n *Node) AddPod(ctx context.Context, namespace, name string, annotations map[string]string) (*Pod, error) {
	p, err := n.sandbox(namespace, name, annotations)
	if err != nil {
		return nil, err
	}
	tctx, times := timePlugins(ctx)
	start := time.Now()
	res, err := n.cni.AddNetworkList(tctx, n.list, p.rt)
	p.AddTook, p.AddPlugins = time.Since(start), times.get()
	if err != nil {
		// What a runtime does when ADD fails: DEL, then drop the sandbox.
		n.cni.DelNetworkList(ctx, n.list, p.rt)
		removeSandbox(p)
		return nil, err
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, err
	}
	for _, ip := range r.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		a = a.Unmap()
		if a.Is4() {
			p.IPv4 = a
		} else {
			p.IPv6 = a
		}
	}
	return p, nil
}

// DelPod runs the chain's DEL and removes the netns.
func (n *Node) DelPod(ctx context.Context, p *Pod) error {
	tctx, times := timePlugins(ctx)
	start := time.Now()
	err := n.cni.DelNetworkList(tctx, n.list, p.rt)
	p.DelTook, p.DelPlugins = time.Since(start), times.get()
	return errors.Join(err, removeSandbox(p))
}

// CheckPod runs the chain's CHECK.
func (n *Node) CheckPod(ctx context.Context, p *Pod) error {
	return n.cni.CheckNetworkList(ctx, n.list, p.rt)
}

// Status runs the chain's STATUS.
func (n *Node) Status(ctx context.Context) error {
	return n.cni.GetStatusNetworkList(ctx, n.list)
}

// GC runs the chain's GC with the pods the runtime still has.
func (n *Node) GC(ctx context.Context, keep []*Pod) error {
	var valid []types.GCAttachment
	for _, p := range keep {
		valid = append(valid, types.GCAttachment{ContainerID: p.ContainerID, IfName: "eth0"})
	}
	return n.cni.GCNetworkList(ctx, n.list, &libcni.GCArgs{ValidAttachments: valid})
}

// Close stops the agent (a restart, not an uninstall: pins stay).
func (n *Node) Close() error {
	return n.StopAgent(syscall.SIGTERM)
}
