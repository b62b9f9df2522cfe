// Package agent is the node agent's control logic: it takes the CNI
// plugin's pod reports (ADD, DEL, CHECK, GC), decides mesh membership,
// keeps the datapath's pod maps current, remembers its pods across
// restarts and serves all of that on a root-only unix socket.
package agent

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podcgroup"
)

// PodMaps is the part of the datapath the agent writes. Both calls must be
// idempotent: the agent re-applies pods after a restart and deletes pods
// that may already be gone from the maps.
type PodMaps interface {
	// AddPod writes a pod at its CNI ADD, before any of its containers
	// runs; UpsertPod writes one at any other time (restore, a pod meshed
	// once its sidecar listens).
	AddPod(datapath.Pod) error
	UpsertPod(datapath.Pod) error
	DeletePod(datapath.Pod) error
}

// DefaultGCInterval is how often the background GC looks for pods whose
// network namespace disappeared without a DEL.
const DefaultGCInterval = 10 * time.Second

// eventRingSize bounds the recent-events history.
const eventRingSize = 1000

// lockStripes is the number of per-pod locks. Pods hash onto them, so two
// requests for the same pod are serialized while requests for different
// pods almost always run in parallel, with no per-pod lock bookkeeping.
const lockStripes = 64

// Config is what the agent needs from its caller.
type Config struct {
	// Maps is the datapath the agent writes meshed pods into.
	Maps PodMaps
	// Profile is the default mesh: the profile of pods whose annotations
	// the runtime did not pass, and the adjusted profile of its mesh.
	Profile mesh.Profile
	// StateDir holds the registry that survives restarts: one file per
	// pod under pods/.
	StateDir string
	// GCInterval is the background GC period; zero means
	// DefaultGCInterval.
	GCInterval time.Duration
	// Logger receives one line per pod event; nil logs nothing.
	Logger *zap.Logger
	// Ready answers /readyz: ready, or the reason it is not. Nil means
	// ready whenever the socket is served.
	Ready func() (bool, string)
	// Debug is the read-only datapath view behind /v1/status, the debug
	// endpoints and /metrics; nil serves them without datapath details.
	Debug DatapathView
	// Version is the agent's build version, reported in status and
	// metrics.
	Version string
	// PodCgroups, when set (pod cgroup scope), resolves each meshed pod's
	// cgroupPath to the cgroup the datapath attaches to; nil is node scope.
	PodCgroups *podcgroup.Resolver
}

// PodRecord is what the agent holds about one pod: the report it got, the
// identity it read, what it decided and what it wrote into the maps.
type PodRecord struct {
	Event       api.PodEvent `json:"event"`
	NetnsCookie uint64       `json:"netnsCookie"`
	// State is api.StateMeshed, api.StateWaiting or api.StateNotMeshed.
	State   string `json:"state"`
	Reason  string `json:"reason"`
	Profile string `json:"profile,omitempty"`
	// Pod is what was written into the maps; set only when meshed.
	Pod     *datapath.Pod `json:"pod,omitempty"`
	Added   time.Time     `json:"added"`
	Changed time.Time     `json:"changed"`
}

// entry is a held pod. rec is written only with both the pod's stripe lock
// and Agent.mu held, so either one is enough to read it.
type entry struct {
	rec PodRecord
	// stopWatch cancels the sidecar watcher of a waiting pod.
	stopWatch context.CancelFunc
}

// Agent holds the node's pods. Create it with New, call Restore before
// serving, then Serve; Close stops its background work.
type Agent struct {
	maps       PodMaps
	profile    mesh.Profile
	stateDir   string
	gcInterval time.Duration
	log        *zap.Logger
	ready      func() (bool, string)
	events     *ring
	view       DatapathView
	version    string
	cgroups    *podcgroup.Resolver
	started    time.Time
	metrics    *metrics
	install    atomic.Pointer[func() api.InstallStatus]
	// fault is the crash-test fault point (see FaultEnv); noFault outside
	// crash tests.
	fault fault

	// waitFor are the sidecars a waiting pod may turn out to have: the
	// default profile first, then the other meshes, each with its
	// annotation-free settings.
	waitFor []mesh.Decision

	locks [lockStripes]sync.Mutex

	mu   sync.Mutex // guards pods
	pods map[string]*entry

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	srv *http.Server
}

// New checks cfg, creates the state directory and starts the background
// GC. It does not read the state files: call Restore before serving.
func New(cfg Config) (*Agent, error) {
	if cfg.Maps == nil {
		return nil, errors.New("agent: Config.Maps is nil: the agent needs the datapath to write")
	}
	if cfg.StateDir == "" {
		return nil, errors.New("agent: Config.StateDir is empty: set the directory of the pod state files")
	}
	if cfg.GCInterval < 0 {
		return nil, fmt.Errorf("agent: GC interval %s is negative", cfg.GCInterval)
	}
	if cfg.GCInterval == 0 {
		cfg.GCInterval = DefaultGCInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	waitFor, err := waitProfiles(cfg.Profile)
	if err != nil {
		return nil, err
	}
	flt, err := faultFromEnv()
	if err != nil {
		return nil, err
	}
	if err := makePodsDir(cfg.StateDir); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{
		maps:       cfg.Maps,
		profile:    cfg.Profile,
		stateDir:   cfg.StateDir,
		gcInterval: cfg.GCInterval,
		log:        cfg.Logger,
		ready:      cfg.Ready,
		events:     newRing(eventRingSize),
		view:       cfg.Debug,
		version:    cfg.Version,
		cgroups:    cfg.PodCgroups,
		started:    time.Now(),
		waitFor:    waitFor,
		fault:      flt,
		pods:       make(map[string]*entry),
		ctx:        ctx,
		cancel:     cancel,
	}
	a.metrics = newMetrics(a)
	a.srv = a.newServer()
	a.wg.Add(1)
	go a.gcLoop()
	return a, nil
}

// waitProfiles lists the default profile and then the other built-in
// meshes, each with the settings of a pod without annotations.
func waitProfiles(def mesh.Profile) ([]mesh.Decision, error) {
	var out []mesh.Decision
	for _, p := range []mesh.Profile{def, mesh.Istio, mesh.Linkerd} {
		if slices.ContainsFunc(out, func(d mesh.Decision) bool { return d.Profile.Name == p.Name }) {
			continue
		}
		d, err := mesh.Decide(nil, p)
		if err != nil {
			return nil, fmt.Errorf("agent: mesh profile %q: %w", p.Name, err)
		}
		out = append(out, d)
	}
	return out, nil
}

// Close stops the background GC and the sidecar watchers and waits for
// them. It leaves the maps as they are: a stopped agent keeps redirecting.
func (a *Agent) Close() {
	a.cancel()
	a.wg.Wait()
}

// Events returns the recent events, oldest first.
func (a *Agent) Events() []Event { return a.events.all() }

// Pods returns a copy of every held record, sorted by container id.
func (a *Agent) Pods() []PodRecord {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]PodRecord, 0, len(a.pods))
	for _, e := range a.pods {
		out = append(out, e.rec)
	}
	slices.SortFunc(out, func(x, y PodRecord) int {
		switch {
		case x.Event.ContainerID < y.Event.ContainerID:
			return -1
		case x.Event.ContainerID > y.Event.ContainerID:
			return 1
		}
		return 0
	})
	return out
}

// lockFor returns the stripe lock serializing work on one container id.
// Netns syscalls run under it, never under a.mu.
func (a *Agent) lockFor(id string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(id))
	return &a.locks[h.Sum32()%lockStripes]
}

func (a *Agent) get(id string) *entry {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pods[id]
}

func (a *Agent) ids() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]string, 0, len(a.pods))
	for id := range a.pods {
		out = append(out, id)
	}
	return out
}

// update changes a held record; the caller holds the pod's stripe lock.
func (a *Agent) update(e *entry, fn func(*PodRecord)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	fn(&e.rec)
	e.rec.Changed = time.Now()
}

// put adds or replaces a record; the caller holds the pod's stripe lock.
func (a *Agent) put(e *entry) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pods[e.rec.Event.ContainerID] = e
}

// drop removes e from the maps and then from the registry. The caller
// holds the pod's stripe lock. If the maps refuse the delete, the pod stays
// held so that a retry can remove it.
//
// A pod still waiting for its sidecar may be in the maps too: an agent
// killed while meshing it (promote) wrote the maps but not its state file.
// Its entries are keyed by its netns cookie, which no other pod ever has,
// and DeletePod removes an address only while it names that cookie, so
// deleting them is safe whether or not they exist.
func (a *Agent) drop(e *entry) error {
	pod := e.rec.Pod
	if pod == nil && e.rec.State == api.StateWaiting {
		ips, _ := parseIPs(e.rec.Event.IPs)
		pod = &datapath.Pod{NetnsCookie: e.rec.NetnsCookie, IPs: ips}
	}
	if pod != nil {
		if err := a.maps.DeletePod(*pod); err != nil {
			return fmt.Errorf("delete pod %s (netns cookie %d) from the datapath maps: %w",
				e.rec.Event.ContainerID, e.rec.NetnsCookie, err)
		}
	}
	a.forget(e)
	return nil
}

// forget removes e from the registry and stops its watcher, leaving the
// maps alone. The caller holds the pod's stripe lock.
func (a *Agent) forget(e *entry) {
	if e.stopWatch != nil {
		e.stopWatch()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.pods[e.rec.Event.ContainerID] == e {
		delete(a.pods, e.rec.Event.ContainerID)
	}
}

// holdsCookie reports whether any held pod has netns cookie c.
func (a *Agent) holdsCookie(c uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, e := range a.pods {
		if e.rec.NetnsCookie == c {
			return true
		}
	}
	return false
}

// unheldIPs returns those of ips that no held pod reports.
func (a *Agent) unheldIPs(ips []netip.Addr) []netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	held := make(map[netip.Addr]bool)
	for _, e := range a.pods {
		for _, s := range e.rec.Event.IPs {
			if ip, err := parseIP(s); err == nil {
				held[ip] = true
			}
		}
	}
	var out []netip.Addr
	for _, ip := range ips {
		if !held[ip] {
			out = append(out, ip)
		}
	}
	return out
}

// parseIPs parses a validated event's addresses again.
func parseIPs(ss []string) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(ss))
	for _, s := range ss {
		ip, err := parseIP(s)
		if err != nil {
			return nil, err
		}
		out = append(out, ip)
	}
	return out, nil
}

// logPod writes the one structured line of a pod event and records it in
// the event ring.
func (a *Agent) logPod(kind, msg string, rec PodRecord, start time.Time) {
	a.log.Info(msg,
		zap.String("event", kind),
		zap.String("container_id", rec.Event.ContainerID),
		zap.String("pod", podName(rec.Event)),
		zap.Uint64("netns_cookie", rec.NetnsCookie),
		zap.String("state", rec.State),
		zap.String("reason", rec.Reason),
		zap.String("profile", rec.Profile),
		zap.Duration("duration", time.Since(start)),
	)
	a.events.add(Event{
		Time:        time.Now(),
		Kind:        kind,
		ContainerID: rec.Event.ContainerID,
		Pod:         podName(rec.Event),
		State:       rec.State,
		Message:     rec.Reason,
	})
}

// podCgroup is the cgroup directory a meshed pod's cgroup programs go to
// in pod scope, "" in node scope.
func (a *Agent) podCgroup(ev api.PodEvent) (string, error) {
	if a.cgroups == nil {
		return "", nil
	}
	dir, err := a.cgroups.Resolve(ev.CgroupPath)
	if err != nil {
		return "", fmt.Errorf("pod cgroup (the agent runs with --cgroup-scope pod): %w", err)
	}
	return dir, nil
}

// podInterface is where a meshed pod's tc program goes: the interface the
// CNI plugin reported, in the pod's netns.
func podInterface(ev api.PodEvent) datapath.PodInterface {
	return datapath.PodInterface{Netns: ev.Netns, Name: ev.IfName}
}

func podName(ev api.PodEvent) string {
	if ev.PodNamespace == "" && ev.PodName == "" {
		return ""
	}
	return ev.PodNamespace + "/" + ev.PodName
}

func response(rec PodRecord) api.PodResponse {
	return api.PodResponse{ContainerID: rec.Event.ContainerID, State: rec.State, Reason: rec.Reason}
}

// statusError carries the HTTP status a failure is answered with.
type statusError struct {
	code int
	err  error
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

func withStatus(code int, err error) error { return &statusError{code: code, err: err} }
