#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, builds the policies,
# runs every Rust test (native policy tests, runtime, integration), then every example
# policy's fixtures through `sandgate test` against its compiled component.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-policies.sh
cargo test --release --locked
for policy in rbac tenant scopes; do
  echo "== sandgate test: $policy"
  target/release/sandgate test --policy "target/policies/$policy.wasm" --fixtures "guest-policies/$policy/fixtures.json"
done
