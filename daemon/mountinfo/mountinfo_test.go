package mountinfo

import (
	"os"
	"path/filepath"
	"testing"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/sys/fs/cgroup/unified`: "/sys/fs/cgroup/unified",
		`/mnt/a\040b`:            "/mnt/a b",
		`/mnt/tab\011x\134y`:     "/mnt/tab\tx\\y",
		`/mnt/short\04`:          `/mnt/short\04`,
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestFirst: the first mount of a type, escapes undone; none is "".
func TestFirst(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mountinfo")
	table := `25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 33 0:38 / /sys/fs/cgroup/unified\040v2 rw,relatime shared:10 - cgroup2 cgroup2 rw
43 33 0:40 / /other rw shared:12 - cgroup2 cgroup2 rw
broken line
`
	if err := os.WriteFile(p, []byte(table), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := First(p, "cgroup2"); err != nil || got != "/sys/fs/cgroup/unified v2" {
		t.Fatalf("First cgroup2 = %q, %v", got, err)
	}
	if got, err := First(p, "bpf"); err != nil || got != "" {
		t.Fatalf("First bpf = %q, %v", got, err)
	}
	if _, err := First(filepath.Join(t.TempDir(), "missing"), "bpf"); err == nil {
		t.Fatal("no error for a missing file")
	}
}

func TestContaining(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mountinfo")
	table := `25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 25 0:27 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw
50 25 0:27 / /host/sys/fs/cgroup rw,nosuid shared:19 - cgroup2 cgroup2 rw
51 50 0:40 / /host/sys/fs/cgroup/sub rw - tmpfs tmpfs rw
`
	if err := os.WriteFile(p, []byte(table), 0o600); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]string{
		"/host/sys/fs/cgroup":                "/host/sys/fs/cgroup",
		"/host/sys/fs/cgroup/kubepods.slice": "/host/sys/fs/cgroup",
		"/host/sys/fs/cgroup/sub/x":          "/host/sys/fs/cgroup", // the tmpfs is not cgroup2
		"/sys/fs/cgroup/kubepods/":           "/sys/fs/cgroup",
		"/sys/fs/cgroupx":                    "",
		"/srv":                               "",
	} {
		if got, err := Containing(p, "cgroup2", dir); err != nil || got != want {
			t.Errorf("Containing(%s) = %q, %v; want %q", dir, got, err, want)
		}
	}
}
