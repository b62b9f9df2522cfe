package plugin

import (
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshlane/meshlane/daemon/api"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","name":"podnet","type":"meshlane-cni"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != api.DefaultSocket || c.Timeout != 5*time.Second || c.FailOpen || c.LogLevel != slog.LevelInfo || len(c.Excluded) != 0 {
		t.Errorf("defaults = %+v", c)
	}
}

func TestParseConfigAllFields(t *testing.T) {
	c, err := parseConfig([]byte(`{
		"cniVersion": "0.3.1", "name": "podnet", "type": "meshlane-cni",
		"socket": "/run/x/agent.sock", "timeout": "1500ms", "failPolicy": "open", "logLevel": "debug",
		"excludeNamespaces": ["meshlane-system", "kube-system"],
		"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"sidecar.istio.io/status": "{}"}, "portMappings": []},
		"capabilities": {"io.kubernetes.cri.pod-annotations": true},
		"someOtherPluginKey": {"nested": [1, 2, 3]}, "mtu": 1450
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/run/x/agent.sock" || c.Timeout != 1500*time.Millisecond || !c.FailOpen || c.LogLevel != slog.LevelDebug {
		t.Errorf("parsed = %+v", c)
	}
	if !c.Excluded["meshlane-system"] || !c.Excluded["kube-system"] || len(c.Excluded) != 2 {
		t.Errorf("excluded = %v", c.Excluded)
	}
	if c.Annotations["sidecar.istio.io/status"] != "{}" {
		t.Errorf("annotations = %v", c.Annotations)
	}
	if c.Conf.CNIVersion != "0.3.1" {
		t.Errorf("cniVersion = %q", c.Conf.CNIVersion)
	}
}

func TestParseConfigLevels(t *testing.T) {
	for name, want := range map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError} {
		c, err := parseConfig([]byte(`{"logLevel":"` + name + `"}`))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.LogLevel != want {
			t.Errorf("logLevel %s parsed as %v", name, c.LogLevel)
		}
	}
}

func TestParseConfigBadField(t *testing.T) {
	long := "/" + strings.Repeat("s", maxSocketPath)
	cases := []struct {
		conf, field, detail string
	}{
		{`{"failPolicy":"maybe"}`, "failPolicy", `"maybe" (want "closed" or "open")`},
		{`{"failPolicy":true}`, "failPolicy", "bool"},
		{`{"timeout":"soon"}`, "timeout", `"soon"`},
		{`{"timeout":"0s"}`, "timeout", "positive"},
		{`{"timeout":"-1s"}`, "timeout", "positive"},
		{`{"timeout":5}`, "timeout", "number"},
		{`{"logLevel":"verbose"}`, "logLevel", `"verbose"`},
		{`{"socket":"agent.sock"}`, "socket", "absolute"},
		{`{"socket":"` + long + `"}`, "socket", "at most 107"},
		{`{"excludeNamespaces":"kube-system"}`, "excludeNamespaces", "string"},
		{`{"excludeNamespaces":["ok", " "]}`, "excludeNamespaces", "entry 1 is empty"},
		{`{"runtimeConfig":{"io.kubernetes.cri.pod-annotations":["a"]}}`, "io.kubernetes.cri.pod-annotations", "array"},
		{`{"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":1}}}`, "io.kubernetes.cri.pod-annotations", "number"},
		{`{"runtimeConfig":{"cgroupPath":["/kubepods"]}}`, "cgroupPath", "array"},
		{`{"cni.dev/valid-attachments":{}}`, "cni.dev/valid-attachments", "object"},
	}
	for _, tc := range cases {
		_, err := parseConfig([]byte(tc.conf))
		terr := asCNIError(t, err)
		if terr.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("%s: code %d, want %d (%v)", tc.conf, terr.Code, types.ErrInvalidNetworkConfig, err)
		}
		if !strings.Contains(terr.Msg, "meshlane-cni: invalid config field") || !strings.Contains(terr.Msg, tc.field) || !strings.Contains(terr.Msg, tc.detail) {
			t.Errorf("%s: message %q does not name field %q with %q", tc.conf, terr.Msg, tc.field, tc.detail)
		}
	}
}

func TestParseConfigFailPolicyMessage(t *testing.T) {
	_, err := parseConfig([]byte(`{"failPolicy":"maybe"}`))
	want := `meshlane-cni: invalid config field "failPolicy": "maybe" (want "closed" or "open")`
	if terr := asCNIError(t, err); terr.Msg != want {
		t.Errorf("message %q, want %q", terr.Msg, want)
	}
}

func TestParseConfigMalformed(t *testing.T) {
	for _, in := range []string{``, `{`, `{"name":"x",}`, `not json`, `{"a":1}{"b":2}`} {
		_, err := parseConfig([]byte(in))
		terr := asCNIError(t, err)
		if terr.Code != types.ErrDecodingFailure || !strings.HasPrefix(terr.Msg, "meshlane-cni: cannot decode the network config") {
			t.Errorf("%q: got code %d %q, want code %d decode error", in, terr.Code, terr.Msg, types.ErrDecodingFailure)
		}
	}
}

func asCNIError(t *testing.T, err error) *types.Error {
	t.Helper()
	var terr *types.Error
	if !errors.As(err, &terr) {
		t.Fatalf("error %v (%T) is not a *types.Error", err, err)
	}
	return terr
}

// FuzzParseConfig checks that the decoder never panics, that every error is
// a CNI error the runtime can show, and that every accepted config is one
// the verbs can use. Seeds are in testdata/fuzz/FuzzParseConfig.
func FuzzParseConfig(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := parseConfig(in)
		if err != nil {
			var terr *types.Error
			if !errors.As(err, &terr) {
				t.Fatalf("error %v is %T, want *types.Error", err, err)
			}
			if terr.Code != types.ErrDecodingFailure && terr.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("code %d for %q", terr.Code, in)
			}
			if !strings.HasPrefix(terr.Msg, "meshlane-cni: ") {
				t.Fatalf("message %q does not say who failed", terr.Msg)
			}
			return
		}
		if c.Timeout <= 0 {
			t.Fatalf("accepted timeout %v", c.Timeout)
		}
		if !filepath.IsAbs(c.Socket) || len(c.Socket) > maxSocketPath {
			t.Fatalf("accepted socket %q", c.Socket)
		}
		switch c.LogLevel {
		case slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError:
		default:
			t.Fatalf("accepted log level %v", c.LogLevel)
		}
		for ns := range c.Excluded {
			if strings.TrimSpace(ns) == "" {
				t.Fatalf("accepted empty excluded namespace %q", ns)
			}
		}
	})
}
