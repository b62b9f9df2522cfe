package testenv

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"
)

// pollInterval paces the Wait helpers.
const pollInterval = 20 * time.Millisecond

// ScratchDir makes a temporary directory that every uid may write (sticky,
// like /tmp), for event and ready files of processes running as the proxy
// or app uids. Cleanup removes it.
func ScratchDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", runPrefix()+"scratch-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Error(err)
		}
	})
	if err := os.Chmod(dir, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	return dir
}

// WaitFile waits until path exists, polling, for at most timeout.
func WaitFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := os.Stat(path)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("wait for %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s: did the process start (see its output)?", path, timeout)
		}
		time.Sleep(pollInterval)
	}
}

// ReadEvents decodes the complete JSON lines of path; a last line still
// being written (no newline yet) is left for the next read.
func ReadEvents[T any](path string) ([]T, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read events: %w", err)
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	var out []T
	for n, line := range bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var v T
		if err := json.Unmarshal(line, &v); err != nil {
			return nil, fmt.Errorf("%s line %d: %w", path, n+1, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// WaitEvents polls path until done accepts the events read so far, for at
// most timeout, and returns the last events read.
func WaitEvents[T any](path string, timeout time.Duration, done func([]T) bool) ([]T, error) {
	deadline := time.Now().Add(timeout)
	for {
		evs, err := ReadEvents[T](path)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return evs, err
		}
		if err == nil && done(evs) {
			return evs, nil
		}
		if time.Now().After(deadline) {
			return evs, fmt.Errorf("events in %s did not reach the expected state within %s (have %d)", path, timeout, len(evs))
		}
		time.Sleep(pollInterval)
	}
}
