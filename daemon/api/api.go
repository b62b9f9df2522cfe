// Package api holds the JSON messages exchanged over the meshlane agent's
// unix socket by the CNI plugin, meshlanectl and the agent itself. Keeping
// them in one small package means the plugin binary does not link the agent.
package api

import (
	"net/netip"
	"time"
)

// DefaultSocket is where the agent listens and the plugin connects unless
// configured otherwise.
const DefaultSocket = "/var/run/meshlane/meshlane.sock"

// Methods the API uses: net/http's names, for callers that do not link
// net/http (the plugin; see Client).
const (
	MethodGet  = "GET"
	MethodPost = "POST"
)

// StatusNotFound is the agent's answer to PathCheck for a pod it does not
// hold (net/http's value, as above).
const StatusNotFound = 404

// Paths served on the socket.
const (
	PathAdd     = "/v1/cni/add"   // POST PodEvent -> PodResponse
	PathDel     = "/v1/cni/del"   // POST PodEvent -> PodResponse
	PathCheck   = "/v1/cni/check" // POST PodEvent -> PodResponse (404 if not held)
	PathGC      = "/v1/cni/gc"    // POST GCRequest -> GCResponse
	PathLog     = "/v1/log"       // POST LogRecord (plugin log relay)
	PathPods    = "/v1/pods"      // GET [?pod=Q] -> []PodStatus
	PathStatus  = "/v1/status"    // GET -> Status
	PathHealthz = "/healthz"
	PathReadyz  = "/readyz"
	PathMetrics = "/metrics"
)

// Node-level debugging paths, read-only, served on the socket.
const (
	PathCounters  = "/v1/counters" // GET -> Counters
	PathEvents    = "/v1/events"   // GET -> []Event
	PathConns     = "/v1/conns"    // GET [?pod=Q] -> Conns
	PathSelfCheck = "/v1/check"    // GET ?pod=Q -> CheckReport
)

// PodEvent is what the CNI plugin reports on ADD, DEL and CHECK.
type PodEvent struct {
	ContainerID      string   `json:"containerID"`
	Netns            string   `json:"netns,omitempty"`
	IfName           string   `json:"ifName"`
	IPs              []string `json:"ips,omitempty"`
	PodName          string   `json:"podName,omitempty"`
	PodNamespace     string   `json:"podNamespace,omitempty"`
	PodUID           string   `json:"podUID,omitempty"`
	InfraContainerID string   `json:"infraContainerID,omitempty"`
	// CgroupPath is the pod's cgroup as the runtime passed it (the CNI
	// cgroupPath capability): a path under the cgroup2 root, or a systemd
	// slice name.
	CgroupPath  string            `json:"cgroupPath,omitempty"`
	Annotations map[string]string `json:"annotations,omitzero"` // nil: the runtime passed none; empty: it passed an empty set
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

// QueryPod is the query parameter naming a pod on the debug endpoints (and
// GET /v1/pods): "namespace/name", a name unique on the node, one of the
// pod's IPs, or its container id or a unique prefix of it.
const QueryPod = "pod"

// PodStatus is one pod the agent holds, as GET /v1/pods lists it.
type PodStatus struct {
	Event       PodEvent `json:"event"`
	NetnsCookie uint64   `json:"netnsCookie"`
	State       string   `json:"state"`
	Reason      string   `json:"reason"`
	Profile     string   `json:"profile,omitempty"`
	// Pod is what the agent wrote into the datapath; set only when meshed.
	Pod     *PodSettings `json:"pod,omitempty"`
	Added   time.Time    `json:"added"`
	Changed time.Time    `json:"changed"`
}

// PodSettings are a meshed pod's effective redirect settings. The field
// names are the JSON keys, as the agent encodes its datapath entry.
type PodSettings struct {
	NetnsCookie          uint64
	IPs                  []netip.Addr
	Interface            PodInterface
	Cgroup               string
	ProxyUID             uint32
	ProxyGID             uint32
	OutboundPort         uint16
	InboundPort          uint16
	InboundAll           bool
	InboundInclude       []uint16
	InboundExclude       []uint16
	OutboundExcludePorts []uint16
	OutboundIncludePorts []uint16
	OutboundAllCIDRs     bool
	OutboundIncludeCIDRs []netip.Prefix
	OutboundExcludeCIDRs []netip.Prefix
	DNSCapture           bool
	DNSPort              uint16
	ProxyLoopbackInbound bool
}

// PodInterface is where the pod's tc program sit: the interface name the
// CNI plugin reported, in the netns at path Netns.
type PodInterface struct {
	Netns string
	Name  string
}

// Status answers GET /v1/status: what runs on this node and how full it is.
type Status struct {
	Version       string    `json:"version"`
	Kernel        string    `json:"kernel"`
	StartedAt     time.Time `json:"startedAt"`
	UptimeSeconds float64   `json:"uptimeSeconds"`
	// Profile is the default mesh profile.
	Profile string `json:"profile"`
	// Pods counts the held pods by state.
	Pods     map[string]int  `json:"pods"`
	Datapath *DatapathStatus `json:"datapath,omitempty"`
	// Install is the CNI plugin installer's state, when the agent runs one.
	Install *InstallStatus `json:"install,omitempty"`
}

// DatapathStatus is the loaded datapath.
type DatapathStatus struct {
	Cgroup string `json:"cgroup"`
	// Scope is where the cgroup programs attach: "node" (to Cgroup) or
	// "pod" (to each meshed pod's own cgroup).
	Scope   string `json:"scope"`
	BPFFS   string `json:"bpffs"`
	MapsDir string `json:"mapsDir"`
	Sockmap bool   `json:"sockmap"`
	// Inbound is how the tc program that steers connections from other
	// nodes sit on pod interfaces: "tcx" or "tc".
	Inbound  string             `json:"inbound"`
	Links    []Link             `json:"links"`
	Features []Feature          `json:"features"`
	Maps     map[string]MapFill `json:"maps,omitempty"`
	// MapsError says why the map fill levels could not be read.
	MapsError string `json:"mapsError,omitempty"`
}

// Link is one attached program: `bpftool link show id LinkID` and
// `bpftool prog show id ProgramID` show it.
type Link struct {
	Name      string `json:"name"`
	LinkID    uint32 `json:"linkID"`
	ProgramID uint32 `json:"programID"`
	Pin       string `json:"pin,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Feature is an optional kernel capability and whether this node has it.
type Feature struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Detail    string `json:"detail,omitempty"`
}

// MapFill is one map's entry count against its capacity.
type MapFill struct {
	Entries  int `json:"entries"`
	Capacity int `json:"capacity"`
}

// InstallStatus is the CNI plugin installer's state.
type InstallStatus struct {
	State  string `json:"state"`
	Detail any    `json:"detail,omitempty"`
}

// Counters answers GET /v1/counters: every datapath counter, summed over
// CPUs, at Time.
type Counters struct {
	Time     time.Time         `json:"time"`
	Counters map[string]uint64 `json:"counters"`
}

// Event is one entry of the agent's recent history, oldest first in GET
// /v1/events.
type Event struct {
	Time        time.Time `json:"time"`
	Kind        string    `json:"kind"`
	ContainerID string    `json:"containerID,omitempty"`
	Pod         string    `json:"pod,omitempty"`
	State       string    `json:"state,omitempty"`
	Message     string    `json:"message,omitempty"`
}

// Conns answers GET /v1/conns: the live redirected sockets.
type Conns struct {
	Conns []Conn `json:"conns"`
	// Truncated: the node has more than the agent lists at once.
	Truncated bool `json:"truncated,omitempty"`
}

// Conn is one socket of a redirected connection; both ends of a
// connection between local sockets are listed.
type Conn struct {
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	// Original is where the app connected before the redirect.
	Original netip.AddrPort `json:"original"`
	// Kind is "outbound" (app to its own sidecar) or "inbound" (to a
	// meshed pod's inbound listener).
	Kind string `json:"kind"`
	// Side is "client" (the connecting socket), "listener" (the socket the
	// sidecar accepted) or "unknown".
	Side   string `json:"side"`
	Family string `json:"family"`
	State  string `json:"state"`
	// ListenerNetns is the netns cookie of the pod whose sidecar took the
	// connection, and ListenerPod that pod, when the agent holds it.
	ListenerNetns uint64 `json:"listenerNetns"`
	ListenerPod   string `json:"listenerPod,omitempty"`
	// ShortCircuited: in the sockhash, bytes go straight to the peer.
	ShortCircuited bool `json:"shortCircuited"`
}

// CheckReport answers GET /v1/check: a self-test of one pod's datapath
// entries against what the agent decided.
type CheckReport struct {
	Pod         string `json:"pod"`
	ContainerID string `json:"containerID"`
	NetnsCookie uint64 `json:"netnsCookie"`
	State       string `json:"state"`
	Reason      string `json:"reason,omitempty"`
	// OK is true when every check passed.
	OK     bool        `json:"ok"`
	Checks []CheckItem `json:"checks"`
}

// CheckItem is one check; a failed one says what to do in Fix.
type CheckItem struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}
