package install

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/meshlane/meshlane/daemon/atomicfile"
	"go.uber.org/zap"
)

// binTempPattern names the temp files of a binary copy. A leading dot and
// no config extension: nothing lists or runs them.
const binTempPattern = "." + PluginType + ".*.tmp"

// InstallBinary copies PluginSrc to BinDir/meshlane-cni. The copy goes to a
// temp file in BinDir that is fsynced and renamed over the old binary, so a
// runtime starting the plugin at that moment runs either the old or the new
// file, never a half-written one, and a plugin still running from the old
// file cannot make the copy fail with "text file busy" (writing into a
// running executable does; replacing its name does not). An identical
// binary already in place is left alone.
func InstallBinary(cfg Config) error {
	cfg = cfg.withDefaults()
	if err := requireDir("CNI bin directory", cfg.BinDir); err != nil {
		return err
	}
	if cfg.PluginSrc == "" {
		return errors.New("install: no plugin source binary given (--plugin-src)")
	}
	dst := filepath.Join(cfg.BinDir, PluginType)
	removeStaleTemps(cfg.BinDir, binTempPattern)

	src, err := os.Open(cfg.PluginSrc)
	if err != nil {
		return fmt.Errorf("install: open the plugin binary to copy: %w (check --plugin-src; the image ships it in /usr/local/bin)", err)
	}
	defer src.Close()
	if same, err := sameContent(src, dst); err != nil {
		return err
	} else if same {
		return nil
	}
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("install: rewind %s: %w", cfg.PluginSrc, err)
	}

	err = atomicfile.Write(dst, binTempPattern, func(tmp *os.File) error {
		if _, err := io.Copy(tmp, src); err != nil {
			return fmt.Errorf("copy %s: %w", cfg.PluginSrc, err)
		}
		// CreateTemp makes the file 0600: the runtime must be able to run it.
		return tmp.Chmod(0o755)
	}, nil)
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("install: copy %s into %s: %w (the agent needs write access to the CNI bin directory: check that its hostPath mount is not read-only)", PluginType, cfg.BinDir, err)
	}
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	cfg.Logger.Info("installed the CNI plugin binary", zap.String("file", dst))
	return nil
}

// sameContent tells whether dst exists as a 0755 regular file with the
// bytes of src. It reads src from where it is.
func sameContent(src *os.File, dst string) (bool, error) {
	d, err := os.Open(dst)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("install: open the installed %s to compare it: %w", dst, err)
	}
	defer d.Close()
	si, err := src.Stat()
	if err != nil {
		return false, fmt.Errorf("install: stat %s: %w", src.Name(), err)
	}
	di, err := d.Stat()
	if err != nil {
		return false, fmt.Errorf("install: stat %s: %w", dst, err)
	}
	if !di.Mode().IsRegular() || di.Mode().Perm() != 0o755 || di.Size() != si.Size() {
		return false, nil
	}
	const chunk = 64 << 10
	a, b := make([]byte, chunk), make([]byte, chunk)
	for {
		na, errA := io.ReadFull(src, a)
		nb, errB := io.ReadFull(d, b)
		if na != nb || !bytes.Equal(a[:na], b[:nb]) {
			return false, nil
		}
		endA := errors.Is(errA, io.EOF) || errors.Is(errA, io.ErrUnexpectedEOF)
		endB := errors.Is(errB, io.EOF) || errors.Is(errB, io.ErrUnexpectedEOF)
		if endA || endB {
			return endA && endB, nil
		}
		if errA != nil {
			return false, fmt.Errorf("install: read %s: %w", src.Name(), errA)
		}
		if errB != nil {
			return false, fmt.Errorf("install: read %s: %w", dst, errB)
		}
	}
}

// RemoveBinary deletes BinDir/meshlane-cni. It refuses while a config list
// in ConfDir still names the plugin: the runtime would fail every pod's ADD
// and DEL on the missing binary. Run Unchain first.
func RemoveBinary(cfg Config) error {
	cfg = cfg.withDefaults()
	if err := requireDir("CNI bin directory", cfg.BinDir); err != nil {
		return err
	}
	if err := requireDir("CNI config directory", cfg.ConfDir); err != nil {
		return err
	}
	chained, err := chainedFiles(cfg.ConfDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("install: %w", err)
	}
	if len(chained) > 0 {
		return fmt.Errorf("install: %s still names %s: remove the entry first (meshlane-agent uninstall does, in that order)", strings.Join(chained, ", "), PluginType)
	}
	removeStaleTemps(cfg.BinDir, binTempPattern)
	dst := filepath.Join(cfg.BinDir, PluginType)
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("install: remove %s: %w", dst, err)
	}
	cfg.Logger.Info("removed the CNI plugin binary", zap.String("file", dst))
	return nil
}
