package install

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// requireRoot skips a test that needs root, except in CI, where every
// test must run.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root; CI must run it as root")
	}
	t.Skip("needs root")
}

// withoutDACOverride runs fn on a thread that has lost the capabilities
// that let root ignore file permissions, so a directory's mode bites as it
// would for the agent in a container without them. Capabilities are per
// thread: the thread is locked for fn and thrown away afterwards.
func withoutDACOverride(t *testing.T, fn func()) {
	t.Helper()
	done := make(chan struct{})
	var setupErr error
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if setupErr = unix.Capget(&hdr, &data[0]); setupErr != nil {
			return
		}
		data[0].Effective &^= 1<<unix.CAP_DAC_OVERRIDE | 1<<unix.CAP_DAC_READ_SEARCH | 1<<unix.CAP_FOWNER
		if setupErr = unix.Capset(&hdr, &data[0]); setupErr != nil {
			return
		}
		fn()
	}()
	<-done
	if setupErr != nil {
		t.Fatalf("drop capabilities: %v", setupErr)
	}
}
