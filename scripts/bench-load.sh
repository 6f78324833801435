#!/usr/bin/env bash
# Load benchmark of the sidecar (see scripts/bench_load.py). Needs wrk (apt) and the test venv.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r tests/e2e/requirements.txt; }
./scripts/build-policies.sh
cargo build --release --locked -p sandgate --examples
exec .venv/bin/python scripts/bench_load.py
