// Package testenv builds the world privileged tests run in: cgroups, a
// private bpffs, a bridge in the host network namespace, pods (named network
// namespaces wired to the bridge by veth pairs) and processes started inside
// them with chosen credentials and cgroup. The demo and the benchmark reuse
// it, so every resource has a plain constructor returning an error, and a
// testing.TB wrapper that registers the cleanup.
//
// Every name carries a random run ID (see RunID) so that test binaries
// running at the same time never collide, and Leftovers can tell what this
// process left behind.
package testenv
