// Package atomicfile replaces files so that a reader, or the node after a
// crash, sees the old content or the new, never a mix: what the agent's
// state files and the installer's CNI config and plugin binary need.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// Write replaces path with what fill writes: fill gets a temp file made
// from pattern (as os.CreateTemp) in path's directory, which is then
// fsynced, closed, renamed over path, and the directory fsynced. check, if
// not nil, runs just before the rename; its error abandons the write. A
// failed write leaves no temp file behind.
func Write(path, pattern string, fill func(*os.File) error, check func() error) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return fmt.Errorf("create a temp file in %s: %w", dir, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name()) // gone already once renamed
		}
	}()
	if err := fill(tmp); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if check != nil {
		if err := check(); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename %s to %s: %w", tmp.Name(), path, err)
	}
	return SyncDir(dir)
}

// SyncDir makes a rename, creation or removal in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s to fsync it: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
