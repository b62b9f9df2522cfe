package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/install"
)

// cniFlags are the installer's flags, shared by the agent (--install-cni)
// and the uninstall command.
type cniFlags struct {
	binDir, confDir, pluginSrc string
	excludeNamespaces          string
	failPolicy, logLevel       string
}

func (c *cniFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.binDir, "cni-bin-dir", "/opt/cni/bin", "the host's CNI bin directory as the agent sees it (in the DaemonSet: /host/opt/cni/bin)")
	fs.StringVar(&c.confDir, "cni-conf-dir", "/etc/cni/net.d", "the host's CNI config directory as the agent sees it (in the DaemonSet: /host/etc/cni/net.d)")
	fs.StringVar(&c.pluginSrc, "plugin-src", "/usr/local/bin/meshlane-cni", "the meshlane-cni binary to copy into --cni-bin-dir")
	fs.StringVar(&c.excludeNamespaces, "cni-exclude-namespaces", "", "comma-separated namespaces whose pods the plugin never fails (meshlane's own)")
	fs.StringVar(&c.failPolicy, "cni-fail-policy", "closed", "the plugin's failPolicy: closed (a pod's ADD fails while the agent cannot take it) or open")
	fs.StringVar(&c.logLevel, "cni-log-level", "info", "the plugin's logLevel")
}

func (c cniFlags) config(socket string, log *zap.Logger) install.Config {
	var ns []string
	for _, n := range strings.Split(c.excludeNamespaces, ",") {
		if n = strings.TrimSpace(n); n != "" {
			ns = append(ns, n)
		}
	}
	return install.Config{
		BinDir: c.binDir, ConfDir: c.confDir, PluginSrc: c.pluginSrc,
		Socket: socket, FailPolicy: c.failPolicy, ExcludeNamespaces: ns, LogLevel: c.logLevel,
		Logger: log.Named("installer"),
	}
}

// installer runs install.Watch and keeps its last state for readiness and
// /v1/status.
type installer struct {
	mu    sync.Mutex
	state install.State
	seen  bool
}

func (i *installer) set(s install.State) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.state, i.seen = s, true
}

// ready reports whether pods started now go through meshlane-cni.
func (i *installer) ready() (bool, string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	switch {
	case !i.seen:
		return false, "CNI installer starting"
	case i.state.Ready():
		return true, ""
	case i.state.Err != nil:
		return false, "CNI plugin not chained: " + i.state.Err.Error()
	default:
		return false, "CNI plugin not installed yet"
	}
}

func (i *installer) status() api.InstallStatus {
	i.mu.Lock()
	defer i.mu.Unlock()
	s := api.InstallStatus{State: "starting"}
	switch {
	case !i.seen:
	case i.state.Ready():
		s = api.InstallStatus{State: "chained", Detail: map[string]any{"conflist": i.state.ConfList, "writes": i.state.Writes}}
	case install.IsWaiting(i.state.Err):
		s = api.InstallStatus{State: "waiting-for-primary-config", Detail: i.state.Err.Error()}
	case i.state.Err != nil:
		s = api.InstallStatus{State: "error", Detail: i.state.Err.Error()}
	default:
		s = api.InstallStatus{State: "installing"}
	}
	return s
}

// runUninstall removes meshlane from a node in the order that never
// strands a pod: the conflist entry first (new pods stop calling the
// plugin), then the binary, then the datapath (new connections take the
// normal path; established ones are not touched).
func runUninstall(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("meshlane-agent uninstall", flag.ContinueOnError)
	fs.SetOutput(out)
	var c cniFlags
	c.register(fs)
	bpffs := fs.String("bpffs", datapath.DefaultBPFFS, "pin directory of the datapath to remove")
	logFormat := fs.String("log-format", "json", "json or console")
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: meshlane-agent uninstall [flags]\n\n"+
			"Removes meshlane from this node: the conflist entry, then the meshlane-cni\n"+
			"binary, then the pinned datapath. Safe to run twice.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	log, err := newLogger("info", *logFormat)
	if err != nil {
		return err
	}
	defer log.Sync()
	cfg := c.config(api.DefaultSocket, log)
	if err := install.Unchain(cfg); err != nil && !install.IsWaiting(err) {
		return fmt.Errorf("remove the meshlane-cni entry from %s: %w", c.confDir, err)
	}
	log.Info("conflist entry removed", zap.String("conf_dir", c.confDir))
	if err := install.RemoveBinary(cfg); err != nil {
		return fmt.Errorf("remove meshlane-cni from %s: %w", c.binDir, err)
	}
	log.Info("plugin binary removed", zap.String("bin_dir", c.binDir))
	if err := datapath.RemovePins(*bpffs); err != nil {
		return fmt.Errorf("detach the datapath pinned at %s: %w", *bpffs, err)
	}
	log.Info("datapath detached and unpinned", zap.String("bpffs", *bpffs))
	return nil
}

// watchInstall runs the installer until ctx ends.
func watchInstall(ctx context.Context, cfg install.Config, inst *installer) error {
	err := install.Watch(ctx, cfg, inst.set)
	if err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("CNI installer: %w", err)
	}
	return nil
}
