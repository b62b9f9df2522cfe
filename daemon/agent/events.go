package agent

import (
	"sync"
	"time"
)

// Event kinds recorded in the ring.
const (
	EventAdded     = "pod-added"
	EventDeleted   = "pod-deleted"
	EventMeshed    = "pod-meshed"
	EventGC        = "pod-gc"
	EventPluginLog = "plugin-log"
)

// Event is one entry of the agent's recent history, kept for the debug
// CLI: what happened to which pod, and why.
type Event struct {
	Time        time.Time `json:"time"`
	Kind        string    `json:"kind"`
	ContainerID string    `json:"containerID,omitempty"`
	Pod         string    `json:"pod,omitempty"` // namespace/name
	State       string    `json:"state,omitempty"`
	Message     string    `json:"message,omitempty"`
}

// ring keeps the last len(buf) events; older ones are overwritten, so
// memory stays bounded whatever the pod churn.
type ring struct {
	mu   sync.Mutex
	buf  []Event
	next int
	full bool
}

func newRing(size int) *ring {
	return &ring{buf: make([]Event, size)}
}

func (r *ring) add(e Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf[r.next] = e
	r.next++
	if r.next == len(r.buf) {
		r.next = 0
		r.full = true
	}
}

// all returns the events oldest first.
func (r *ring) all() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.full {
		return append([]Event(nil), r.buf[:r.next]...)
	}
	out := make([]Event, 0, len(r.buf))
	out = append(out, r.buf[r.next:]...)
	return append(out, r.buf[:r.next]...)
}
