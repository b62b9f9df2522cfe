package datapath

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// CheckKernel probes every kernel feature the datapath needs and names
// each one that is missing. Pod identity by netns cookie in sockops, sk_msg
// and getsockopt makes Linux 5.15 the floor.
func CheckKernel() error {
	type probe struct {
		what string
		run  func() error
	}
	probes := []probe{
		{"cgroup sock_addr programs (connect4/6)", func() error { return features.HaveProgramType(ebpf.CGroupSockAddr) }},
		{"sock_ops programs", func() error { return features.HaveProgramType(ebpf.SockOps) }},
		{"sk_msg programs", func() error { return features.HaveProgramType(ebpf.SkMsg) }},
		{"cgroup getsockopt programs", func() error { return features.HaveProgramType(ebpf.CGroupSockopt) }},
		{"sockhash maps", func() error { return features.HaveMapType(ebpf.SockHash) }},
		{"socket local storage maps", func() error { return features.HaveMapType(ebpf.SkStorage) }},
		{"LPM trie maps", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
		{"bpf_get_netns_cookie in connect hooks", func() error {
			return features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)
		}},
		{"bpf_get_netns_cookie in sock_ops (5.15)", func() error {
			return features.HaveProgramHelper(ebpf.SockOps, asm.FnGetNetnsCookie)
		}},
		{"bpf_get_netns_cookie in sk_msg (5.15)", func() error {
			return features.HaveProgramHelper(ebpf.SkMsg, asm.FnGetNetnsCookie)
		}},
		{"bpf_get_netns_cookie in getsockopt (5.15)", func() error {
			return features.HaveProgramHelper(ebpf.CGroupSockopt, asm.FnGetNetnsCookie)
		}},
		{"bpf_sk_storage_get in connect hooks", func() error {
			return features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSkStorageGet)
		}},
		{"bpf_sk_storage_get in sock_ops", func() error {
			return features.HaveProgramHelper(ebpf.SockOps, asm.FnSkStorageGet)
		}},
		{"bpf_msg_redirect_hash", func() error {
			return features.HaveProgramHelper(ebpf.SkMsg, asm.FnMsgRedirectHash)
		}},
	}
	var missing []string
	for _, p := range probes {
		if err := p.run(); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				missing = append(missing, p.what)
				continue
			}
			return fmt.Errorf("datapath: probing kernel for %s: %w (is the agent running as root with CAP_BPF and CAP_NET_ADMIN?)", p.what, err)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("datapath: this kernel lacks %s; meshlane needs Linux >= 5.15 with BPF enabled", strings.Join(missing, ", "))
	}
	return nil
}
