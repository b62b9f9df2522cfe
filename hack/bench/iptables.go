package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshlane/meshlane/daemon/mesh"
	"github.com/meshlane/meshlane/test/testenv"
)

// iptablesTimeout bounds one iptables-restore.
const iptablesTimeout = 15 * time.Second

// istioRules is the IPv4 nat table a sidecar-injected pod gets from
// istio-iptables in its default configuration (all inbound ports, all
// outbound addresses): outbound TCP to the proxy's outbound port unless it
// comes from the proxy's uid/gid or goes to 127.0.0.1, passthrough traffic
// from 127.0.0.6 left alone, inbound TCP to the inbound port except the
// proxy's own ports. The same proxy ports are the ones the datapath
// excludes (mesh.Istio.ProxyPorts), so both redirects do the same job.
func istioRules(p mesh.Profile) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("*nat")
	for _, chain := range []string{"ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"} {
		w(":%s - [0:0]", chain)
	}
	w("-A PREROUTING -p tcp -j ISTIO_INBOUND")
	w("-A OUTPUT -p tcp -j ISTIO_OUTPUT")
	for _, port := range p.ProxyPorts {
		w("-A ISTIO_INBOUND -p tcp --dport %d -j RETURN", port)
	}
	w("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
	w("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports %d", p.InboundPort)
	w("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports %d", p.OutboundPort)
	// Inbound passthrough: the sidecar reaches the app from 127.0.0.6.
	w("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN")
	// The proxy calling its own pod's IP over lo goes through inbound
	// handling; anything else on lo from the app stays put.
	w("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner %d -j ISTIO_IN_REDIRECT", p.ProxyUID)
	w("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner %d -j RETURN", p.ProxyUID)
	w("-A ISTIO_OUTPUT -m owner --uid-owner %d -j RETURN", p.ProxyUID)
	w("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner %d -j ISTIO_IN_REDIRECT", p.ProxyGID)
	w("-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner %d -j RETURN", p.ProxyGID)
	w("-A ISTIO_OUTPUT -m owner --gid-owner %d -j RETURN", p.ProxyGID)
	w("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")
	w("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
	w("COMMIT")
	return b.String()
}

// iptablesVariants are tried in order until one loads the rules; iptables
// on Debian is the nftables flavour, the legacy one is the fallback.
var iptablesVariants = []string{"iptables-restore", "iptables-nft-restore", "iptables-legacy-restore"}

// istioRedirect loads istioRules into each pod's own network namespace and
// returns the iptables-restore variant that worked. A restore is atomic, so
// a variant that fails leaves the pod without rules for the next to try.
func (n *node) istioRedirect(ctx context.Context, pods ...*testenv.Pod) (string, error) {
	rules := filepath.Join(n.scratch, "istio-rules")
	if err := os.WriteFile(rules, []byte(istioRules(mesh.Istio)), 0o644); err != nil {
		return "", fmt.Errorf("write iptables rules: %w", err)
	}
	defer os.Remove(rules)
	load := func(tool string, pod *testenv.Pod) error {
		return n.runRoot(ctx, pod, "iptables-"+pod.Name, iptablesTimeout, tool, "--noflush", rules)
	}
	var tool string
	var tried []error
	for _, t := range iptablesVariants {
		if _, err := exec.LookPath(t); err != nil {
			tried = append(tried, err)
			continue
		}
		if err := load(t, pods[0]); err != nil {
			tried = append(tried, fmt.Errorf("%s: %w", t, err))
			continue
		}
		tool = t
		break
	}
	if tool == "" {
		return "", fmt.Errorf("load the Istio nat rules: no iptables-restore works here (apt-get install iptables): %w", errors.Join(tried...))
	}
	for _, pod := range pods[1:] {
		if err := load(tool, pod); err != nil {
			return "", fmt.Errorf("load the Istio nat rules with %s: %w", tool, err)
		}
	}
	return tool, nil
}
