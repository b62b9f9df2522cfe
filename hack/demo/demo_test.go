package main

import (
	"testing"

	"github.com/meshlane/meshlane/test/testenv"
)

// TestMain fails the run if the demo left anything behind (namespaces,
// links, cgroups, mounts): its teardown is part of what it promises.
func TestMain(m *testing.M) { testenv.Main(m) }

// TestDemo runs `make demo`'s main job, small, for both mesh profiles (one
// with the short-circuit): every client connection, same-node and from the
// pod playing another node, must succeed, or run returns an error.
func TestDemo(t *testing.T) {
	testenv.RequireRoot(t)
	for _, c := range []struct {
		profile string
		sockmap bool
	}{{"istio", false}, {"linkerd", true}} {
		t.Run(c.profile, func(t *testing.T) {
			if err := run(2, c.profile, c.sockmap, 3, false); err != nil {
				t.Fatal(err)
			}
		})
	}
}
