#!/usr/bin/env bash
# Build the sandgate CLI and every policy in guest-policies/ into target/policies/<name>.wasm.
# The tests and the demo load policies from there.
set -euo pipefail
cd "$(dirname "$0")/.."
for target in wasm32-unknown-unknown wasm32-wasip2; do
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
done
# Without `-p`: the features of the workspace's default members, as `cargo test` builds them, so
# the test build reuses every dependency compiled here.
cargo build --release --locked --bin sandgate
mkdir -p target/policies
for policy in rbac tenant scopes hostile allow-all; do
  target/release/sandgate build "guest-policies/$policy" --out "target/policies/$policy.wasm"
done
# The same crates built with the standard toolchain's target (deny-all WASI linked).
for policy in rbac hostile allow-all; do
  target/release/sandgate build "guest-policies/$policy" --target wasm32-wasip2 --out "target/policies/$policy-wasip2.wasm"
done
# The WASI attacks, answering the probe so that a sidecar serves them (end-to-end replay test).
SANDGATE_FIXTURE_SERVABLE=1 target/release/sandgate build guest-policies/hostile --target wasm32-wasip2 --out target/policies/hostile-wasip2-servable.wasm
# Must be refused at load, so they are written without validation.
target/release/sandgate build guest-policies/hostile-socket --target wasm32-wasip2 --no-validate --out target/policies/hostile-socket-wasip2.wasm
target/release/sandgate build guest-policies/bad-import --no-validate --out target/policies/bad-import.wasm
# A policy built against contract 0.1.0, which the host still serves.
target/release/sandgate build guest-policies/contract-0-1 --out target/policies/contract-0-1.wasm
# Two builds of one policy that differ only in the header they answer (hot-reload tests).
for version in 1 2; do
  SANDGATE_FIXTURE_VERSION=$version target/release/sandgate build guest-policies/versioned --out "target/policies/versioned-v$version.wasm"
done
