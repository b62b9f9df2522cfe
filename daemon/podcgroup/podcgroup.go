// Package podcgroup turns the cgroupPath a container runtime passes to CNI
// plugins into the pod's cgroup v2 directory on this node.
//
// Runtimes pass the pod's cgroup parent as kubelet named it: a path under
// the cgroup2 root with the cgroupfs driver ("/kubepods/burstable/pod<uid>")
// or a systemd slice name with the systemd driver
// ("kubepods-burstable-pod<uid>.slice", which systemd nests as
// kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice).
package podcgroup

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// Resolver resolves runtime cgroup paths on one node.
type Resolver struct {
	// Mount is where the cgroup2 filesystem is mounted (/sys/fs/cgroup).
	Mount string
	// Within is the directory every pod cgroup must lie in (Mount itself,
	// or a subtree such as kubepods); a path outside it is refused, so a
	// bad or hostile runtimeConfig cannot make the agent attach to the
	// node's own services.
	Within string
}

const sliceSuffix = ".slice"

// Resolve returns the absolute directory of the pod cgroup named by
// cgroupPath. It checks the name, not the filesystem: attaching to it
// reports a directory that does not exist.
func (r Resolver) Resolve(cgroupPath string) (string, error) {
	if cgroupPath == "" {
		return "", errors.New("the runtime passed no cgroupPath (containerd >= 1.7 and CRI-O >= 1.28 pass it to a plugin whose conflist entry declares the cgroupPath capability)")
	}
	if strings.ContainsRune(cgroupPath, 0) {
		return "", fmt.Errorf("cgroupPath %q holds a NUL byte", cgroupPath)
	}
	rel := cgroupPath
	if strings.HasSuffix(cgroupPath, sliceSuffix) && !strings.Contains(cgroupPath, "/") {
		var err error
		if rel, err = expandSlice(cgroupPath); err != nil {
			return "", err
		}
	} else if !strings.HasPrefix(cgroupPath, "/") {
		return "", fmt.Errorf("cgroupPath %q is neither a path from the cgroup2 root (/kubepods/...) nor a systemd slice name (...slice)", cgroupPath)
	}
	// Clean before joining, so ".." cannot climb above the mount.
	dir := filepath.Join(r.Mount, filepath.Clean("/"+rel))
	if in, err := filepath.Rel(r.Within, dir); err != nil || in == "." || in == ".." || strings.HasPrefix(in, "../") {
		return "", fmt.Errorf("cgroupPath %q is %s, not a cgroup below %s (the agent's --cgroup)", cgroupPath, dir, filepath.Clean(r.Within))
	}
	return dir, nil
}

// expandSlice turns a systemd slice name into its path from the cgroup2
// root: each dash opens a level, named by the prefix up to it.
func expandSlice(slice string) (string, error) {
	name := strings.TrimSuffix(slice, sliceSuffix)
	if name == "-" {
		return "/", nil // the root slice
	}
	var path strings.Builder
	prefix := ""
	for part := range strings.SplitSeq(name, "-") {
		if part == "" {
			return "", fmt.Errorf("cgroupPath %q is not a valid systemd slice name (empty part between dashes)", slice)
		}
		prefix += part
		path.WriteString("/" + prefix + sliceSuffix)
		prefix += "-"
	}
	return path.String(), nil
}
