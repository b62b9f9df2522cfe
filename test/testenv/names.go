package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
	"sync/atomic"
)

// NamePrefix starts the names of network namespaces, cgroups and temporary
// directories made here; the run ID follows.
const NamePrefix = "meshlane-test-"

// linkPrefix starts the names of links made here; with the 6 character run
// ID, a kind letter and a counter it stays within IFNAMSIZ-1 = 15.
const linkPrefix = "ml"

var (
	runID = newRunID()
	seq   atomic.Uint32
)

func newRunID() string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("testenv: no randomness for the run ID: %v", err))
	}
	return hex.EncodeToString(b[:])
}

// RunID is this process's random 6 hex digit tag, part of every name.
func RunID() string { return runID }

// runPrefix starts every namespace, cgroup and directory name of this run.
func runPrefix() string { return NamePrefix + runID + "-" }

// linkRunPrefix starts every link name of this run.
func linkRunPrefix() string { return linkPrefix + runID }

// nextLinkName returns a fresh link name such as "mla1b2c3h12"; kind tells
// what the link is (b bridge, h host veth, p pod veth before its rename).
func nextLinkName(kind byte) string { return linkName(kind, seq.Add(1)) }

// linkName stays within 15 bytes for counters up to 999999, far more links
// than one test process makes.
func linkName(kind byte, n uint32) string {
	return fmt.Sprintf("%s%c%d", linkRunPrefix(), kind, n)
}

var labelRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// objectName turns a caller's label into this run's name for a namespace
// or cgroup, such as "meshlane-test-a1b2c3-client".
func objectName(label string) (string, error) {
	if !labelRE.MatchString(label) {
		return "", fmt.Errorf("label %q: use 1-32 characters a-z, 0-9 and -", label)
	}
	return runPrefix() + label, nil
}
