package install

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"
)

// Timing of the watch loop.
const (
	// settleDelay lets a burst of events (a primary CNI writing its file
	// in several steps) end before the installer reads the file.
	settleDelay = 100 * time.Millisecond
	// minInterval spaces two looks at the directory: the rate limit that
	// bounds how fast any write loop could spin.
	minInterval = 250 * time.Millisecond
	// fightInterval replaces minInterval while another writer keeps
	// removing meshlane's entry.
	fightInterval = 5 * time.Second
	// fightWindow is the window FightLimit counts rewrites in.
	fightWindow = time.Minute
)

// State is what the installer has done so far; the agent's readiness
// reads it.
type State struct {
	// BinaryInstalled is true once meshlane-cni is in the bin directory.
	BinaryInstalled bool
	// ConfList is the config list that holds meshlane's entry, empty
	// while none does (no primary config yet, or the last attempt failed).
	ConfList string
	// Writes counts the config rewrites made since Watch started.
	Writes int
	// Err is the last attempt's failure, nil once chained. IsWaiting(Err)
	// tells the wait for a primary config from a real problem.
	Err error
}

// Ready tells whether pods started now go through meshlane-cni.
func (s State) Ready() bool {
	return s.BinaryInstalled && s.ConfList != "" && s.Err == nil
}

func (s State) same(o State) bool {
	return s.BinaryInstalled == o.BinaryInstalled && s.ConfList == o.ConfList && s.Writes == o.Writes &&
		errString(s.Err) == errString(o.Err)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// Watch installs the plugin binary, then keeps meshlane's entry last in the
// primary network config until ctx ends: it waits for the primary CNI to
// write a config, chains it, and chains it again whenever the primary CNI
// rewrites or replaces it. The installer's own writes cause no further
// write, because chaining a chained file writes nothing; looks at the
// directory are rate limited, and a writer that keeps removing the entry is
// reported (FightLimit) and answered more slowly. onState, if set, gets
// every new State, from Watch's goroutine. Watch returns nil when ctx ends
// and an error only for a bad Config or when inotify is unavailable.
func Watch(ctx context.Context, cfg Config, onState func(State)) error {
	cfg = cfg.withDefaults()
	for _, d := range []struct{ name, dir string }{{"CNI bin directory", cfg.BinDir}, {"CNI config directory", cfg.ConfDir}} {
		if err := requireDir(d.name, d.dir); err != nil {
			return err
		}
	}
	if err := cfg.validatePlugin(); err != nil {
		return err
	}
	if cfg.PluginSrc == "" {
		return errors.New("install: no plugin source binary given (--plugin-src)")
	}
	if onState == nil {
		onState = func(State) {}
	}
	w := &watcher{cfg: cfg, log: cfg.Logger, onState: onState}

	tick := time.NewTicker(cfg.RetryInterval)
	defer tick.Stop()
	// The binary goes first: a chained entry whose binary is missing
	// fails every pod on the node.
	for {
		err := InstallBinary(cfg)
		if err == nil {
			break
		}
		w.publish(State{Err: err})
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
	w.state.BinaryInstalled = true
	removeStaleTemps(cfg.ConfDir, ".*"+tempSuffix)

	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("install: watch %s: %w (raise fs.inotify.max_user_instances on the node)", cfg.ConfDir, err)
	}
	defer fsw.Close()
	w.fsw = fsw
	w.timer = time.NewTimer(0)
	w.pending, w.due = true, time.Now()

	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-fsw.Events:
			if !ok {
				return errors.New("install: the inotify watcher stopped")
			}
			if w.relevant(ev) {
				w.schedule(settleDelay)
			}
		case err, ok := <-fsw.Errors:
			if !ok {
				return errors.New("install: the inotify watcher stopped")
			}
			// Usually a queue overflow: events were lost, so look.
			w.log.Warn("watching the CNI config directory", zap.String("dir", cfg.ConfDir), zap.Error(err))
			w.schedule(settleDelay)
		case <-w.timer.C:
			w.pending = false
			w.reconcile()
		case <-tick.C:
			w.schedule(0)
		}
	}
}

// watcher is Watch's loop state; only Watch's goroutine touches it.
type watcher struct {
	cfg     Config
	log     *zap.Logger
	onState func(State)
	fsw     *fsnotify.Watcher

	watching bool // the config directory is in fsw

	timer   *time.Timer
	pending bool      // timer is set
	due     time.Time // when timer fires
	lastRun time.Time

	rewrites []time.Time // own writes within fightWindow
	warned   time.Time   // last fight warning

	state     State
	published *State
}

// relevant tells whether an event may have changed which file is the
// primary config or what it holds.
func (w *watcher) relevant(ev fsnotify.Event) bool {
	if ev.Name == w.cfg.ConfDir {
		// The directory itself went away: its watch is gone with it.
		if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
			w.watching = false
			return true
		}
		return false
	}
	if ev.Op == fsnotify.Chmod || filepath.Dir(ev.Name) != w.cfg.ConfDir {
		return false
	}
	return isConfigFile(ev.Name)
}

// schedule arranges a look at the directory after d, but no sooner than
// the rate limit allows and no later than one already planned.
func (w *watcher) schedule(d time.Duration) {
	at := time.Now().Add(d)
	if earliest := w.lastRun.Add(w.interval()); at.Before(earliest) {
		at = earliest
	}
	if w.pending && !at.Before(w.due) {
		return
	}
	w.timer.Reset(time.Until(at))
	w.pending, w.due = true, at
}

// interval is the current rate limit.
func (w *watcher) interval() time.Duration {
	if w.fighting(time.Now()) {
		return fightInterval
	}
	return minInterval
}

// reconcile chains the primary config if it needs it and publishes the
// outcome.
func (w *watcher) reconcile() {
	now := time.Now()
	w.lastRun = now
	if !w.watching {
		if err := w.fsw.Add(w.cfg.ConfDir); err != nil {
			w.state.ConfList, w.state.Err = "", fmt.Errorf("install: watch CNI config directory %s: %w (retrying every %s)", w.cfg.ConfDir, err, w.cfg.RetryInterval)
			w.publish(w.state)
			return
		}
		w.watching = true
	}
	// Something on the node (a CNI installer cleaning its bin directory)
	// may have deleted the binary: without it every pod's ADD fails.
	if _, err := os.Stat(filepath.Join(w.cfg.BinDir, PluginType)); errors.Is(err, fs.ErrNotExist) {
		w.log.Warn("the CNI plugin binary disappeared; copying it again", zap.String("dir", w.cfg.BinDir))
		if err := InstallBinary(w.cfg); err != nil {
			w.state.BinaryInstalled, w.state.Err = false, err
			w.publish(w.state)
			return
		}
		w.state.BinaryInstalled = true
	}
	res, err := chainDir(w.cfg)
	if errors.Is(err, errRaced) {
		// The primary CNI is writing right now: not a failure, look again
		// once it is done.
		w.schedule(settleDelay)
		return
	}
	if err != nil {
		w.state.ConfList, w.state.Err = "", err
		w.publish(w.state)
		return
	}
	if res.changed {
		w.state.Writes++
		w.countRewrite(now, res.path)
	}
	w.state.ConfList, w.state.Err = res.path, nil
	w.publish(w.state)
}

// countRewrite records one of the installer's writes and warns, at most once
// per window, when another writer keeps undoing them.
func (w *watcher) countRewrite(now time.Time, path string) {
	w.rewrites = append(w.rewrites, now)
	if w.fighting(now) && now.Sub(w.warned) >= fightWindow {
		w.warned = now
		w.log.Warn("another writer keeps removing meshlane-cni from the CNI config; re-adding it, now at most every "+fightInterval.String()+
			": find the process rewriting the file (primary CNI operator, node config management) and make it keep other plugins",
			zap.String("file", path), zap.Int("rewrites_last_minute", len(w.rewrites)))
	}
}

// fighting drops rewrites older than the window and tells whether the
// ones left exceed FightLimit.
func (w *watcher) fighting(now time.Time) bool {
	cut := now.Add(-fightWindow)
	i := 0
	for i < len(w.rewrites) && !w.rewrites[i].After(cut) {
		i++
	}
	w.rewrites = w.rewrites[i:]
	return len(w.rewrites) > w.cfg.FightLimit
}

// publish hands a changed state to onState and logs the change.
func (w *watcher) publish(s State) {
	if w.published != nil && w.published.same(s) {
		return
	}
	switch {
	case s.Err != nil && IsWaiting(s.Err):
		w.log.Info("waiting for the primary CNI config", zap.String("dir", w.cfg.ConfDir))
	case s.Err != nil:
		w.log.Warn("CNI install not done; retrying", zap.Error(s.Err))
	case w.published == nil || w.published.ConfList != s.ConfList || w.published.Err != nil:
		w.log.Info("CNI install ready", zap.String("file", s.ConfList))
	}
	w.published = &s
	w.onState(s)
}
