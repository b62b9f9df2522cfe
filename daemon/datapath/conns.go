package datapath

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"

	"github.com/meshlane/meshlane/bpf"
)

// ErrConnsUnsupported means the kernel cannot walk socket storage with a
// BPF iterator (Linux >= 5.9 with BTF, CONFIG_DEBUG_INFO_BTF): the
// datapath works, only the connections view is unavailable.
var ErrConnsUnsupported = errors.New("this kernel has no BPF iterator over socket storage maps (needs Linux >= 5.9 with kernel BTF, CONFIG_DEBUG_INFO_BTF)")

// MaxConns bounds one read of the connections view: a node with more live
// redirected sockets gets the first MaxConns, so a debug command can never
// make the agent hold an unbounded list.
const MaxConns = 1 << 18

// Redirect kinds and socket sides of a Conn.
const (
	KindOutbound = "outbound"
	KindInbound  = "inbound"
	KindDNS      = "dns"
	// KindInboundRemote: a connection from outside the node that the tc
	// programs sent to the inbound listener.
	KindInboundRemote = "inbound-remote"

	// SideClient is the connecting socket (the app, or the peer pod's
	// sidecar for inbound), SideListener the socket the sidecar accepted.
	SideClient   = "client"
	SideListener = "listener"
	// SideUnknown: the listener's pod is no longer in the maps, so its
	// listener port, which tells the two ends apart, is unknown.
	SideUnknown = "unknown"
)

// Conn is one socket of a live connection the datapath redirected. Both
// ends of a connection between local sockets appear, each with its own
// Side.
type Conn struct {
	Local  netip.AddrPort
	Remote netip.AddrPort
	// Family is the socket's: "ipv4" or "ipv6" (an IPv6 socket may carry
	// IPv4-mapped addresses, shown unmapped).
	Family string
	// State is the TCP state, e.g. "ESTABLISHED".
	State string
	// Original is where the app connected before the redirect.
	Original      netip.AddrPort
	Kind          string
	ListenerNetns uint64
	Side          string
	// ShortCircuited: the socket is in the sockhash, so sk_msg hands its
	// bytes straight to the peer socket.
	ShortCircuited bool
}

// Conns lists the live redirected sockets, read from the datapath's own
// socket storage with a BPF iterator: exactly the sockets the kernel holds
// an original destination for, at most MaxConns.
func (d *Datapath) Conns() ([]Conn, error) {
	var objs bpf.ConnsObjects
	if err := loadConns(&objs, d.objs.MeshlaneSks); err != nil {
		return nil, err
	}
	defer objs.Close()
	it, err := link.AttachIter(link.IterOptions{Program: objs.MeshlaneConns, Map: d.objs.MeshlaneSks})
	if err != nil {
		return nil, fmt.Errorf("datapath: attach the connections iterator to meshlane_sks: %w", err)
	}
	defer it.Close()
	rd, err := it.Open()
	if err != nil {
		return nil, fmt.Errorf("datapath: open the connections iterator: %w", err)
	}
	defer rd.Close()
	recs, err := readConnRecords(rd, MaxConns)
	if err != nil {
		return nil, err
	}

	listeners, err := d.listenerPorts()
	if err != nil {
		return nil, err
	}
	out := make([]Conn, 0, len(recs))
	for _, r := range recs {
		c := connFromRecord(r, listeners)
		if c.ShortCircuited, err = d.inSockhash(r); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// loadConns loads the iterator with sks in place of its own meshlane_sks,
// so it walks the datapath's sockets.
func loadConns(objs *bpf.ConnsObjects, sks *ebpf.Map) error {
	spec, err := bpf.LoadConns()
	if err != nil {
		return fmt.Errorf("datapath: read the embedded connections iterator: %w", err)
	}
	var opts ebpf.CollectionOptions
	if sks != nil {
		opts.MapReplacements = map[string]*ebpf.Map{bpf.ConnsMapMeshlaneSks: sks}
	}
	err = spec.LoadAndAssign(objs, &opts)
	if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, btf.ErrNotSupported) || errors.Is(err, btf.ErrNotFound) {
		return fmt.Errorf("datapath: %w: %v", ErrConnsUnsupported, err)
	}
	if err != nil {
		return fmt.Errorf("datapath: load the connections iterator: %w", err)
	}
	return nil
}

// connsSupported probes once whether this kernel loads the iterator, with
// a throwaway socket storage map of its own.
var connsSupported = sync.OnceValue(func() error {
	var objs bpf.ConnsObjects
	if err := loadConns(&objs, nil); err != nil {
		return err
	}
	return objs.Close()
})

// readConnRecords decodes the iterator's fixed-size records, at most limit.
func readConnRecords(r io.Reader, limit int) ([]bpf.ConnsMlConn, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var out []bpf.ConnsMlConn
	for len(out) < limit {
		var rec bpf.ConnsMlConn
		err := binary.Read(br, binary.NativeEndian, &rec)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("datapath: connections iterator wrote a partial record after %d: the object and this binary disagree on its size", len(out))
		}
		if err != nil {
			return nil, fmt.Errorf("datapath: read the connections iterator: %w", err)
		}
		out = append(out, rec)
	}
	return out, nil
}

// listenerKey names a sidecar listener: its pod and the redirect kind.
type listenerKey struct {
	netns uint64
	kind  uint16
}

// listenerPorts returns every meshed pod's outbound and inbound listener
// ports.
func (d *Datapath) listenerPorts() (map[listenerKey]uint16, error) {
	out := map[listenerKey]uint16{}
	var (
		netns uint64
		pod   bpf.MeshlaneMlPod
	)
	it := d.objs.MeshlanePods.Iterate()
	for it.Next(&netns, &pod) {
		out[listenerKey{netns, uint16(bpf.MeshlaneMlRedirectKindML_REDIRECT_OUTBOUND)}] = pod.OutboundPort
		out[listenerKey{netns, uint16(bpf.MeshlaneMlRedirectKindML_REDIRECT_INBOUND)}] = pod.InboundPort
		out[listenerKey{netns, uint16(bpf.MeshlaneMlRedirectKindML_REDIRECT_INBOUND_REMOTE)}] = pod.InboundPort
		if pod.DnsPort != 0 {
			out[listenerKey{netns, uint16(bpf.MeshlaneMlRedirectKindML_REDIRECT_DNS)}] = pod.DnsPort
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("datapath: read meshlane_pods: %w", err)
	}
	return out, nil
}

func connFromRecord(r bpf.ConnsMlConn, listeners map[listenerKey]uint16) Conn {
	c := Conn{
		Local:         netip.AddrPortFrom(addrFromML(bpf.MeshlaneMlAddr(r.Local)), r.LocalPort),
		Remote:        netip.AddrPortFrom(addrFromML(bpf.MeshlaneMlAddr(r.Remote)), r.RemotePort),
		Original:      netip.AddrPortFrom(addrFromML(bpf.MeshlaneMlAddr(r.Orig.Addr)), r.Orig.Port),
		Family:        familyName(r.Family),
		State:         tcpStateName(r.State),
		ListenerNetns: r.Orig.ListenerNetns,
		Side:          SideUnknown,
	}
	switch bpf.MeshlaneMlRedirectKind(r.Orig.Kind) {
	case bpf.MeshlaneMlRedirectKindML_REDIRECT_OUTBOUND:
		c.Kind = KindOutbound
	case bpf.MeshlaneMlRedirectKindML_REDIRECT_INBOUND:
		c.Kind = KindInbound
	case bpf.MeshlaneMlRedirectKindML_REDIRECT_DNS:
		c.Kind = KindDNS
	case bpf.MeshlaneMlRedirectKindML_REDIRECT_INBOUND_REMOTE:
		// Only the accepted socket is recorded (the client runs no
		// meshlane program), and it keeps the port that was dialed.
		c.Kind, c.Side = KindInboundRemote, SideListener
		return c
	default:
		c.Kind = fmt.Sprintf("kind-%d", r.Orig.Kind)
	}
	// The accepted socket's own port is the sidecar's listener port; the
	// client's is ephemeral and its peer's is the listener port.
	if port, ok := listeners[listenerKey{r.Orig.ListenerNetns, r.Orig.Kind}]; ok {
		switch port {
		case r.LocalPort:
			c.Side = SideListener
		case r.RemotePort:
			c.Side = SideClient
		}
	}
	return c
}

// inSockhash looks the socket up in the sockhash under the key sockops
// gave it: its own end, its peer, and the pod's netns cookie when an
// address is pod-local (the only case of a pod-local address here is an
// outbound redirect to the sidecar's loopback listener, in the listener's
// pod).
func (d *Datapath) inSockhash(r bpf.ConnsMlConn) (bool, error) {
	t := bpf.MeshlaneMlTuple{
		Src:     bpf.MeshlaneMlAddr(r.Local),
		Dst:     bpf.MeshlaneMlAddr(r.Remote),
		SrcPort: r.LocalPort,
		DstPort: r.RemotePort,
	}
	if podLocal(addrFromML(t.Src)) || podLocal(addrFromML(t.Dst)) {
		t.Netns = r.Orig.ListenerNetns
	}
	// A sockhash lookup from userspace answers the socket's cookie.
	var cookie uint64
	err := d.objs.MeshlaneSockh.Lookup(&t, &cookie)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("datapath: look up a connection in meshlane_sockh: %w", err)
	}
	return true, nil
}

// istioPassthrough6 is Istio's IPv6 inbound passthrough source, which the
// datapath treats as pod-local like loopback.
var istioPassthrough6 = netip.MustParseAddr("::6")

// podLocal matches the datapath's addr_is_pod_local.
func podLocal(a netip.Addr) bool {
	return a.IsLoopback() || a == istioPassthrough6
}

func familyName(f uint16) string {
	switch f {
	case 2:
		return "ipv4"
	case 10:
		return "ipv6"
	}
	return fmt.Sprintf("family-%d", f)
}

// tcpStates are the kernel's TCP states (include/net/tcp_states.h).
var tcpStates = [...]string{
	1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
	6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
	11: "CLOSING", 12: "NEW_SYN_RECV",
}

func tcpStateName(s uint8) string {
	if int(s) < len(tcpStates) && tcpStates[s] != "" {
		return tcpStates[s]
	}
	return fmt.Sprintf("state-%d", s)
}
