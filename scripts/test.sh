#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (the wasm target, nginx
# and Caddy from apt, Python tools in .venv), builds the policies, runs every Rust test
# (native policy tests, runtime, integration), every example policy's fixtures through
# `sandgate test`, and the end-to-end tests (real sockets, PyJWT tokens, nginx, Caddy).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null || ! command -v caddy >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nginx caddy >/dev/null
fi
if [ ! -x .venv/bin/pytest ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
fi

./scripts/build-policies.sh
cargo test --release --locked
for policy in rbac tenant scopes allow-all; do
  echo "== sandgate test: $policy"
  target/release/sandgate test --policy "target/policies/$policy.wasm" --fixtures "guest-policies/$policy/fixtures.json"
done
.venv/bin/pytest -q tests/e2e
