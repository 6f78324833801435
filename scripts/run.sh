#!/usr/bin/env bash
# Build Sandgate and the example policies, then run the sidecar on its built-in demo: the
# bundled RBAC policy, a generated ES256 key, a printed demo token and curl lines.
# Listens on 127.0.0.1:8181 (override: ./scripts/run.sh --listen 127.0.0.1:9000).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-policies.sh
exec target/release/sandgate serve "$@"
