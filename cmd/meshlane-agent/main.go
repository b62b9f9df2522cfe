// Command meshlane-agent is the meshlane node agent: it loads and pins the
// eBPF datapath, takes pod reports from the meshlane-cni plugin on a
// root-only unix socket and keeps the datapath's pod maps current.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/mountinfo"
	"github.com/meshlane/meshlane/daemon/podcgroup"
)

// shutdownTimeout bounds the wait for requests in flight at SIGTERM; the
// plugin retries anything cut off.
const shutdownTimeout = 10 * time.Second

// DefaultProbeAddr serves /healthz, /readyz and /metrics over TCP. It is
// loopback only: the agent runs in the host network, so a kubelet probe
// must name host 127.0.0.1, and a Prometheus scraping from elsewhere needs
// --probe-addr on a reachable address.
const DefaultProbeAddr = "127.0.0.1:15999"

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

type options struct {
	socket string
	bpffs  string
	cgroup string
	// cgroupScope is datapath.ScopeNode or datapath.ScopePod.
	cgroupScope string
	stateDir    string
	logLevel    string
	logFormat   string
	profile     string
	sockmap     bool
	inbound     string
	gcInterval  time.Duration
	probeAddr   string
	installCNI  bool
	cni         cniFlags
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "uninstall" {
		err := runUninstall(os.Args[2:], os.Stderr)
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "meshlane-agent uninstall: %v\n", err)
			os.Exit(1)
		}
		return
	}
	opts, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "meshlane-agent: %v\n", err)
		os.Exit(2)
	}
	log, err := newLogger(opts.logLevel, opts.logFormat)
	if err != nil {
		fmt.Fprintf(os.Stderr, "meshlane-agent: %v\n", err)
		os.Exit(2)
	}
	defer log.Sync()
	if err := run(opts, log); err != nil {
		log.Error("meshlane-agent stopped", zap.Error(err))
		log.Sync()
		os.Exit(1)
	}
}

// parseFlags reads the command line; --help prints the usage to out and
// returns flag.ErrHelp.
func parseFlags(args []string, out io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("meshlane-agent", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: meshlane-agent [flags]\n       meshlane-agent uninstall [flags]\n\n"+
			"Loads and pins the meshlane eBPF datapath and serves the CNI plugin on a\n"+
			"root-only unix socket. Stopping the agent keeps the pinned datapath working;\n"+
			"`uninstall` removes meshlane from the node (see its --help).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.socket, "socket", api.DefaultSocket, "unix socket the CNI plugin connects to")
	fs.StringVar(&o.bpffs, "bpffs", datapath.DefaultBPFFS, "pin directory on a bpf filesystem")
	fs.StringVar(&o.cgroup, "cgroup", "", "cgroup v2 directory to attach to; with --cgroup-scope pod, the directory every pod cgroup must lie in (default: root of the cgroup2 mount in /proc/self/mountinfo)")
	fs.StringVar(&o.cgroupScope, "cgroup-scope", datapath.ScopeNode, "where the connect, sendmsg, recvmsg, sockops and getsockopt programs attach: node (once, to --cgroup: every process below it runs them) or pod (to each meshed pod's own cgroup, from the runtime's cgroupPath: containerd >= 1.7, CRI-O >= 1.28; other processes never run them)")
	fs.StringVar(&o.stateDir, "state-dir", "/var/run/meshlane/state", "directory of the pod registry (one state file per pod under pods/)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "json or console")
	fs.StringVar(&o.profile, "profile", mesh.Istio.Name, "default mesh for pods whose annotations the runtime does not pass: istio or linkerd")
	// Off by default: the sockmap fast path's default follows the
	// measurements recorded in docs.
	fs.BoolVar(&o.sockmap, "sockmap", false, "enable the sockops/sk_msg fast path between local sockets")
	fs.StringVar(&o.inbound, "inbound-hooks", datapath.InboundAuto, "how the program that steers connections from other nodes to the inbound sidecar attaches to meshed pods: sk_lookup (on the pod network namespace, about 0.06 ms of its ADD; a pod whose sidecar listens with MPTCP also gets the tc program), tcx (on the pod interface, Linux >= 6.6; about 12 ms of its ADD), tc (classic clsact filters), or auto (sk_lookup where the kernel has a TCP socket iterator with BTF, else tcx, else tc)")
	fs.DurationVar(&o.gcInterval, "gc-interval", agent.DefaultGCInterval, "period of the check for pods whose network namespace is gone")
	fs.BoolVar(&o.installCNI, "install-cni", false, "install meshlane-cni into the host's CNI directories and keep it chained (the DaemonSet's mode)")
	o.cni.register(fs)
	fs.StringVar(&o.probeAddr, "probe-addr", DefaultProbeAddr, "TCP address serving /healthz, /readyz and /metrics (Prometheus) for the kubelet and scrapers; empty disables it")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments %q: see --help", fs.Args())
	}
	if o.gcInterval <= 0 {
		return options{}, fmt.Errorf("--gc-interval %s must be positive", o.gcInterval)
	}
	return o, nil
}

func newLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	var cfg zap.Config
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
	case "console":
		cfg = zap.NewDevelopmentConfig()
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	// Every pod event is one line; sampling would drop some under churn.
	cfg.Sampling = nil
	return cfg.Build()
}

func run(o options, log *zap.Logger) error {
	profile, err := mesh.ProfileByName(o.profile)
	if err != nil {
		return fmt.Errorf("--profile: %w", err)
	}
	if o.cgroup == "" {
		o.cgroup, err = cgroup2Root("/proc/self/mountinfo")
		if err != nil {
			return err
		}
	}
	var pods *podcgroup.Resolver
	switch o.cgroupScope {
	case datapath.ScopeNode:
	case datapath.ScopePod:
		if pods, err = podCgroups("/proc/self/mountinfo", o.cgroup); err != nil {
			return err
		}
	default:
		return fmt.Errorf("--cgroup-scope %q: want %s or %s", o.cgroupScope, datapath.ScopeNode, datapath.ScopePod)
	}

	// Loaded detached: the pods are restored into the maps before the
	// programs are swapped in, which matters after an upgrade that changed
	// a map layout (the new maps start empty).
	dp, err := datapath.LoadDetached(datapath.Options{BPFFS: o.bpffs, CgroupPath: o.cgroup, Scope: o.cgroupScope, Sockmap: o.sockmap, Inbound: o.inbound, Logger: log})
	if err != nil {
		return err
	}
	// Close releases this process's handles only: the pins stay, so pods
	// keep being redirected while the agent restarts.
	defer func() {
		if err := dp.Close(); err != nil {
			log.Warn("closing the datapath handles", zap.Error(err))
		}
	}()

	var ready, attached atomic.Bool
	var inst *installer
	if o.installCNI {
		inst = &installer{}
	}
	a, err := agent.New(agent.Config{
		Maps:       dp,
		Profile:    profile,
		StateDir:   o.stateDir,
		GCInterval: o.gcInterval,
		Logger:     log,
		Debug:      dp,
		Version:    version,
		PodCgroups: pods,
		// Ready only when the datapath is attached and, in the DaemonSet,
		// the plugin is installed and chained.
		Ready: func() (bool, string) {
			if !attached.Load() {
				return false, "datapath not attached"
			}
			if !ready.Load() {
				return false, "shutting down"
			}
			if inst != nil {
				return inst.ready()
			}
			return true, ""
		},
	})
	if err != nil {
		return err
	}
	defer a.Close()
	// Restore before the socket exists, so the plugin never reaches an
	// agent that has not recovered its pods.
	if err := a.Restore(); err != nil {
		return err
	}
	if err := dp.Attach(); err != nil {
		return err
	}
	attached.Store(true)
	if inst != nil {
		a.SetInstallState(inst.status)
	}
	l, err := agent.ListenUnix(o.socket)
	if err != nil {
		return err
	}
	probes, err := listenProbes(o.probeAddr, a, log)
	if err != nil {
		l.Close()
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- a.Serve(l) }()
	// Without a probe address probed stays nil and never fires.
	var probed chan error
	if probes.srv != nil {
		probed = make(chan error, 1)
		go func() { probed <- probes.serve() }()
	}
	// The socket serves before the plugin is chained: the first pod that
	// goes through meshlane-cni finds an agent.
	installed := make(chan error, 1)
	if inst != nil {
		go func() { installed <- watchInstall(ctx, o.cni.config(o.socket, log), inst) }()
	}
	ready.Store(true)
	log.Info("meshlane-agent serving", zap.String("socket", o.socket), zap.String("probe_addr", probes.addr()),
		zap.String("profile", profile.Name), zap.String("cgroup", o.cgroup), zap.String("state_dir", o.stateDir),
		zap.String("version", version))

	var failed error
	select {
	case err := <-served:
		failed = fmt.Errorf("socket server: %w", err)
	case err := <-probed:
		failed = fmt.Errorf("probe server on %s: %w", o.probeAddr, err)
	case err := <-installed:
		failed = err
	case <-ctx.Done():
		log.Info("signal received: stopping; the pinned datapath keeps redirecting")
	}
	ready.Store(false)
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := a.Shutdown(sctx); err != nil {
		log.Warn("requests still in flight at shutdown were cut off; the plugin retries them", zap.Error(err))
	}
	probes.shutdown(sctx)
	if failed != nil {
		return failed
	}
	return <-served
}

// probeServer serves the agent's probe handler over TCP; with no address
// it does nothing.
type probeServer struct {
	srv *http.Server
	l   net.Listener
}

func listenProbes(addr string, a *agent.Agent, log *zap.Logger) (*probeServer, error) {
	if addr == "" {
		return &probeServer{}, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--probe-addr: listen on %s: %w (choose a free port, or empty to disable)", addr, err)
	}
	return &probeServer{l: l, srv: &http.Server{
		Handler:           a.ProbeHandler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          zap.NewStdLog(log.Named("probes")),
	}}, nil
}

func (p *probeServer) addr() string {
	if p.l == nil {
		return ""
	}
	return p.l.Addr().String()
}

// serve blocks until shutdown (returning nil) or a failure.
func (p *probeServer) serve() error {
	if err := p.srv.Serve(p.l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (p *probeServer) shutdown(ctx context.Context) {
	if p.srv != nil {
		p.srv.Shutdown(ctx)
	}
}

// podCgroups resolves pods' cgroupPath in pod scope against the cgroup2
// mount that holds within, the agent's --cgroup (the DaemonSet's
// /host/sys/fs/cgroup is the host's whole hierarchy, as runtimes name it).
func podCgroups(mountinfoPath, within string) (*podcgroup.Resolver, error) {
	mount, err := mountinfo.Containing(mountinfoPath, "cgroup2", within)
	if err != nil {
		return nil, fmt.Errorf("find the cgroup2 mount of --cgroup %s: %w", within, err)
	}
	if mount == "" {
		return nil, fmt.Errorf("--cgroup %s is on no cgroup2 mount in %s: with --cgroup-scope pod it names the host's cgroup v2 hierarchy (or a part of it) that pods' cgroups lie in", within, mountinfoPath)
	}
	return &podcgroup.Resolver{Mount: mount, Within: within}, nil
}

// cgroup2Root returns the mount point of the first cgroup2 filesystem
// listed in mountinfo: its root is where attached programs cover every
// process on the node.
func cgroup2Root(path string) (string, error) {
	root, err := mountinfo.First(path, "cgroup2")
	if err != nil {
		return "", fmt.Errorf("find the cgroup2 mount: %w (or pass --cgroup)", err)
	}
	if root == "" {
		return "", fmt.Errorf("no cgroup2 filesystem in %s: mount cgroup v2 or pass --cgroup", path)
	}
	return root, nil
}
