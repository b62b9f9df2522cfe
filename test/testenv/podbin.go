package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

var podbin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// Podbin builds ./test/podbin once per process and returns the binary's
// path. The binary and its directory are world-readable and executable:
// pods run it as the proxy and app uids. Main removes it at exit.
func Podbin() (string, error) {
	podbin.once.Do(func() {
		podbin.path, podbin.err = buildPodbin()
	})
	return podbin.path, podbin.err
}

// BuildPodbin is Podbin for tests: it fails the test if the build fails.
func BuildPodbin(t testing.TB) string {
	t.Helper()
	path, err := Podbin()
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func buildPodbin() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "meshlane-podbin-*")
	if err != nil {
		return "", fmt.Errorf("podbin build dir: %w", err)
	}
	podbin.dir = dir
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", fmt.Errorf("podbin build dir: %w", err)
	}
	out := filepath.Join(dir, "podbin")
	cmd := exec.Command("go", "build", "-o", out, "./test/podbin")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./test/podbin: %w\n%s", err, b)
	}
	if err := os.Chmod(out, 0o755); err != nil {
		return "", fmt.Errorf("podbin: %w", err)
	}
	return out, nil
}

// removePodbin deletes what Podbin built.
func removePodbin() error {
	if podbin.dir == "" {
		return nil
	}
	return os.RemoveAll(podbin.dir)
}

// moduleRoot finds the meshlane module from this source file's directory,
// which works wherever the test binary runs from.
func moduleRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("find module root: no caller information")
	}
	cmd := exec.Command("go", "env", "GOMOD")
	cmd.Dir = filepath.Dir(file)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("find module root: go env GOMOD: %w (is the go tool on PATH?) %s", err, stderr.Bytes())
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find module root: %s is not inside a Go module", cmd.Dir)
	}
	return filepath.Dir(gomod), nil
}
