package cninode

import (
	"context"
)

// AddPodKeepSandbox runs the chain's ADD like AddPod but, when it fails,
// keeps the sandbox: no DEL and the netns stays, as a runtime does while
// it has not yet torn the sandbox down. The pod is returned with the error
// so the caller can DelPod it when the runtime would; its IPs are left
// unset. Crash tests use it to reach an agent that restarted while the
// pod still exists.
func (n *Node) AddPodKeepSandbox(ctx context.Context, namespace, name string, annotations map[string]string) (*Pod, error) {
	p, err := n.sandbox(namespace, name, annotations)
	if err != nil {
		return nil, err
	}
	_, err = n.cni.AddNetworkList(ctx, n.list, p.rt)
	return p, err
}
