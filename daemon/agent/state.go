package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
)

// stateFile is the registry's file name inside the state directory.
const stateFile = "pods.json"

// stateVersion is bumped whenever the file's meaning changes; an agent
// refuses a version it does not know rather than misreading it.
const stateVersion = 1

type stateDoc struct {
	Version int         `json:"version"`
	Pods    []PodRecord `json:"pods"`
}

// persist writes the registry to the state file. Concurrent callers share
// writes: a caller whose change is already in a file written after it
// returns at once, so a burst of N changes costs far fewer than N fsyncs.
func (a *Agent) persist() error {
	a.mu.Lock()
	want := a.gen
	a.mu.Unlock()

	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	if a.savedGen >= want {
		return nil
	}
	a.mu.Lock()
	doc := stateDoc{Version: stateVersion, Pods: a.recordsLocked()}
	gen := a.gen
	a.mu.Unlock()
	// Annotations are left out to keep the file small (Istio's status
	// annotation alone is about a KiB): what they decided is kept in
	// State, Reason and Pod, and a restored pod is never decided again.
	for i := range doc.Pods {
		doc.Pods[i].Event.Annotations = nil
	}
	if err := writeState(a.stateDir, doc); err != nil {
		return err
	}
	a.savedGen = gen
	return nil
}

// persistOrLog persists where a failed write does not change the answer.
func (a *Agent) persistOrLog() {
	if err := a.persist(); err != nil {
		a.log.Error("state file not written; pods added since the last write will be re-checked after a restart", zap.Error(err))
	}
}

// writeState replaces dir/pods.json atomically: temp file, fsync, rename,
// fsync of the directory. A crash leaves the old file or the new one,
// never a mix.
func writeState(dir string, doc stateDoc) error {
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state dir %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, stateFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("write state file in %s: %w", dir, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("fsync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	final := filepath.Join(dir, stateFile)
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("rename state file into %s: %w", final, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open state dir %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync state dir %s: %w", dir, err)
	}
	return nil
}

// readState reads dir/pods.json; a missing file is an empty registry
// (first start on this node).
func readState(dir string) ([]PodRecord, error) {
	path := filepath.Join(dir, stateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state file: %w", err)
	}
	var doc stateDoc
	if err := decodeJSON(bytes.NewReader(data), &doc); err != nil {
		return nil, fmt.Errorf("state file %s is unreadable (%v): move it away to start with no pods; the plugin's retries and the CNI GC re-report live pods", path, err)
	}
	if doc.Version != stateVersion {
		return nil, fmt.Errorf("state file %s has version %d, this agent reads version %d: move it away to start with no pods",
			path, doc.Version, stateVersion)
	}
	return doc.Pods, nil
}

// Restore loads the state file and re-checks every pod in it: a pod whose
// netns is gone or now names another namespace is dropped and deleted
// from the maps; a meshed pod is written into the maps again (the maps are
// pinned and normally still hold it; rewriting is idempotent and repairs
// a datapath that was recreated); a waiting pod gets its watcher back.
// Call it once, before serving the socket, so the plugin never talks to
// an agent that has not yet recovered its pods.
func (a *Agent) Restore() error {
	start := time.Now()
	recs, err := readState(a.stateDir)
	if err != nil {
		return err
	}
	for _, rec := range recs {
		if err := a.restoreOne(rec); err != nil {
			return err
		}
	}
	if err := a.persist(); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	a.log.Info("state restored", zap.Int("in_file", len(recs)), zap.Int("held", len(a.ids())),
		zap.Duration("duration", time.Since(start)))
	return nil
}

func (a *Agent) restoreOne(rec PodRecord) error {
	start := time.Now()
	if err := validateID(rec.Event.ContainerID); err != nil {
		return fmt.Errorf("restore: state file holds an invalid record: %w", err)
	}
	l := a.lockFor(rec.Event.ContainerID)
	l.Lock()
	defer l.Unlock()

	e := &entry{rec: rec}
	a.put(e)
	stale, err := a.netnsStale(e)
	if err != nil {
		// Cannot tell now: keep the pod as it was; the background GC
		// checks again.
		a.log.Warn("restore: cannot check a pod's netns; keeping it", zap.Error(err))
	}
	if stale {
		if err := a.drop(e); err != nil {
			a.log.Warn("restore: pod's netns is gone but its map entries could not be deleted; the background GC retries",
				zap.String("container_id", rec.Event.ContainerID), zap.Error(err))
			return nil
		}
		rec.Reason = "restore: network namespace gone or replaced"
		a.logPod(EventGC, "pod collected", rec, start)
		return nil
	}
	switch rec.State {
	case api.StateMeshed:
		if rec.Pod == nil {
			return fmt.Errorf("restore: meshed pod %s has no datapath entry in the state file: move the file away", rec.Event.ContainerID)
		}
		if rec.Pod.Interface.Name == "" {
			// Recorded by an agent before the tc hooks: attach them now.
			rec.Pod.Interface = podInterface(rec.Event)
		}
		if err := a.maps.UpsertPod(*rec.Pod); err != nil {
			// Refusing to start would leave the whole node without an
			// agent (and, fail closed, without new pods). The pod that
			// does not fit is refused as its ADD would have been: it was
			// recorded just before a crash, its ADD never answered, and
			// the runtime retries it.
			a.forget(e)
			a.log.Error("restore: pod refused: the datapath maps did not take it",
				zap.String("container_id", rec.Event.ContainerID), zap.String("pod", podName(rec.Event)), zap.Error(err))
			return nil
		}
	case api.StateWaiting:
		a.startWatch(e)
	case api.StateNotMeshed:
	default:
		return fmt.Errorf("restore: pod %s has unknown state %q in the state file", rec.Event.ContainerID, rec.State)
	}
	a.logPod(EventAdded, "pod restored", rec, start)
	return nil
}
