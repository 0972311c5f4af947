#!/usr/bin/env bash
# Side-by-side benchmark of ferry against haproxy, nginx (stream), stunnel
# and Envoy: installs the peers and load generators if missing (Envoy 1.40
# through tests/envoy/install.sh), builds ferry, then runs bench/compare.py
# with the given arguments (see --help).
#
#   bash bench/compare.sh --quick     # smoke run, one to two minutes
#   bash bench/compare.sh             # full run
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package names; each provides the command checked for.
need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v stunnel4 >/dev/null 2>&1 || need+=(stunnel4)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
# The real-client workload: redis-server's package brings redis-benchmark.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  # Noninteractive: iperf3's package otherwise asks whether to run a daemon.
  # The packages' own services are not used; the benchmark starts its own
  # instances with their own configs.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Envoy 1.40 in .deps/envoy (or FERRY_ENVOY, which install.sh checks and
# echoes). Without it only the envoy column fails; the others still run.
if envoy=$(bash tests/envoy/install.sh); then
  export FERRY_ENVOY="$envoy"
else
  echo "warning: Envoy could not be installed; the envoy column will report a failure" >&2
fi

cargo build --release --quiet

# The held-connections test needs many fds: the script raises its own soft
# limit to the hard one, and so does every proxy it starts.
export COMPARE_ENTRY="bash bench/compare.sh${*:+ $*}"
exec python3 bench/compare.py "$@"
