package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlane/meshlane/daemon/api"
)

func TestCgroup2Root(t *testing.T) {
	dir := t.TempDir()
	write := func(content string) string {
		p := filepath.Join(dir, "mountinfo")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}

	hybrid := write(`25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 33 0:38 / /sys/fs/cgroup/unified\040v2 rw,relatime shared:10 - cgroup2 cgroup2 rw
42 33 0:39 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
`)
	got, err := cgroup2Root(hybrid)
	if err != nil || got != "/sys/fs/cgroup/unified v2" {
		t.Fatalf("cgroup2Root = %q, %v", got, err)
	}

	none := write("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
	if _, err := cgroup2Root(none); err == nil || !strings.Contains(err.Error(), "--cgroup") {
		t.Fatalf("no cgroup2: %v", err)
	}

	// This machine's own table has one.
	if got, err := cgroup2Root("/proc/self/mountinfo"); err != nil || got == "" {
		t.Fatalf("own mountinfo: %q, %v", got, err)
	}
}

func TestParseFlags(t *testing.T) {
	o, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if o.socket != api.DefaultSocket || o.bpffs != "/sys/fs/bpf/meshlane" || o.stateDir != "/var/run/meshlane/state" ||
		o.logLevel != "info" || o.logFormat != "json" || o.profile != "istio" || o.sockmap || o.gcInterval != 10*time.Second || o.cgroup != "" {
		t.Fatalf("defaults: %+v", o)
	}

	var out bytes.Buffer
	if _, err := parseFlags([]string{"--help"}, &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("--help: %v", err)
	}
	for _, name := range []string{"-socket", "-bpffs", "-cgroup", "-state-dir", "-log-level", "-log-format", "-profile", "-sockmap", "-gc-interval"} {
		if !strings.Contains(out.String(), name) {
			t.Errorf("usage lacks %s:\n%s", name, out.String())
		}
	}

	for _, args := range [][]string{{"--gc-interval", "0s"}, {"extra"}, {"--nope"}} {
		if _, err := parseFlags(args, &bytes.Buffer{}); err == nil {
			t.Errorf("parseFlags(%q) accepted", args)
		}
	}
	if _, err := newLogger("loud", "json"); err == nil {
		t.Error("newLogger accepted level loud")
	}
	if _, err := newLogger("info", "xml"); err == nil {
		t.Error("newLogger accepted format xml")
	}
}

func TestPodCgroups(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mountinfo")
	if err := os.WriteFile(p, []byte(`25 1 8:1 / / rw - ext4 /dev/sda1 rw
30 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
50 25 0:27 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw
`), 0o600); err != nil {
		t.Fatal(err)
	}
	// The DaemonSet: the host's hierarchy under /host, not the container's
	// own /sys/fs/cgroup.
	r, err := podCgroups(p, "/host/sys/fs/cgroup")
	if err != nil || r.Mount != "/host/sys/fs/cgroup" || r.Within != "/host/sys/fs/cgroup" {
		t.Fatalf("DaemonSet: %+v, %v", r, err)
	}
	if dir, err := r.Resolve("/kubepods/burstable/pod1"); err != nil || dir != "/host/sys/fs/cgroup/kubepods/burstable/pod1" {
		t.Fatalf("resolve: %q, %v", dir, err)
	}
	if r, err = podCgroups(p, "/sys/fs/cgroup/kubepods.slice"); err != nil || r.Mount != "/sys/fs/cgroup" || r.Within != "/sys/fs/cgroup/kubepods.slice" {
		t.Fatalf("subtree: %+v, %v", r, err)
	}
	// The default --cgroup, the first cgroup2 mount.
	if r, err = podCgroups(p, "/sys/fs/cgroup"); err != nil || r.Mount != "/sys/fs/cgroup" || r.Within != "/sys/fs/cgroup" {
		t.Fatalf("default: %+v, %v", r, err)
	}
	if _, err := podCgroups(p, "/srv/cgroup"); err == nil || !strings.Contains(err.Error(), "no cgroup2 mount") {
		t.Fatalf("outside any cgroup2 mount: %v", err)
	}
}
