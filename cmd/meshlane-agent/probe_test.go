package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/agent"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
)

// noMaps is a datapath that accepts every write; the probe server never
// writes.
type noMaps struct{}

func (noMaps) AddPod(datapath.Pod) error    { return nil }
func (noMaps) UpsertPod(datapath.Pod) error { return nil }
func (noMaps) DeletePod(datapath.Pod) error { return nil }

func TestProbeServer(t *testing.T) {
	o, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil || o.probeAddr != "127.0.0.1:15999" {
		t.Fatalf("default --probe-addr %q, %v", o.probeAddr, err)
	}
	if o, err := parseFlags([]string{"--probe-addr", ""}, &bytes.Buffer{}); err != nil || o.probeAddr != "" {
		t.Fatalf("--probe-addr '': %q, %v", o.probeAddr, err)
	}

	a, err := agent.New(agent.Config{Maps: noMaps{}, Profile: mesh.Istio, StateDir: t.TempDir(), Version: "v0-test"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()

	off, err := listenProbes("", a, zap.NewNop())
	if err != nil || off.srv != nil || off.addr() != "" {
		t.Fatalf("disabled probe server: %+v, %v", off, err)
	}

	p, err := listenProbes("127.0.0.1:0", a, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.serve() }()
	for path, want := range map[string]string{"/healthz": "ok", "/readyz": "ok", "/metrics": `meshlane_build_info{version="v0-test"} 1`} {
		resp, err := http.Get("http://" + p.addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %d\n%s", path, resp.StatusCode, body)
		}
	}

	// A taken port is a start-up error that names the flag.
	if _, err := listenProbes(p.addr(), a, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "--probe-addr") {
		t.Errorf("second listener on %s: %v", p.addr(), err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p.shutdown(ctx)
	if err := <-done; err != nil {
		t.Fatalf("serve after shutdown: %v", err)
	}
	if _, err := net.DialTimeout("tcp", p.addr(), time.Second); err == nil {
		t.Fatal("probe port still open after shutdown")
	}
}
