package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/atomicfile"
)

// The registry on disk is one small file per pod,
// <stateDir>/pods/<containerID>.json, so that an ADD or DEL writes or
// removes one file of about a KiB whatever the number of pods on the node.
// A container id starts with an alphanumeric and holds only alphanumerics,
// '_', '.' and '-' (validateID), so it is always a plain file name: never
// "." or "..", never a path, never hidden, and at most maxContainerIDLen
// bytes so that <id>.json fits in a file name. Temp files start with a
// dot and therefore never collide with a pod's file.
const (
	podsDir     = "pods"
	podFileExt  = ".json"
	tmpFilePref = ".tmp-"
)

// stateVersion is bumped whenever a pod file's meaning changes; an agent
// refuses a version it does not know rather than misreading it.
const stateVersion = 1

// podFile is the content of one pod's state file.
type podFile struct {
	Version int       `json:"version"`
	Pod     PodRecord `json:"pod"`
}

// legacyStateFile is the registry of agents before per-pod files: every
// pod in one file, rewritten at every ADD and DEL. Restore migrates it.
const legacyStateFile = "pods.json"

// legacyVersion is the only version legacyStateFile ever had.
const legacyVersion = 1

type legacyDoc struct {
	Version int         `json:"version"`
	Pods    []PodRecord `json:"pods"`
}

func (a *Agent) podsPath() string { return filepath.Join(a.stateDir, podsDir) }

// makePodsDir creates the pods directory and makes its entry in the state
// directory durable, so that the first pod file written into it survives
// a node crash with it.
func makePodsDir(stateDir string) error {
	dir := filepath.Join(stateDir, podsDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state dir %s: %w", dir, err)
	}
	return atomicfile.SyncDir(stateDir)
}

// savePod replaces the pod's state file atomically: temp file, fsync,
// rename, fsync of the directory. A crash leaves the old file or the new
// one, never a mix. The caller holds the pod's stripe lock (or is Restore,
// before serving), which is what keeps two writes of one pod's file apart;
// files of different pods are written in parallel.
func (a *Agent) savePod(rec PodRecord) error {
	// Annotations are left out to keep the file small (Istio's status
	// annotation alone is about a KiB): what they decided is kept in
	// State, Reason and Pod, and a restored pod is never decided again.
	rec.Event.Annotations = nil
	data, err := json.MarshalIndent(podFile{Version: stateVersion, Pod: rec}, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state of pod %s: %w", rec.Event.ContainerID, err)
	}
	final := filepath.Join(a.podsPath(), rec.Event.ContainerID+podFileExt)
	err = atomicfile.Write(final, tmpFilePref+"*", func(f *os.File) error {
		_, err := f.Write(data)
		return err
	}, nil)
	if err != nil {
		return fmt.Errorf("state file of pod %s: %w", rec.Event.ContainerID, err)
	}
	return nil
}

// removePod deletes the pod's state file and makes the removal durable. A
// file already gone is no error: removing is idempotent like DEL.
func (a *Agent) removePod(id string) error {
	path := filepath.Join(a.podsPath(), id+podFileExt)
	if err := os.Remove(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove state file: %w", err)
	}
	return atomicfile.SyncDir(a.podsPath())
}

// logStateErr logs a state file write or removal that failed where the
// failure does not change the answer: the pod's file then still says what
// it said before, and a restarted agent re-checks that against the pod's
// netns (Restore).
func (a *Agent) logStateErr(id string, err error) {
	if err != nil {
		a.log.Error("pod state file not updated; after a restart the agent re-checks the pod as the older file describes it",
			zap.String("container_id", id), zap.Error(err))
	}
}

// readPods reads every pod file of the pods directory. Leftover temp files
// (a write killed before its rename) are removed; a file whose name is no
// pod file's is left alone and logged, as it holds nothing this agent
// wrote.
//
// One unreadable file (corrupt, unknown version, or holding another pod
// than its name says) stops the agent from starting, as a corrupt
// pods.json always did, rather than being skipped: the pod it describes
// may have entries in the maps, keyed by its netns cookie and by
// addresses the IPAM hands to the next pod, and only its record lets
// Restore re-apply or delete them. The error names each such file and
// what to do; nothing is changed before it, so every other pod's file is
// still there when the agent starts again.
func (a *Agent) readPods() ([]PodRecord, error) {
	dir := a.podsPath()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read state dir: %w", err)
	}
	var recs []PodRecord
	var bad []error
	for _, ent := range ents {
		name := ent.Name()
		path := filepath.Join(dir, name)
		if strings.HasPrefix(name, tmpFilePref) {
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("remove leftover temp file: %w", err)
			}
			continue
		}
		id, ok := strings.CutSuffix(name, podFileExt)
		if !ok || !ent.Type().IsRegular() || validateID(id) != nil {
			a.log.Warn("state dir holds a file that is no pod's state file; ignoring it", zap.String("path", path))
			continue
		}
		rec, err := readPod(path, id)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		recs = append(recs, rec)
	}
	switch len(bad) {
	case 0:
		return recs, nil
	case 1:
		return nil, bad[0]
	default:
		// One line per file would bury the message under hundreds of them
		// when, say, a newer agent wrote them all.
		return nil, fmt.Errorf("%d state files in %s cannot be read, the first: %w", len(bad), dir, bad[0])
	}
}

// readPod reads one pod's state file; id is the container id its name
// gives.
func readPod(path, id string) (PodRecord, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return PodRecord{}, fmt.Errorf("read state file: %w", err)
	}
	var f podFile
	if err := decodeJSON(bytes.NewReader(data), &f); err != nil {
		return PodRecord{}, fmt.Errorf("state file %s is unreadable (%v): move it away to start without that pod; "+
			"the runtime's retried ADD or its DEL cleans up what the pod left in the maps", path, err)
	}
	if f.Version != stateVersion {
		return PodRecord{}, fmt.Errorf("state file %s has version %d, this agent reads version %d: "+
			"run the agent version that wrote it, or move it away to start without that pod", path, f.Version, stateVersion)
	}
	rec := f.Pod
	if rec.Event.ContainerID != id {
		return PodRecord{}, fmt.Errorf("state file %s holds container %q, not the one its name says: move it away to start without that pod",
			path, rec.Event.ContainerID)
	}
	switch {
	case rec.State == api.StateMeshed && rec.Pod == nil:
		return PodRecord{}, fmt.Errorf("state file %s records a meshed pod without its datapath entry: move it away to start without that pod", path)
	case rec.State != api.StateMeshed && rec.State != api.StateWaiting && rec.State != api.StateNotMeshed:
		return PodRecord{}, fmt.Errorf("state file %s records unknown pod state %q: move it away to start without that pod", path, rec.State)
	}
	return rec, nil
}

// migrateLegacy turns a legacy pods.json into pod files, then removes it.
// While pods.json exists it is the registry: every pod file is written
// from it and any pod file it does not list is removed before pods.json
// goes, so an agent killed anywhere in between simply migrates again at
// its next start. (Pod files it does not list can only come from an agent
// that ran on this node before a downgrade: the downgraded agent
// maintained pods.json since.)
func (a *Agent) migrateLegacy() error {
	path := filepath.Join(a.stateDir, legacyStateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read legacy state file: %w", err)
	}
	var doc legacyDoc
	if err := decodeJSON(bytes.NewReader(data), &doc); err != nil {
		return fmt.Errorf("state file %s is unreadable (%v): move it away to start with no pods; the plugin's retries and the CNI GC re-report live pods", path, err)
	}
	if doc.Version != legacyVersion {
		return fmt.Errorf("state file %s has version %d, this agent reads version %d: move it away to start with no pods",
			path, doc.Version, legacyVersion)
	}
	listed := make(map[string]bool, len(doc.Pods))
	for _, rec := range doc.Pods {
		if err := validateID(rec.Event.ContainerID); err != nil {
			return fmt.Errorf("state file %s holds an invalid record (%w): move it away to start with no pods", path, err)
		}
		if err := a.savePod(rec); err != nil {
			return fmt.Errorf("migrate %s: %w", path, err)
		}
		listed[rec.Event.ContainerID] = true
	}
	ents, err := os.ReadDir(a.podsPath())
	if err != nil {
		return fmt.Errorf("migrate %s: read state dir: %w", path, err)
	}
	for _, ent := range ents {
		id, ok := strings.CutSuffix(ent.Name(), podFileExt)
		if ok && ent.Type().IsRegular() && validateID(id) == nil && !listed[id] {
			if err := a.removePod(id); err != nil {
				return fmt.Errorf("migrate %s: %w", path, err)
			}
		}
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("migrate: remove %s: %w", path, err)
	}
	if err := atomicfile.SyncDir(a.stateDir); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	a.log.Info("legacy state file migrated to one file per pod", zap.String("from", path),
		zap.String("to", a.podsPath()), zap.Int("pods", len(doc.Pods)))
	return nil
}

// Restore loads the pod files and re-checks every pod in them: a pod whose
// netns is gone or now names another namespace is dropped and deleted
// from the maps; a meshed pod is written into the maps again (the maps are
// pinned and normally still hold it; rewriting is idempotent and repairs
// a datapath that was recreated); a waiting pod gets its watcher back.
// Call it once, before serving the socket, so the plugin never talks to
// an agent that has not yet recovered its pods.
func (a *Agent) Restore() error {
	start := time.Now()
	if err := a.migrateLegacy(); err != nil {
		return err
	}
	recs, err := a.readPods()
	if err != nil {
		return err
	}
	for _, rec := range recs {
		a.restoreOne(rec)
	}
	a.log.Info("state restored", zap.Int("in_files", len(recs)), zap.Int("held", len(a.ids())),
		zap.Duration("duration", time.Since(start)))
	return nil
}

// restoreOne re-checks one pod of a read (so validated) pod file.
func (a *Agent) restoreOne(rec PodRecord) {
	start := time.Now()
	id := rec.Event.ContainerID
	l := a.lockFor(id)
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
				zap.String("container_id", id), zap.Error(err))
			return
		}
		a.logStateErr(id, a.removePod(id))
		rec.Reason = "restore: network namespace gone or replaced"
		a.logPod(EventGC, "pod collected", rec, start)
		return
	}
	switch rec.State {
	case api.StateMeshed:
		if rec.Pod.Interface.Name == "" {
			// Recorded by an agent before the tc hooks: attach them now.
			rec.Pod.Interface = podInterface(rec.Event)
		}
		// The scope may have changed since the pod was recorded.
		cg, err := a.podCgroup(rec.Event)
		if err != nil {
			a.log.Error("restore: the pod's cgroup cannot be resolved (pod cgroup scope)",
				zap.String("container_id", id), zap.String("pod", podName(rec.Event)), zap.Error(err))
		}
		rec.Pod.Cgroup = cg
		if err := a.maps.UpsertPod(*rec.Pod); err != nil {
			// Refusing to start would leave the whole node without an
			// agent (and, fail closed, without new pods). The pod that
			// does not fit is refused as its ADD would have been: it was
			// recorded just before a crash, its ADD never answered, and
			// the runtime retries it.
			a.forget(e)
			a.logStateErr(id, a.removePod(id))
			a.log.Error("restore: pod refused: the datapath did not take it",
				zap.String("container_id", id), zap.String("pod", podName(rec.Event)), zap.Error(err))
			// What a previous agent wrote for it goes too: half a pod
			// (steered inbound, not redirected outbound) is worse than none.
			if err := a.maps.DeletePod(*rec.Pod); err != nil {
				a.log.Warn("restore: the refused pod's datapath entries could not be removed",
					zap.String("container_id", id), zap.Error(err))
			}
			return
		}
	case api.StateWaiting:
		a.startWatch(e)
	}
	a.logPod(EventAdded, "pod restored", rec, start)
}
