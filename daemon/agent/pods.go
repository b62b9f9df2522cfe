package agent

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/datapath"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podns"
)

// Write order and crash safety.
//
// ADD writes the pod's state file first, then the datapath maps, then
// answers; DEL deletes from the maps first, then removes the pod's state
// file. So the state files list every pod the maps may hold, and a
// restarted agent (Restore) either re-applies a pod or, its netns gone,
// deletes its entries. Killed at any point of ADD (each point is a fault of
// faults.go, exercised by test/e2e/faults_test.go):
//   - before the state file: nothing was written; the plugin saw no
//     answer and fails the ADD, so the runtime tears the sandbox down and
//     retries with a new one.
//   - after the state file, before the maps or before the answer: the
//     restarted agent holds the pod. If the runtime kept the sandbox, the
//     agent writes the pod into the maps again (idempotent) and the
//     runtime's DEL or retried ADD finds it held; if the runtime tore the
//     sandbox down meanwhile (its DEL could not reach a dead agent, and the
//     plugin lets DEL succeed), the netns is gone and Restore deletes the
//     pod's entries.
// Writing the maps first instead would leave entries no agent knows of in
// that last case, keyed by a dead netns and by addresses the IPAM hands to
// the next pod, which would then be redirected to a sidecar it lacks.
// Killed in DEL after the maps, before the state file is removed: the
// restarted agent still lists the pod and drops it, its netns being gone,
// or re-applies it until the background GC sees the netns go.

// Add handles a CNI ADD. It answers only once the pod's redirect is in the
// maps, so the pod's first packet is already redirected.
func (a *Agent) Add(ev api.PodEvent) (api.PodResponse, error) {
	start := time.Now()
	ips, err := validateAdd(ev)
	if err != nil {
		return api.PodResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("ADD: %w", err))
	}
	l := a.lockFor(ev.ContainerID)
	l.Lock()
	defer l.Unlock()

	cookie, err := podns.NetnsCookie(ev.Netns)
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, podns.ErrGone) {
			code = http.StatusBadRequest
		}
		return api.PodResponse{}, withStatus(code, fmt.Errorf("ADD %s: read netns cookie: %w", ev.ContainerID, err))
	}
	a.crashAt(faultAddAfterCookie)

	old := a.get(ev.ContainerID)
	if old != nil && old.rec.NetnsCookie == cookie {
		// A retry of an ADD already done (or answered and lost).
		a.log.Debug("ADD repeated; pod already held", zap.String("container_id", ev.ContainerID))
		return response(old.rec), nil
	}

	d, err := mesh.Decide(ev.Annotations, a.profile)
	if err != nil {
		return api.PodResponse{}, withStatus(http.StatusBadRequest,
			fmt.Errorf("ADD %s: pod annotations: %w", ev.ContainerID, err))
	}

	if old != nil {
		// The runtime reused the container id's netns path for a new
		// namespace (ADD without DEL): the old entries must go first so
		// no map ever holds both.
		if err := a.drop(old); err != nil {
			return api.PodResponse{}, withStatus(http.StatusInternalServerError, fmt.Errorf("ADD %s: replace: %w", ev.ContainerID, err))
		}
		old.rec.Reason = "replaced: the netns path now names another network namespace"
		a.logPod(EventDeleted, "pod replaced", old.rec, start)
	}

	now := time.Now()
	e := &entry{rec: PodRecord{
		Event:       ev,
		NetnsCookie: cookie,
		Reason:      d.Reason,
		Profile:     d.Profile.Name,
		Added:       now,
		Changed:     now,
	}}
	switch d.Membership {
	case mesh.Meshed:
		cg, err := a.podCgroup(ev)
		if err != nil {
			return api.PodResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("ADD %s: %w", ev.ContainerID, err))
		}
		if err := prepareNetns(ev.Netns, d.Profile, ips); err != nil {
			return api.PodResponse{}, withStatus(http.StatusInternalServerError, fmt.Errorf("ADD %s: %w", ev.ContainerID, err))
		}
		pod := d.Settings.Pod(cookie, ips, podInterface(ev), cg)
		e.rec.State = api.StateMeshed
		e.rec.Pod = &pod
	case mesh.NotMeshed:
		e.rec.State = api.StateNotMeshed
	default:
		// Unknown: never cached as not meshed; the watcher decides once a
		// sidecar listener shows up.
		e.rec.State = api.StateWaiting
	}
	a.put(e)
	if err := a.savePod(e.rec); err != nil {
		// Nothing is in the maps yet: forget the pod, and the runtime
		// retries. A replaced pod's file may still describe the old
		// netns; Restore drops it as stale.
		a.forget(e)
		return api.PodResponse{}, withStatus(http.StatusInternalServerError, fmt.Errorf("ADD %s: %w", ev.ContainerID, err))
	}
	a.crashAt(faultAddAfterState)
	if e.rec.Pod != nil {
		if err := a.maps.AddPod(*e.rec.Pod); err != nil {
			// AddPod took back what it wrote: forget the pod too, so
			// that a restart does not try again what did not fit.
			a.forget(e)
			a.logStateErr(ev.ContainerID, a.removePod(ev.ContainerID))
			a.log.Error("pod refused: the datapath maps did not take it; the plugin fails its ADD and the runtime retries",
				zap.String("container_id", ev.ContainerID), zap.String("pod", podName(ev)), zap.Error(err))
			return api.PodResponse{}, withStatus(http.StatusInternalServerError,
				fmt.Errorf("ADD %s: write pod into the datapath maps: %w", ev.ContainerID, err))
		}
	}
	a.crashAt(faultAddAfterMaps)
	if e.rec.State == api.StateWaiting {
		a.startWatch(e)
	}
	a.logPod(EventAdded, "pod added", e.rec, start)
	return response(e.rec), nil
}

// Del handles a CNI DEL. It succeeds for a container the agent does not
// hold, since DEL must be idempotent.
func (a *Agent) Del(ev api.PodEvent) (api.PodResponse, error) {
	start := time.Now()
	if err := validateID(ev.ContainerID); err != nil {
		return api.PodResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("DEL: %w", err))
	}
	l := a.lockFor(ev.ContainerID)
	l.Lock()
	defer l.Unlock()

	e := a.get(ev.ContainerID)
	if e == nil {
		a.cleanUnheld(ev)
		return api.PodResponse{ContainerID: ev.ContainerID, State: api.StateUnknownPod,
			Reason: "container not held by the agent: nothing to delete"}, nil
	}
	if err := a.drop(e); err != nil {
		return api.PodResponse{}, withStatus(http.StatusInternalServerError, fmt.Errorf("DEL: %w", err))
	}
	a.crashAt(faultDelAfterMaps)
	// A failed removal here is harmless: the stale record names a netns
	// that is about to go, and Restore drops such records.
	a.logStateErr(ev.ContainerID, a.removePod(ev.ContainerID))
	a.crashAt(faultDelAfterState)
	rec := e.rec
	rec.State = api.StateDeleted
	rec.Reason = "CNI DEL"
	a.logPod(EventDeleted, "pod deleted", rec, start)
	return response(rec), nil
}

// cleanUnheld removes map entries a DEL'd container may have left behind
// although the agent does not hold it: an agent of an earlier version,
// which wrote the maps before the state file, was killed between the two,
// or the pod's state file was lost. Only the netns cookie, while the netns
// still exists, and addresses no held pod uses are deleted, so a live pod
// is never touched.
func (a *Agent) cleanUnheld(ev api.PodEvent) {
	if ev.Netns == "" {
		return
	}
	cookie, err := podns.NetnsCookie(ev.Netns)
	if err != nil || a.holdsCookie(cookie) {
		return
	}
	pod := datapath.Pod{NetnsCookie: cookie}
	if ips, err := parseIPs(ev.IPs); err == nil {
		pod.IPs = a.unheldIPs(ips)
	}
	if err := a.maps.DeletePod(pod); err != nil {
		a.log.Warn("DEL of an unheld container: deleting its possible map entries failed; they stay until the node restarts",
			zap.String("container_id", ev.ContainerID), zap.Uint64("netns_cookie", cookie), zap.Error(err))
	}
}

// Check handles a CNI CHECK: 404 when the container is not held.
func (a *Agent) Check(ev api.PodEvent) (api.PodResponse, error) {
	if err := validateID(ev.ContainerID); err != nil {
		return api.PodResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("CHECK: %w", err))
	}
	e := a.get(ev.ContainerID)
	if e == nil {
		return api.PodResponse{}, withStatus(http.StatusNotFound,
			fmt.Errorf("CHECK: container %s is not held by the agent (never added, deleted, or collected): run ADD again", ev.ContainerID))
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return response(e.rec), nil
}

// GC handles the CNI GC verb: every held pod whose (container id,
// interface) is not among the valid attachments is dropped.
func (a *Agent) GC(valid []api.Attachment) (api.GCResponse, error) {
	keep := make(map[api.Attachment]bool, len(valid))
	for _, v := range valid {
		keep[v] = true
	}
	removed, errs := a.collect(EventGC, "not among the runtime's valid attachments (CNI GC)",
		func(e *entry) (bool, error) {
			return !keep[api.Attachment{ContainerID: e.rec.Event.ContainerID, IfName: e.rec.Event.IfName}], nil
		})
	if len(errs) > 0 {
		return api.GCResponse{Removed: removed}, withStatus(http.StatusInternalServerError,
			fmt.Errorf("GC: %d pods could not be removed: %w", len(errs), errors.Join(errs...)))
	}
	return api.GCResponse{Removed: removed}, nil
}

// collect drops every held pod for which stale says so, one pod lock at a
// time, removes its state file, and returns the removed ids sorted.
func (a *Agent) collect(kind, why string, stale func(*entry) (bool, error)) ([]string, []error) {
	removed := []string{}
	var errs []error
	for _, id := range a.ids() {
		if a.ctx.Err() != nil {
			break
		}
		start := time.Now()
		l := a.lockFor(id)
		l.Lock()
		e := a.get(id)
		if e == nil {
			l.Unlock()
			continue
		}
		gone, err := stale(e)
		if err == nil && gone {
			err = a.drop(e)
			if err == nil {
				a.logStateErr(id, a.removePod(id))
				removed = append(removed, id)
				rec := e.rec
				rec.Reason = why
				a.logPod(kind, "pod collected", rec, start)
			}
		}
		l.Unlock()
		if err != nil {
			errs = append(errs, err)
		}
	}
	slices.Sort(removed)
	return removed, errs
}

// gcLoop drops pods whose netns disappeared or now names another
// namespace: ADD without DEL, as after a node or runtime crash.
func (a *Agent) gcLoop() {
	defer a.wg.Done()
	t := time.NewTicker(a.gcInterval)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
		}
		_, errs := a.collect(EventGC, "network namespace gone or replaced", a.netnsStale)
		for _, err := range errs {
			a.log.Warn("background GC: keeping a pod it could not check or remove; retrying next round", zap.Error(err))
		}
	}
}

// netnsStale reports whether e's netns path no longer names the namespace
// it was added with. A transient error keeps the pod.
func (a *Agent) netnsStale(e *entry) (bool, error) {
	cookie, err := podns.NetnsCookie(e.rec.Event.Netns)
	if errors.Is(err, podns.ErrGone) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("pod %s: %w", e.rec.Event.ContainerID, err)
	}
	return cookie != e.rec.NetnsCookie, nil
}

// prepareNetns does inside a meshed pod what the mesh's init container did
// besides iptables: the addresses its sidecar expects on lo.
func prepareNetns(netnsPath string, p mesh.Profile, ips []netip.Addr) error {
	if !slices.ContainsFunc(ips, func(ip netip.Addr) bool { return ip.Is6() && !ip.Is4In6() }) {
		return nil
	}
	for _, addr := range p.LoopbackAddrs6 {
		if err := podns.AddLoopbackAddr(netnsPath, addr); err != nil {
			return fmt.Errorf("prepare the pod for its %s sidecar: %w", p.Name, err)
		}
	}
	return nil
}
