// Package bpf holds meshlane's eBPF datapath (meshlane.c) and the Go
// bindings bpf2go generates from it. The generated files are committed;
// `make generate` rebuilds them with clang and CI checks for a diff.
package bpf

// The -idirafter paths find <asm/types.h> on Debian-style multiarch hosts
// (either architecture); the object itself is architecture independent.
//go:generate go tool bpf2go -target bpfel -go-package bpf -cflags "-O2 -g -Wall -Werror -mcpu=v3 -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu" -type ml_pod -type ml_listener_key -type ml_port_key -type ml_cidr_key -type ml_origdst -type ml_tuple -type ml_addr -type ml_counter -type ml_pod_flags -type ml_port_dir -type ml_port_flags -type ml_cidr_kind -type ml_redirect_kind Meshlane meshlane.c

// The connections view: an iterator over the datapath's socket storage,
// loaded on demand by the agent with the datapath's map handed in.
//go:generate go tool bpf2go -target bpfel -go-package bpf -cflags "-O2 -g -Wall -Werror -mcpu=v3 -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu" Conns conns.c

// The listener registry: an iterator that puts a pod's open inbound
// listeners into the datapath's meshlane_listeners, for sk_lookup.
//go:generate go tool bpf2go -target bpfel -go-package bpf -cflags "-O2 -g -Wall -Werror -mcpu=v3 -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu" -type ml_listener_key Listeners listeners.c
