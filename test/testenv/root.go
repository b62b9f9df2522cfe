package testenv

import (
	"os"
	"testing"
)

// RequireRoot skips a test that needs root when run without it, except on
// CI (CI=true), where a skipped privileged test would hide that nothing ran.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root and CI=true forbids skipping it: run the tests as root")
	}
	t.Skip("needs root (network namespaces, cgroups, bpffs); run as root to include it")
}
