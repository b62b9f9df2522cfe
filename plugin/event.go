package plugin

import (
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshlane/meshlane/daemon/api"
)

// k8sArgs are the pod identity keys Kubernetes runtimes put in CNI_ARGS.
// The field names must match the keys exactly: types.LoadArgs looks them up
// by name.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
}

// newPodEvent builds the message the agent gets for one verb. prev may be
// nil (DEL often comes without a prevResult). An error means CNI_ARGS could
// not be parsed; the event is filled as far as possible anyway so that DEL
// can still report the container.
func newPodEvent(args *skel.CmdArgs, conf *Config, prev types.Result) (api.PodEvent, error) {
	ev := api.PodEvent{
		ContainerID: args.ContainerID,
		Netns:       args.Netns,
		IfName:      args.IfName,
		Annotations: conf.Annotations,
		CgroupPath:  conf.CgroupPath,
	}
	var err error
	if prev != nil {
		ev.IPs, err = podIPs(prev)
	}
	var k k8sArgs
	// Runtimes pass keys of their own; never fail on them.
	k.IgnoreUnknown = true
	if lerr := types.LoadArgs(args.Args, &k); lerr != nil && err == nil {
		err = types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("meshlane-cni: cannot parse CNI_ARGS %q: %v", args.Args, lerr),
			"the runtime sets CNI_ARGS as KEY=VALUE pairs separated by ';'")
	}
	ev.PodName = string(k.K8S_POD_NAME)
	ev.PodNamespace = string(k.K8S_POD_NAMESPACE)
	ev.PodUID = string(k.K8S_POD_UID)
	ev.InfraContainerID = string(k.K8S_POD_INFRA_CONTAINER_ID)
	return ev, err
}

// podIPs lists the pod's addresses from the previous result, without prefix
// length. When the result ties addresses to interfaces, only addresses on
// an interface inside the sandbox count: host-side veth addresses are not
// the pod's.
func podIPs(prev types.Result) ([]string, error) {
	res, err := current.NewResultFromResult(prev)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf("meshlane-cni: cannot convert prevResult: %v", err),
			"the previous plugin in the chain returned a result this plugin cannot read")
	}
	var ips []string
	seen := make(map[string]bool, len(res.IPs))
	for _, ipc := range res.IPs {
		if ipc == nil || ipc.Address.IP == nil {
			continue
		}
		if i := ipc.Interface; i != nil {
			if *i < 0 || *i >= len(res.Interfaces) || res.Interfaces[*i] == nil || res.Interfaces[*i].Sandbox == "" {
				continue
			}
		}
		s := ipc.Address.IP.String()
		if !seen[s] {
			seen[s] = true
			ips = append(ips, s)
		}
	}
	return ips, nil
}

// podRef names the pod in messages: namespace/name when the runtime said,
// the container id otherwise.
func podRef(ev api.PodEvent) string {
	if ev.PodName == "" {
		return "container " + ev.ContainerID
	}
	return fmt.Sprintf("pod %s/%s (container %s)", ev.PodNamespace, ev.PodName, ev.ContainerID)
}

// podKey is namespace/name for log fields, which carry the container id
// on their own.
func podKey(ev api.PodEvent) string {
	return ev.PodNamespace + "/" + ev.PodName
}
