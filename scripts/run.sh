#!/usr/bin/env bash
# Build Sandgate and the example policies, then evaluate the bundled RBAC policy on one request
# it allows and one it denies.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-policies.sh
data=$(mktemp); allowed=$(mktemp); denied=$(mktemp)
trap 'rm -f "$data" "$allowed" "$denied"' EXIT
python3 -c 'import json,sys; json.dump(json.load(open("guest-policies/rbac/fixtures.json"))["data"], sys.stdout)' > "$data"
echo '{"method": "GET", "path": "/api/orders/7", "claims": {"sub": "alice", "roles": ["reader"]}}' > "$allowed"
echo '{"method": "DELETE", "path": "/api/orders/7", "claims": {"sub": "alice", "roles": ["reader"]}}' > "$denied"
for request in "$allowed" "$denied"; do
  echo "== $(cat "$request")"
  target/release/sandgate eval --policy target/policies/rbac.wasm --request "$request" --data "$data"
done
