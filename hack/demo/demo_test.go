package main

import (
	"testing"

	"github.com/meshlane/meshlane/test/testenv"
)

// TestMain fails the run if the demo left anything behind (namespaces,
// links, cgroups, mounts): its teardown is part of what it promises.
func TestMain(m *testing.M) { testenv.Main(m) }

// TestDemo runs `make demo`'s main job, small, for both mesh profiles (one
// with the short-circuit, one in pod cgroup scope with sk_lookup): every client
// connection, same-node and from the pod playing another node, must
// succeed, or run returns an error.
func TestDemo(t *testing.T) {
	testenv.RequireRoot(t)
	for _, c := range []struct {
		profile string
		sockmap bool
		scope   string
		inbound string
	}{{"istio", false, "pod", "sk_lookup"}, {"linkerd", true, "node", ""}} {
		t.Run(c.profile+"/"+c.scope, func(t *testing.T) {
			if err := run(options{pods: 2, profile: c.profile, sockmap: c.sockmap, requests: 3, scope: c.scope, inbound: c.inbound}); err != nil {
				t.Fatal(err)
			}
		})
	}
}
