#!/usr/bin/env bash
# Installs what tcpr needs on a fresh Debian machine (run as root) and builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v setpriv >/dev/null || need+=(util-linux)
command -v curl >/dev/null || need+=(curl)
# The font of the plots of `tcpr bench --report` (read at run time).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# The balancer's tests and benchmark: load generators and the proxy it is
# compared with.
command -v wrk >/dev/null || need+=(wrk)
command -v ab >/dev/null || need+=(apache2-utils)
command -v haproxy >/dev/null || need+=(haproxy)
# The BPF steering datapath is C, built by clang against libbpf's headers
# (crates/tcpr-steer/build.rs).
command -v clang >/dev/null || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Kernel modules the lock and the labs use (built in on some kernels).
for m in nf_tables veth bridge; do modprobe -q "$m" 2>/dev/null || true; done
cargo build --release --workspace --quiet
