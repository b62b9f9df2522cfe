package main

import (
	"io"
	"os"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestDaemonSetArgsParse: the arguments the DaemonSet gives the agent are
// flags this agent has, so a renamed flag cannot ship a crash-looping
// install.
func TestDaemonSetArgsParse(t *testing.T) {
	b, err := os.ReadFile("../../manifests/base/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds struct {
		Spec struct {
			Template struct {
				Spec struct {
					Containers []struct {
						Args []string `json:"args"`
					} `json:"containers"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	args := ds.Spec.Template.Spec.Containers[0].Args
	o, err := parseFlags(args, io.Discard)
	if err != nil {
		t.Fatalf("DaemonSet args %q: %v", args, err)
	}
	if !o.installCNI || o.cgroup == "" || o.cni.excludeNamespaces == "" {
		t.Fatalf("DaemonSet runs the agent without its installer, cgroup or exempt namespace: %+v", o)
	}
}
