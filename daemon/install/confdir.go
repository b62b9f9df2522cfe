package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containernetworking/cni/libcni"
	"github.com/meshlane/meshlane/daemon/atomicfile"
	"go.uber.org/zap"
)

// configExts are the file name extensions containerd and CRI-O load from
// the CNI config directory. Anything else there (backups, our temp files)
// is not a network config.
var configExts = []string{".conf", ".conflist", ".json"}

// tempSuffix ends the names of the temp files the installer writes before
// renaming them into place. It is not a config extension, so a runtime
// listing the directory mid-write never loads a temp file.
const tempSuffix = ".meshlane-tmp"

func isConfigFile(name string) bool {
	ext := filepath.Ext(name)
	for _, e := range configExts {
		if ext == e {
			return true
		}
	}
	return false
}

// configFiles lists the network configs in dir in the order the runtimes
// try them: lexical order of the file names (os.ReadDir sorts), directories
// skipped.
func configFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("CNI config directory %s: %w: check --cni-conf-dir and the hostPath mount", dir, err)
		}
		return nil, fmt.Errorf("list CNI config directory: %w", err)
	}
	var files []string
	for _, e := range entries {
		if !e.IsDir() && isConfigFile(e.Name()) {
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	return files, nil
}

// primaryConfig returns the config the runtime uses for pods: the first
// one in lexical order. The runtime does not skip a broken first file, so
// neither does the installer.
func primaryConfig(dir string) (string, error) {
	files, err := configFiles(dir)
	if err != nil {
		return "", err
	}
	if len(files) == 0 {
		return "", fmt.Errorf("%w in %s: waiting for the primary CNI to write one", errNoConfig, dir)
	}
	return files[0], nil
}

// chainResult says which file holds meshlane's entry and whether this call
// wrote it.
type chainResult struct {
	path    string
	changed bool
}

// errRaced reports that the primary config changed while the installer was
// rewriting it; the rewrite was dropped and must be redone on the new file.
var errRaced = errors.New("the file changed while meshlane was rewriting it; retrying on the new content")

// Chain puts meshlane's entry last in the primary network config, turning a
// single-plugin .conf into a .conflist first. It reports whether it wrote
// anything: chaining a file that already ends with the same entry writes
// nothing. A file the runtime could not load is left untouched and named in
// the error.
func Chain(cfg Config) (changed bool, err error) {
	res, err := chainDir(cfg.withDefaults())
	return res.changed, err
}

func chainDir(cfg Config) (chainResult, error) {
	if err := requireDir("CNI config directory", cfg.ConfDir); err != nil {
		return chainResult{}, err
	}
	if err := cfg.validatePlugin(); err != nil {
		return chainResult{}, err
	}
	want, err := cfg.pluginEntry()
	if err != nil {
		return chainResult{}, err
	}
	primary, err := primaryConfig(cfg.ConfDir)
	if err != nil {
		return chainResult{}, err
	}
	data, err := os.ReadFile(primary)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// Replaced between listing and reading: look again.
			return chainResult{}, fmt.Errorf("%s: %w", primary, errRaced)
		}
		return chainResult{}, fmt.Errorf("read the primary CNI config: %w", err)
	}

	if filepath.Ext(primary) == ".conflist" {
		list, err := parseConflist(data)
		if err != nil {
			return chainResult{}, corrupt(primary, err)
		}
		if !list.chain(want) {
			return chainResult{path: primary}, nil
		}
		out, err := list.encode()
		if err == nil {
			err = checkNoPluginDir(cfg.ConfDir, out)
		}
		if err != nil {
			return chainResult{}, fmt.Errorf("%s: %w", primary, err)
		}
		if err := replaceFile(primary, primary, data, out); err != nil {
			return chainResult{}, err
		}
		cfg.Logger.Info("chained meshlane-cni into the primary CNI config", zap.String("file", primary))
		return chainResult{path: primary, changed: true}, nil
	}

	// A .conf or .json holds one plugin: only a list can chain, so the
	// config moves to <base>.conflist, which sorts right after <base>.conf
	// and so stays first. The .conf goes only once the list is in place:
	// in between, the runtime still loads the working .conf.
	list, err := listFromConf(data)
	if err != nil {
		return chainResult{}, corrupt(primary, err)
	}
	target := strings.TrimSuffix(primary, filepath.Ext(primary)) + ".conflist"
	if err := checkConversionTarget(cfg.ConfDir, primary, target); err != nil {
		return chainResult{}, err
	}
	list.chain(want)
	out, err := list.encode()
	if err == nil {
		err = checkNoPluginDir(cfg.ConfDir, out)
	}
	if err != nil {
		return chainResult{}, fmt.Errorf("%s: %w", primary, err)
	}
	if err := replaceFile(primary, target, data, out); err != nil {
		return chainResult{}, err
	}
	// A .conf rewritten since it was read stays: it sorts first, so the
	// next look turns the new content into the list instead.
	if now, err := os.ReadFile(primary); err != nil || !bytes.Equal(now, data) {
		return chainResult{}, fmt.Errorf("%s: %w", primary, errRaced)
	}
	if err := os.Remove(primary); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return chainResult{}, fmt.Errorf("remove %s after writing its list %s: %w (delete it by hand: the runtime loads it before the list)", primary, target, err)
	}
	cfg.Logger.Info("turned the primary CNI config into a list and chained meshlane-cni",
		zap.String("from", primary), zap.String("file", target))
	return chainResult{path: target, changed: true}, nil
}

// corrupt wraps the reason a primary config cannot be chained.
func corrupt(path string, err error) error {
	return fmt.Errorf("primary CNI config %s: %v; left untouched, meshlane retries when it changes (fix it, or restart the primary CNI so it rewrites it)", path, err)
}

// checkNoPluginDir refuses a list (as it will be written: out) whose
// network also loads plugins from <confdir>/<name>/: libcni runs those after
// the inline ones, so meshlane's entry would not be last.
func checkNoPluginDir(confDir string, out []byte) error {
	l, err := libcni.ConfListFromBytes(out)
	if err != nil || l.LoadOnlyInlinedPlugins || l.Name == "" {
		return err
	}
	dir := filepath.Join(confDir, l.Name)
	if extra, _ := filepath.Glob(filepath.Join(dir, "*.conf")); len(extra) > 0 {
		return fmt.Errorf("network %q also loads plugins from %s, which would run after meshlane-cni; set \"loadOnlyInlinedPlugins\": true or move them into the list", l.Name, dir)
	}
	return nil
}

// checkConversionTarget makes sure turning primary (.conf) into target
// (.conflist) neither overwrites someone else's file nor changes which
// config the runtime picks.
func checkConversionTarget(confDir, primary, target string) error {
	if old, err := os.ReadFile(target); err == nil {
		// Our own earlier list, left behind when the primary CNI wrote
		// its .conf again: replace it.
		l, perr := parseConflist(old)
		if perr != nil || len(l.others()) == len(l.plugins) {
			return fmt.Errorf("cannot turn %s into a list: %s already exists and is not meshlane's; remove or rename one of them", primary, target)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s: %w", target, err)
	}
	files, err := configFiles(confDir)
	if err != nil {
		return err
	}
	for _, f := range files {
		if f != primary && f < target {
			return fmt.Errorf("cannot turn %s into a list: %s sorts between it and %s and would become the runtime's config; rename one of them",
				primary, f, target)
		}
	}
	return nil
}

// replaceFile writes data to path atomically: a temp file in the same
// directory, fsynced, then renamed over path, then the directory fsynced.
// The new file takes the mode and owner of src. Just before the rename it
// checks that src still holds expect, so a rewrite by the primary CNI in
// the meantime is never overwritten with stale content.
func replaceFile(src, path string, expect, data []byte) error {
	info, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("stat %s: %w", src, err)
	}
	err = atomicfile.Write(path, "."+filepath.Base(path)+".*"+tempSuffix, func(tmp *os.File) error {
		if _, err := tmp.Write(data); err != nil {
			return err
		}
		if err := tmp.Chmod(info.Mode().Perm()); err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && (int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid()) {
			if err := tmp.Chown(int(st.Uid), int(st.Gid)); err != nil {
				return fmt.Errorf("give it the owner of %s: %w", src, err)
			}
		}
		return nil
	}, func() error {
		if now, err := os.ReadFile(src); err != nil || !bytes.Equal(now, expect) {
			return fmt.Errorf("%s: %w", src, errRaced)
		}
		return nil
	})
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("write %s: %w (the agent needs write access to the CNI config directory: check that its hostPath mount is not read-only)", path, err)
	}
	return err
}

// removeStaleTemps deletes temp files an interrupted write left in dir.
// Only names the installer makes match pattern.
func removeStaleTemps(dir, pattern string) {
	stale, _ := filepath.Glob(filepath.Join(dir, pattern))
	for _, f := range stale {
		os.Remove(f)
	}
}

// Unchain removes meshlane's entries from every network config list in the
// config directory (not only the primary: the primary may have changed
// since meshlane chained). A list that came from a .conf stays a list with
// the original plugin as its only entry: the runtime treats it exactly as
// the .conf. Lists that cannot be parsed are left alone, but an error names
// any of them that mentions meshlane-cni.
func Unchain(cfg Config) error {
	cfg = cfg.withDefaults()
	if err := requireDir("CNI config directory", cfg.ConfDir); err != nil {
		return err
	}
	files, err := configFiles(cfg.ConfDir)
	if err != nil {
		return err
	}
	removeStaleTemps(cfg.ConfDir, ".*"+tempSuffix)
	var errs []error
	for _, f := range files {
		if filepath.Ext(f) != ".conflist" {
			continue // single-plugin configs: meshlane never writes one
		}
		data, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", f, err))
			continue
		}
		list, err := parseConflist(data)
		if err != nil {
			if bytes.Contains(data, []byte(PluginType)) {
				errs = append(errs, fmt.Errorf("%s mentions %s but cannot be parsed (%v): remove the entry by hand", f, PluginType, err))
			}
			continue
		}
		changed, err := list.unchain()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %w", f, err))
			continue
		}
		if !changed {
			continue
		}
		out, err := list.encode()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		if err := replaceFile(f, f, data, out); err != nil {
			errs = append(errs, err)
			continue
		}
		cfg.Logger.Info("removed meshlane-cni from the CNI config", zap.String("file", f))
	}
	return errors.Join(errs...)
}

// chainedFiles lists the config lists in dir that still hold a meshlane
// entry (or mention it and cannot be parsed).
func chainedFiles(dir string) ([]string, error) {
	files, err := configFiles(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if !bytes.Contains(data, []byte(PluginType)) {
			continue
		}
		if l, err := parseConflist(data); err == nil && len(l.others()) == len(l.plugins) {
			continue // the name appears, but not as a plugin type
		}
		out = append(out, f)
	}
	return out, nil
}
