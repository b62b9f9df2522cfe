package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/meshlane/meshlane/daemon/api"
	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/daemon/podns"
)

// A waiting pod's netns is polled first after watchFirst, then at
// intervals doubling up to watchCap: quick for a sidecar that starts at
// once, at most one sock_diag dump per mesh per second for one that never
// comes.
const (
	watchFirst = 500 * time.Millisecond
	watchCap   = time.Second
)

// startWatch starts the sidecar watcher of a waiting pod; the caller holds
// the pod's stripe lock. drop stops it.
func (a *Agent) startWatch(e *entry) {
	ctx, cancel := context.WithCancel(a.ctx)
	e.stopWatch = cancel
	netns := e.rec.Event.Netns
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.watch(ctx, e, netns)
	}()
}

// watch polls the pod's netns until one of the meshes' ready listeners
// appears, then meshes the pod with that mesh's settings. It runs until
// then or until the pod is dropped: a pod whose runtime passed no
// annotations is never cached as not meshed, because its sidecar may
// simply start late.
func (a *Agent) watch(ctx context.Context, e *entry, netns string) {
	interval := watchFirst
	t := time.NewTimer(interval)
	defer t.Stop()
	warned := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, d := range a.waitFor {
			up, err := podns.ListenerUp(netns, d.Profile.ReadyPort)
			if errors.Is(err, podns.ErrGone) {
				// The background GC drops the pod.
				return
			}
			if err != nil {
				if !warned {
					a.log.Warn("sidecar watcher cannot inspect the pod's netns; retrying",
						zap.String("container_id", e.rec.Event.ContainerID), zap.Error(err))
					warned = true
				}
				continue
			}
			if up {
				if a.promote(ctx, e, d) {
					return
				}
				break
			}
		}
		interval = min(2*interval, watchCap)
		t.Reset(interval)
	}
}

// promote meshes a waiting pod whose sidecar listener d appeared. It
// reports whether the watcher is done (meshed, or the pod went away);
// false means retry on the next poll.
func (a *Agent) promote(ctx context.Context, e *entry, d mesh.Decision) bool {
	start := time.Now()
	id := e.rec.Event.ContainerID
	l := a.lockFor(id)
	l.Lock()
	defer l.Unlock()
	// drop cancels ctx under this lock, so a live ctx means e is still the
	// held, waiting record.
	if ctx.Err() != nil {
		return true
	}
	cookie, err := podns.NetnsCookie(e.rec.Event.Netns)
	if err != nil || cookie != e.rec.NetnsCookie {
		// Gone or replaced: the listener seen belongs to another
		// namespace. The background GC drops the pod.
		return errors.Is(err, podns.ErrGone) || err == nil
	}
	ips, err := parseIPs(e.rec.Event.IPs)
	if err != nil {
		a.cannotMesh(e, d, err, start)
		return true
	}
	cg, err := a.podCgroup(e.rec.Event)
	if err != nil {
		a.cannotMesh(e, d, err, start)
		return true
	}
	if err := prepareNetns(e.rec.Event.Netns, d.Profile, ips); err != nil {
		a.log.Warn("sidecar appeared but preparing its netns failed; retrying", zap.String("container_id", id), zap.Error(err))
		return false
	}
	pod := d.Settings.Pod(cookie, ips, podInterface(e.rec.Event), cg)
	if err := a.maps.UpsertPod(pod); err != nil {
		a.log.Warn("sidecar appeared but writing the pod into the datapath maps failed; retrying",
			zap.String("container_id", id), zap.Error(err))
		return false
	}
	a.update(e, func(r *PodRecord) {
		r.State = api.StateMeshed
		r.Profile = d.Profile.Name
		r.Reason = fmt.Sprintf("%s sidecar listener appeared on port %d", d.Profile.Name, d.Profile.ReadyPort)
		r.Pod = &pod
	})
	e.stopWatch()
	e.stopWatch = nil
	a.logStateErr(id, a.savePod(e.rec))
	a.logPod(EventMeshed, "pod meshed", e.rec, start)
	return true
}

// cannotMesh records a waiting pod whose sidecar appeared but which cannot
// be meshed (what its ADD would have refused) as not meshed, with why, so
// that meshlanectl shows it instead of a wait that never ends.
func (a *Agent) cannotMesh(e *entry, d mesh.Decision, err error, start time.Time) {
	a.update(e, func(r *PodRecord) {
		r.State = api.StateNotMeshed
		r.Reason = fmt.Sprintf("%s sidecar listener appeared on port %d, but the pod cannot be meshed: %v", d.Profile.Name, d.Profile.ReadyPort, err)
	})
	e.stopWatch()
	e.stopWatch = nil
	a.logStateErr(e.rec.Event.ContainerID, a.savePod(e.rec))
	a.log.Error("sidecar appeared but the pod cannot be meshed", zap.String("container_id", e.rec.Event.ContainerID),
		zap.String("pod", podName(e.rec.Event)), zap.Error(err))
	a.logPod(EventAdded, "pod not meshed", e.rec, start)
}
