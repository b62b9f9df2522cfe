package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestUnknownCNIVersion: a config with a cniVersion the plugin does not
// speak gets a clear CNI error listing the versions it does (CHECK, which
// skel checks first, answers that such a version has no CHECK).
func TestUnknownCNIVersion(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "meshlane-cni")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	conf := `{"cniVersion":"9.9.9","name":"n","type":"meshlane-cni","prevResult":{"cniVersion":"9.9.9","ips":[]}}`
	for _, verb := range []string{"ADD", "DEL", "CHECK"} {
		cmd := exec.Command(bin)
		cmd.Stdin = strings.NewReader(conf)
		cmd.Env = append(os.Environ(), "CNI_COMMAND="+verb, "CNI_CONTAINERID=c1", "CNI_NETNS=/nonexistent",
			"CNI_IFNAME=eth0", "CNI_PATH="+filepath.Dir(bin))
		var out bytes.Buffer
		cmd.Stdout = &out
		err := cmd.Run()
		if err == nil {
			t.Fatalf("%s with cniVersion 9.9.9 succeeded: %s", verb, out.String())
		}
		want := []string{"incompatible CNI versions", "1.1.0"}
		if verb == "CHECK" {
			want = []string{"does not allow CHECK"}
		}
		if !strings.Contains(out.String(), want[0]) || !strings.Contains(out.String(), want[len(want)-1]) {
			t.Fatalf("%s: error does not say which versions are supported: %s", verb, out.String())
		}
	}
}
