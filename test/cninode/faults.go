package cninode

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/vishvananda/netlink"

	"github.com/meshlane/meshlane/test/testenv"
)

// AddPodKeepSandbox runs the chain's ADD like AddPod but, when it fails,
// keeps the sandbox: no DEL and the netns stays, as a runtime does while
// it has not yet torn the sandbox down. The pod is returned with the error
// so the caller can DelPod it when the runtime would; its IPs are left
// unset. Crash tests use it to reach an agent that restarted while the
// pod still exists.
func (n *Node) AddPodKeepSandbox(ctx context.Context, namespace, name string, annotations map[string]string) (*Pod, error) {
	path, err := testenv.CreateNetns(name)
	if err != nil {
		return nil, err
	}
	err = testenv.InNetns(path, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		testenv.DeleteNetns(path)
		return nil, fmt.Errorf("bring up lo in %s: %w", path, err)
	}
	p := &Pod{Name: name, Namespace: namespace, ContainerID: "ctr-" + filepath.Base(path), NetnsPath: path, Annotations: annotations}
	p.rt = n.runtimeConf(p)
	_, err = n.cni.AddNetworkList(ctx, n.list, p.rt)
	return p, err
}
