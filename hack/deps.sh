#!/usr/bin/env bash
# Installs the Debian packages meshlane builds and tests with: clang and
# libbpf headers (make generate), iproute2 and iptables (tests, demo, bench),
# wrk (the load generator of make bench), a C compiler and libc headers (the
# C sidecar of make bench; gcc only recommends libc6-dev, hence both) and
# perf (make bench --profile).
set -euo pipefail
need=()
command -v clang >/dev/null || need+=(clang llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -f /usr/include/linux/bpf.h ] || need+=(linux-libc-dev)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v wrk >/dev/null || need+=(wrk)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/include/stdio.h ] || need+=(libc6-dev)
command -v perf >/dev/null || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
