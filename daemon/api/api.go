// Package api holds the JSON messages exchanged over the meshlane agent's
// unix socket by the CNI plugin, meshlanectl and the agent itself. Keeping
// them in one small package means the plugin binary does not link the agent.
package api

// DefaultSocket is where the agent listens and the plugin connects unless
// configured otherwise.
const DefaultSocket = "/var/run/meshlane/meshlane.sock"

// Paths served on the socket.
const (
	PathAdd     = "/v1/cni/add"   // POST PodEvent -> PodResponse
	PathDel     = "/v1/cni/del"   // POST PodEvent -> PodResponse
	PathCheck   = "/v1/cni/check" // POST PodEvent -> PodResponse (404 if not held)
	PathGC      = "/v1/cni/gc"    // POST GCRequest -> GCResponse
	PathLog     = "/v1/log"       // POST LogRecord (plugin log relay)
	PathPods    = "/v1/pods"      // GET -> []PodStatus
	PathStatus  = "/v1/status"    // GET -> Status
	PathHealthz = "/healthz"
	PathReadyz  = "/readyz"
	PathMetrics = "/metrics"
)

// PodEvent is what the CNI plugin reports on ADD, DEL and CHECK.
type PodEvent struct {
	ContainerID      string            `json:"containerID"`
	Netns            string            `json:"netns,omitempty"`
	IfName           string            `json:"ifName"`
	IPs              []string          `json:"ips,omitempty"`
	PodName          string            `json:"podName,omitempty"`
	PodNamespace     string            `json:"podNamespace,omitempty"`
	PodUID           string            `json:"podUID,omitempty"`
	InfraContainerID string            `json:"infraContainerID,omitempty"`
	Annotations      map[string]string `json:"annotations,omitzero"` // nil: the runtime passed none; empty: it passed an empty set
}

// PodResponse answers a PodEvent.
type PodResponse struct {
	ContainerID string `json:"containerID"`
	// State is one of the PodState values.
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
}

// Pod states as the agent reports them.
const (
	StateMeshed     = "meshed"
	StateWaiting    = "waiting-for-sidecar"
	StateNotMeshed  = "not-meshed"
	StateDeleted    = "deleted"
	StateUnknownPod = "unknown"
)

// Attachment names one (container, interface) pair, as in the CNI GC
// verb's cni.dev/valid-attachments.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// GCRequest lists the attachments the runtime still has; the agent drops
// every other pod it holds.
type GCRequest struct {
	ValidAttachments []Attachment `json:"validAttachments"`
}

// GCResponse lists the container ids the agent removed.
type GCResponse struct {
	Removed []string `json:"removed"`
}

// LogRecord is one plugin log line relayed to the agent.
type LogRecord struct {
	Level       string            `json:"level"`
	Msg         string            `json:"msg"`
	ContainerID string            `json:"containerID,omitempty"`
	Fields      map[string]string `json:"fields,omitempty"`
}

// Error is the body of every 4xx/5xx answer.
type Error struct {
	Error string `json:"error"`
}
