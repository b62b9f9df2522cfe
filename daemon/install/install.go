// Package install puts meshlane-cni on a node the way the container
// runtime expects it: the binary in the CNI bin directory, and an entry at
// the end of the primary network's conflist in the CNI config directory. It
// keeps that entry there while the primary CNI rewrites its file, and takes
// it out again on uninstall. It never creates a network of its own: without
// a primary config there is nothing to chain to, and it waits.
package install

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
)

// PluginType is the "type" of meshlane's entry in a conflist, which is also
// the binary's file name in the CNI bin directory.
const PluginType = "meshlane-cni"

// annotationsCapability asks containerd and CRI-O to pass the pod's
// annotations in runtimeConfig; the plugin decides mesh membership from them.
const annotationsCapability = "io.kubernetes.cri.pod-annotations"

// cgroupPathCapability asks the runtime for the pod's cgroup, where an
// agent with --cgroup-scope pod attaches the programs.
const cgroupPathCapability = "cgroupPath"

// Defaults for the plugin options; they match the plugin's own defaults
// (plugin/config.go), written out so the conflist says what is in force.
const (
	DefaultFailPolicy    = "closed"
	DefaultLogLevel      = "info"
	DefaultRetryInterval = 10 * time.Second
	DefaultFightLimit    = 10
)

// maxSocketPath is the longest unix socket path Linux accepts (sun_path
// holds 108 bytes including the NUL); the plugin refuses longer ones.
const maxSocketPath = 107

// Config says where the CNI directories are and what meshlane's conflist
// entry holds. The zero values of the optional fields take the defaults.
type Config struct {
	// BinDir is the host's CNI bin directory as this process sees it
	// (e.g. /host/opt/cni/bin inside the DaemonSet pod).
	BinDir string
	// ConfDir is the host's CNI config directory as this process sees it.
	ConfDir string
	// PluginSrc is the meshlane-cni binary to copy into BinDir.
	PluginSrc string

	// Socket is the agent's socket path on the host, where the plugin
	// connects (default api.DefaultSocket).
	Socket string
	// Timeout bounds one plugin call to the agent; zero leaves the key out
	// and the plugin uses its default.
	Timeout time.Duration
	// FailPolicy is "closed" (a pod's ADD fails while the agent is down) or
	// "open" (the pod starts unmeshed).
	FailPolicy string
	// ExcludeNamespaces are namespaces whose pods the plugin never reports.
	ExcludeNamespaces []string
	// LogLevel is the plugin's: debug, info, warn or error.
	LogLevel string

	// RetryInterval is how often Watch looks at the config directory even
	// without a change event: to retry after an error and to catch events
	// inotify dropped. Each look is a read and a compare.
	RetryInterval time.Duration
	// FightLimit is how many rewrites per minute Watch makes before it
	// reports a fight with another writer and slows down.
	FightLimit int

	Logger *zap.Logger
}

// withDefaults fills the optional fields.
func (c Config) withDefaults() Config {
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.FailPolicy == "" {
		c.FailPolicy = DefaultFailPolicy
	}
	if c.LogLevel == "" {
		c.LogLevel = DefaultLogLevel
	}
	if c.RetryInterval <= 0 {
		c.RetryInterval = DefaultRetryInterval
	}
	if c.FightLimit <= 0 {
		c.FightLimit = DefaultFightLimit
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	return c
}

// validatePlugin checks the entry's options with the plugin's own rules, so
// the installer never writes an entry the plugin would refuse on every pod.
func (c Config) validatePlugin() error {
	if !filepath.IsAbs(c.Socket) {
		return fmt.Errorf("install: socket %q is not an absolute path", c.Socket)
	}
	if len(c.Socket) > maxSocketPath {
		return fmt.Errorf("install: socket %q is %d bytes; a unix socket path holds at most %d", c.Socket, len(c.Socket), maxSocketPath)
	}
	if c.Timeout < 0 {
		return fmt.Errorf("install: timeout %s is negative", c.Timeout)
	}
	switch c.FailPolicy {
	case "closed", "open":
	default:
		return fmt.Errorf("install: fail policy %q: want \"closed\" or \"open\"", c.FailPolicy)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("install: plugin log level %q: want debug, info, warn or error", c.LogLevel)
	}
	for i, ns := range c.ExcludeNamespaces {
		if strings.TrimSpace(ns) == "" {
			return fmt.Errorf("install: excluded namespace %d is empty", i)
		}
	}
	return nil
}

// requireDir checks that a directory option is set and absolute.
func requireDir(flagName, dir string) error {
	if dir == "" {
		return fmt.Errorf("install: no %s given", flagName)
	}
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("install: %s %q is not an absolute path", flagName, dir)
	}
	return nil
}

// errNoConfig reports an empty config directory: the primary CNI has not
// written its config yet.
var errNoConfig = errors.New("no CNI network config yet")

// IsWaiting tells whether err only means that the primary CNI has not
// written its config yet: the node's network is not up, nothing is wrong
// with meshlane.
func IsWaiting(err error) bool {
	return errors.Is(err, errNoConfig)
}
