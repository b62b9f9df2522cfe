package testenv

import (
	"strings"
	"testing"
)

func TestLinkNamesFitIFNAMSIZ(t *testing.T) {
	for _, kind := range []byte{'b', 'h', 'p'} {
		if n := linkName(kind, 999_999); len(n) > 15 || !strings.HasPrefix(n, linkRunPrefix()) {
			t.Fatalf("link name %q: want at most 15 bytes starting with %q", n, linkRunPrefix())
		}
	}
	if _, err := CreateBridge("toolong", testNet4, testNet6); err == nil || !strings.Contains(err.Error(), "1-6 characters") {
		t.Fatalf("CreateBridge with a 7 character label: %v, want a label error", err)
	}
}

func TestObjectName(t *testing.T) {
	name, err := objectName("pod-a1")
	if err != nil || name != NamePrefix+RunID()+"-pod-a1" {
		t.Fatalf("objectName(pod-a1) = %q, %v", name, err)
	}
	for _, bad := range []string{"", "a/b", "../x", "Upper", strings.Repeat("x", 33)} {
		if _, err := objectName(bad); err == nil {
			t.Errorf("objectName(%q) accepted a bad label", bad)
		}
	}
}
