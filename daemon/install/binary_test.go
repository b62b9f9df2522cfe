package install

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestInstallBinaryWhileRunning replaces the plugin binary while a process
// runs from it. Writing into the running file fails with ETXTBSY; the
// installer's rename does not, and the running process is unharmed.
func TestInstallBinaryWhileRunning(t *testing.T) {
	sleepBin, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatalf("this test runs a copy of sleep(1): %v", err)
	}
	binDir := t.TempDir()
	dst := filepath.Join(binDir, PluginType)
	sleepData, err := os.ReadFile(sleepBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, sleepData, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(dst, "30")
	if err := cmd.Start(); err != nil { // returns once exec succeeded
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	// The hazard is real on this kernel: an in-place write is refused.
	if f, err := os.OpenFile(dst, os.O_WRONLY, 0); err == nil {
		f.Close()
		t.Log("this kernel lets a running binary be opened for writing; the rename still guards against half-written files")
	} else if !errors.Is(err, syscall.ETXTBSY) {
		t.Fatalf("open running binary for write: %v, want ETXTBSY", err)
	}

	src := filepath.Join(t.TempDir(), "meshlane-cni-new")
	newData := []byte("#!/bin/sh\necho new meshlane-cni\n")
	if err := os.WriteFile(src, newData, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := InstallBinary(Config{BinDir: binDir, PluginSrc: src}); err != nil {
		t.Fatalf("InstallBinary while the old binary runs: %v", err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, newData) {
		t.Fatalf("installed binary = %q, %v", got, err)
	}
	checkFileMode(t, dst, 0o755)
	if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the process running the old binary died: %v", err)
	}
	out, err := exec.Command(dst).Output()
	if err != nil || string(out) != "new meshlane-cni\n" {
		t.Errorf("running the new binary: %q, %v", out, err)
	}
	assertNoBinTemps(t, binDir)
}

func TestInstallBinaryIdempotent(t *testing.T) {
	binDir := t.TempDir()
	src := filepath.Join(t.TempDir(), "meshlane-cni")
	if err := os.WriteFile(src, []byte("binary v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := Config{BinDir: binDir, PluginSrc: src}
	if err := InstallBinary(cfg); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(binDir, PluginType)
	before := inode(t, dst)
	if err := InstallBinary(cfg); err != nil {
		t.Fatal(err)
	}
	if inode(t, dst) != before {
		t.Error("an identical binary was copied again")
	}
	// Same size, other bytes: copied.
	if err := os.WriteFile(src, []byte("binary v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := InstallBinary(cfg); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(dst); string(got) != "binary v2" {
		t.Errorf("installed %q, want binary v2", got)
	}
	// Right bytes, wrong mode: fixed.
	if err := os.Chmod(dst, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := InstallBinary(cfg); err != nil {
		t.Fatal(err)
	}
	checkFileMode(t, dst, 0o755)
}

func TestInstallBinaryErrors(t *testing.T) {
	binDir := t.TempDir()
	err := InstallBinary(Config{BinDir: binDir, PluginSrc: filepath.Join(binDir, "nope")})
	if err == nil || !strings.Contains(err.Error(), "--plugin-src") {
		t.Errorf("missing source: %v", err)
	}
	if err := InstallBinary(Config{BinDir: "opt/cni/bin", PluginSrc: "/bin/true"}); err == nil {
		t.Error("relative bin dir accepted")
	}

	src := filepath.Join(t.TempDir(), "meshlane-cni")
	if err := os.WriteFile(src, []byte("binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(binDir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(binDir, 0o755) })
	withoutDACOverride(t, func() {
		err := InstallBinary(Config{BinDir: binDir, PluginSrc: src})
		if err == nil || !errors.Is(err, os.ErrPermission) || !strings.Contains(err.Error(), binDir) || !strings.Contains(err.Error(), "write access") {
			t.Errorf("read-only bin dir: %v", err)
		}
	})
}

func TestRemoveBinaryAfterUnchain(t *testing.T) {
	binDir, confDir := t.TempDir(), t.TempDir()
	src := filepath.Join(t.TempDir(), "meshlane-cni")
	if err := os.WriteFile(src, []byte("binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(confDir)
	cfg.BinDir, cfg.PluginSrc = binDir, src
	writeFile(t, filepath.Join(confDir, calicoFile), primaryBytes(t, calicoFile))
	if err := InstallBinary(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := Chain(cfg); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(binDir, PluginType)

	err := RemoveBinary(cfg)
	if err == nil || !strings.Contains(err.Error(), calicoFile) {
		t.Fatalf("RemoveBinary while chained = %v, want a refusal naming %s", err, calicoFile)
	}
	if _, err := os.Stat(dst); err != nil {
		t.Fatalf("binary removed while still chained: %v", err)
	}
	if err := Unchain(cfg); err != nil {
		t.Fatal(err)
	}
	if err := RemoveBinary(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Errorf("binary still there: %v", err)
	}
	if err := RemoveBinary(cfg); err != nil {
		t.Errorf("second RemoveBinary: %v", err)
	}
	// Without a config directory there is nothing chained.
	cfg.ConfDir = filepath.Join(confDir, "gone")
	if err := RemoveBinary(cfg); err != nil {
		t.Errorf("RemoveBinary without a config directory: %v", err)
	}
}

func TestInstallBinaryRemovesStaleTemps(t *testing.T) {
	binDir := t.TempDir()
	stale := filepath.Join(binDir, "."+PluginType+".12345.tmp")
	other := filepath.Join(binDir, ".bridge.tmp")
	for _, f := range []string{stale, other} {
		if err := os.WriteFile(f, []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	src := filepath.Join(t.TempDir(), "meshlane-cni")
	if err := os.WriteFile(src, []byte("binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := InstallBinary(Config{BinDir: binDir, PluginSrc: src}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Error("a stale temp file of an interrupted copy is still there")
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("a file that is not meshlane's was removed: %v", err)
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return info.Sys().(*syscall.Stat_t).Ino
}

func assertNoBinTemps(t *testing.T, dir string) {
	t.Helper()
	if m, _ := filepath.Glob(filepath.Join(dir, binTempPattern)); len(m) > 0 {
		t.Errorf("temp files left: %v", m)
	}
}

// waitFor polls cond every 10ms until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}
