#!/usr/bin/env bash
# Build the sandgate CLI and every policy in guest-policies/ into target/policies/<name>.wasm.
# The tests and the demo load policies from there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
cargo build --release --locked -p sandgate --bin sandgate
mkdir -p target/policies
for policy in rbac tenant scopes hostile allow-all; do
  target/release/sandgate build "guest-policies/$policy" --out "target/policies/$policy.wasm"
done
# Must be refused at load, so it is written without validation.
target/release/sandgate build guest-policies/bad-import --no-validate --out target/policies/bad-import.wasm
# Two builds of one policy that differ only in the header they answer (hot-reload tests).
for version in 1 2; do
  SANDGATE_FIXTURE_VERSION=$version target/release/sandgate build guest-policies/versioned --out "target/policies/versioned-v$version.wasm"
done
