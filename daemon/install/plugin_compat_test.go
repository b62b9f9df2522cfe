package install

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshlane/meshlane/plugin"
)

// TestPluginAcceptsEntry runs the entries the installer writes through the
// plugin's own STATUS verb: the plugin must never reject one as a bad
// config, or every pod on the node would fail. The agent socket does not
// exist, so a fail-closed entry gets "plugin not available", which proves
// the config itself was accepted.
func TestPluginAcceptsEntry(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	cfgs := []Config{
		{Socket: sock},
		{Socket: sock, FailPolicy: "open", LogLevel: "debug", Timeout: 2500 * time.Millisecond, ExcludeNamespaces: []string{"meshlane-system", "kube-system"}},
		{Socket: sock, LogLevel: "warn"},
		{Socket: sock, LogLevel: "error", ExcludeNamespaces: []string{"a"}},
	}
	status := plugin.Funcs().Status
	for i, c := range cfgs {
		c = c.withDefaults()
		if err := c.validatePlugin(); err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		entry, err := c.pluginEntry()
		if err != nil {
			t.Fatal(err)
		}
		err = status(&skel.CmdArgs{StdinData: entry})
		var terr *types.Error
		switch {
		case c.FailPolicy == "open":
			if err != nil {
				t.Errorf("case %d: fail-open STATUS = %v, want nil", i, err)
			}
		case !errors.As(err, &terr) || terr.Code != types.ErrPluginNotAvailable:
			t.Errorf("case %d: STATUS of %s = %v, want code %d (agent not available)", i, entry, err, types.ErrPluginNotAvailable)
		}
	}
}
