// Package mountinfo finds mounts in /proc/<pid>/mountinfo. The agent and
// the test harness both look up the cgroup2 mount, whose place differs
// between hosts (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid ones).
package mountinfo

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Mount is one line of mountinfo.
type Mount struct {
	Point  string
	FSType string
}

// Read lists the mounts in the mountinfo file at path.
func Read(path string) ([]Mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 5 || sep+1 >= len(fields) {
			continue
		}
		out = append(out, Mount{Point: Unescape(fields[4]), FSType: fields[sep+1]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return out, nil
}

// First returns the mount point of the first filesystem of type fstype in
// the mountinfo file at path, or "" when there is none.
func First(path, fstype string) (string, error) {
	mounts, err := Read(path)
	if err != nil {
		return "", err
	}
	for _, m := range mounts {
		if m.FSType == fstype {
			return m.Point, nil
		}
	}
	return "", nil
}

// Containing returns the mount point of the filesystem of type fstype
// that holds dir (the longest such mount point that is dir or a parent of
// it), or "" when none does.
func Containing(path, fstype, dir string) (string, error) {
	mounts, err := Read(path)
	if err != nil {
		return "", err
	}
	dir = filepath.Clean(dir)
	best := ""
	for _, m := range mounts {
		if m.FSType != fstype || len(m.Point) <= len(best) {
			continue
		}
		if rel, err := filepath.Rel(m.Point, dir); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			best = m.Point
		}
	}
	return best, nil
}

// Unescape undoes the octal escapes (\040 for a space and so on) that
// mountinfo uses in paths.
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
