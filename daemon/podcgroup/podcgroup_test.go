package podcgroup

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestResolve(t *testing.T) {
	r := Resolver{Mount: "/sys/fs/cgroup", Within: "/sys/fs/cgroup"}
	for _, tc := range []struct{ in, want string }{
		{"/kubepods/burstable/pod123", "/sys/fs/cgroup/kubepods/burstable/pod123"},
		{"/kubepods/besteffort/pod1/", "/sys/fs/cgroup/kubepods/besteffort/pod1"},
		{"kubepods-burstable-pod0a1b.slice", "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice"},
		{"kubepods-pod9.slice", "/sys/fs/cgroup/kubepods.slice/kubepods-pod9.slice"},
		{"machine.slice", "/sys/fs/cgroup/machine.slice"},
		// ".." is cleaned against the cgroup2 root, never above it.
		{"/kubepods/../../../etc", "/sys/fs/cgroup/etc"},
	} {
		got, err := r.Resolve(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("Resolve(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}

	sub := Resolver{Mount: "/sys/fs/cgroup", Within: "/sys/fs/cgroup/kubepods"}
	if got, err := sub.Resolve("/kubepods/pod1"); err != nil || got != "/sys/fs/cgroup/kubepods/pod1" {
		t.Errorf("within kubepods: %q, %v", got, err)
	}
	for _, tc := range []struct {
		r      Resolver
		in, is string
	}{
		{r, "", "no cgroupPath"},
		{r, "kubepods/pod1", "neither a path"},
		{r, "kubepods--pod1.slice", "empty part"},
		{r, "-kubepods.slice", "empty part"},
		{r, "kubepods-.slice", "empty part"},
		{r, "/", "not a cgroup below"},
		{r, "-.slice", "not a cgroup below"},
		{r, "/a\x00b", "NUL"},
		{sub, "/system.slice/kubelet.service", "not a cgroup below /sys/fs/cgroup/kubepods"},
		{sub, "/kubepods", "not a cgroup below"},
		{sub, "/kubepods2/pod1", "not a cgroup below"},
		{sub, "/kubepods/../system.slice", "not a cgroup below"},
	} {
		got, err := tc.r.Resolve(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.is) {
			t.Errorf("Resolve(%q) within %s = %q, %v; want an error saying %q", tc.in, tc.r.Within, got, err, tc.is)
		}
	}
}

// FuzzResolve: whatever the runtime passes, an accepted path is a
// directory strictly below Within, clean, and free of NUL bytes.
func FuzzResolve(f *testing.F) {
	for _, s := range []string{"/kubepods/burstable/pod1", "kubepods-burstable-pod1.slice", "-.slice", "/a/../..", "a-b--c.slice", "/kubepods/x/../../y"} {
		f.Add(s)
	}
	r := Resolver{Mount: "/sys/fs/cgroup", Within: "/sys/fs/cgroup/kubepods"}
	f.Fuzz(func(t *testing.T, in string) {
		got, err := r.Resolve(in)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if got != filepath.Clean(got) || !strings.HasPrefix(got, r.Within+"/") || strings.ContainsRune(got, 0) {
			t.Fatalf("Resolve(%q) = %q: not a clean path below %s", in, got, r.Within)
		}
	})
}
