// Command meshlane-cni is the meshlane chained CNI plugin. The container
// runtime runs it; see package plugin.
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshlane/meshlane/plugin"
)

// buildVersion is set at build time with -ldflags "-X main.buildVersion=...".
var buildVersion = "dev"

const usage = `meshlane-cni %s: chained CNI plugin reporting pods to the meshlane agent.

The container runtime runs it (CNI_COMMAND and the other CNI_* variables set,
the network config on stdin); it is not meant to be run by hand. Install it in
the CNI bin directory and list it last in the plugins of the pod network's
.conflist:

  {"type": "meshlane-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true},
   "failPolicy": "closed", "excludeNamespaces": ["meshlane-system"]}

Config keys: socket (default /var/run/meshlane/meshlane.sock), timeout (default
"5s"), failPolicy ("closed" or "open"), logLevel ("debug", "info", "warn",
"error"), excludeNamespaces.

CNI spec versions: %s
`

func main() {
	if os.Getenv("CNI_COMMAND") == "" && len(os.Args) > 1 {
		switch os.Args[1] {
		case "-h", "--help", "help":
			fmt.Printf(usage, buildVersion, strings.Join(version.All.SupportedVersions(), ", "))
			return
		case "version", "--version":
			fmt.Printf("meshlane-cni %s (CNI spec %s)\n", buildVersion, strings.Join(version.All.SupportedVersions(), ", "))
			return
		}
	}
	skel.PluginMainFuncs(plugin.Funcs(), version.All, "meshlane-cni "+buildVersion+": chained CNI plugin for meshlane (run with --help)")
}
