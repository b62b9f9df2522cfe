// Package plugin is the meshlane chained CNI plugin: it reports each pod
// the runtime sets up or tears down to the meshlane agent on the node and
// passes the previous plugin's result through untouched.
package plugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshlane/meshlane/daemon/api"
)

// annotationsCapability is the runtimeConfig key under which containerd and
// CRI-O hand the pod's annotations to a plugin that declares the capability.
const annotationsCapability = "io.kubernetes.cri.pod-annotations"

// maxSocketPath is the longest path a unix socket address can hold on Linux
// (sun_path is 108 bytes including the terminating NUL).
const maxSocketPath = 107

const defaultTimeout = 5 * time.Second

// netConf is the plugin's entry in the conflist as it arrives on stdin.
// Keys it does not name are ignored: conflists carry other plugins' and
// runtimes' keys too.
type netConf struct {
	types.PluginConf
	Socket            string   `json:"socket"`
	Timeout           string   `json:"timeout"`
	FailPolicy        string   `json:"failPolicy"`
	LogLevel          string   `json:"logLevel"`
	ExcludeNamespaces []string `json:"excludeNamespaces"`
	RuntimeConfig     struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations"`
		CgroupPath     string            `json:"cgroupPath"`
	} `json:"runtimeConfig"`
}

// Config is the validated plugin configuration.
type Config struct {
	// Conf keeps the standard keys: cniVersion, the raw prevResult and the
	// GC verb's valid attachments.
	Conf        types.PluginConf
	Socket      string
	Timeout     time.Duration
	FailOpen    bool
	LogLevel    slog.Level
	Excluded    map[string]bool
	Annotations map[string]string
	// CgroupPath is the pod's cgroup, from the runtime's cgroupPath
	// capability (containerd >= 1.7, CRI-O >= 1.28); passed on as is.
	CgroupPath string
}

// parseConfig decodes and validates the plugin's config from stdin. Every
// error is a *types.Error: ErrDecodingFailure when the bytes are not a JSON
// object, ErrInvalidNetworkConfig naming the field otherwise.
func parseConfig(stdin []byte) (*Config, error) {
	var nc netConf
	if err := json.Unmarshal(stdin, &nc); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return nil, fieldError(typeErr.Field, fmt.Sprintf("has JSON type %s, want %s", typeErr.Value, typeErr.Type))
		}
		return nil, types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf("meshlane-cni: cannot decode the network config on stdin: %v", err),
			"the runtime passes the plugin's entry of the conflist; check the file in the CNI config directory")
	}

	c := &Config{
		Conf:        nc.PluginConf,
		Socket:      api.DefaultSocket,
		Timeout:     defaultTimeout,
		LogLevel:    slog.LevelInfo,
		Annotations: nc.RuntimeConfig.PodAnnotations,
		CgroupPath:  nc.RuntimeConfig.CgroupPath,
	}
	if nc.Socket != "" {
		if !filepath.IsAbs(nc.Socket) {
			return nil, fieldError("socket", fmt.Sprintf("%q (want an absolute path)", nc.Socket))
		}
		if len(nc.Socket) > maxSocketPath {
			return nil, fieldError("socket", fmt.Sprintf("%q is %d bytes (a unix socket path holds at most %d)", nc.Socket, len(nc.Socket), maxSocketPath))
		}
		c.Socket = nc.Socket
	}
	if nc.Timeout != "" {
		d, err := time.ParseDuration(nc.Timeout)
		if err != nil || d <= 0 {
			return nil, fieldError("timeout", fmt.Sprintf("%q (want a positive Go duration such as \"5s\")", nc.Timeout))
		}
		c.Timeout = d
	}
	switch nc.FailPolicy {
	case "", "closed":
	case "open":
		c.FailOpen = true
	default:
		return nil, fieldError("failPolicy", fmt.Sprintf("%q (want \"closed\" or \"open\")", nc.FailPolicy))
	}
	switch nc.LogLevel {
	case "", "info":
	case "debug":
		c.LogLevel = slog.LevelDebug
	case "warn":
		c.LogLevel = slog.LevelWarn
	case "error":
		c.LogLevel = slog.LevelError
	default:
		return nil, fieldError("logLevel", fmt.Sprintf("%q (want \"debug\", \"info\", \"warn\" or \"error\")", nc.LogLevel))
	}
	c.Excluded = make(map[string]bool, len(nc.ExcludeNamespaces))
	for i, ns := range nc.ExcludeNamespaces {
		if strings.TrimSpace(ns) == "" {
			return nil, fieldError("excludeNamespaces", fmt.Sprintf("entry %d is empty (want namespace names)", i))
		}
		c.Excluded[ns] = true
	}
	return c, nil
}

func fieldError(field, problem string) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("meshlane-cni: invalid config field %q: %s", field, problem),
		"fix the meshlane-cni entry of the conflist in the CNI config directory")
}
