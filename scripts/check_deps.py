#!/usr/bin/env python3
"""The dependency rule of host/ (host/README.md), checked on the resolved graph of normal
(non-dev) dependencies, transitively:

- sandgate-runtime knows nothing of HTTP, JWT, TOML or the other host crates;
- sandgate-auth knows nothing of WebAssembly or of the server;
- sandgate-registry (OCI artifacts) knows nothing of WebAssembly, JWT or the other host crates;
- sandgate-records (decision records, the archive, replay) knows nothing of JWT, TOML or
  the server;
- only sandgate-server names tonic and the server side of hyper;
- only the `sandgate` binary (and the test crate) depends on sandgate-tooling.

Exits 1 naming every forbidden edge. `--self-test` checks that an auth → runtime edge, added
to the real graph, is caught.
"""

import json
import subprocess
import sys

HOST = {"sandgate-runtime", "sandgate-auth", "sandgate-registry", "sandgate-records", "sandgate-server", "sandgate-tooling", "sandgate"}
FORBIDDEN = {
    "sandgate-runtime": {"sandgate-auth", "sandgate-registry", "sandgate-server", "sandgate-tooling", "hyper", "tonic", "jsonwebtoken", "toml"},
    "sandgate-auth": {"sandgate-runtime", "sandgate-registry", "sandgate-server", "sandgate-tooling", "wasmtime", "tonic", "toml"},
    "sandgate-registry": {"sandgate-runtime", "sandgate-auth", "sandgate-server", "sandgate-tooling", "wasmtime", "jsonwebtoken", "tonic", "toml"},
    "sandgate-records": {"sandgate-auth", "sandgate-server", "sandgate-tooling", "tonic", "jsonwebtoken", "toml"},
    "sandgate-server": {"sandgate-tooling", "wit-component"},
    "sandgate-tooling": {"sandgate-auth", "sandgate-registry", "sandgate-records", "sandgate-server", "hyper", "tonic", "jsonwebtoken"},
}
MAY_USE_TOOLING = {"sandgate", "sandgate-tests"}


def graph():
    """Each workspace crate's name → the names of every package linked into it: its normal
    dependencies, transitively (from `cargo metadata`). A proc-macro runs in the compiler and
    is not linked, so what it depends on is not followed."""
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--locked"], check=True, capture_output=True, text=True).stdout
    meta = json.loads(out)
    names = {p["id"]: p["name"] for p in meta["packages"]}
    macros = {p["id"] for p in meta["packages"] if any("proc-macro" in t["kind"] for t in p["targets"])}
    edges = {}
    for node in meta["resolve"]["nodes"]:
        edges[node["id"]] = {d["pkg"] for d in node["deps"] if any(k["kind"] is None for k in d["dep_kinds"])}
    closure = {}
    for member in meta["workspace_members"]:
        seen, todo = set(), list(edges.get(member, ()))
        while todo:
            pkg = todo.pop()
            if pkg not in seen:
                seen.add(pkg)
                if pkg not in macros:
                    todo.extend(edges.get(pkg, ()))
        closure[names[member]] = {names[pkg] for pkg in seen}
    return closure


def reachable(closure, start):
    return closure.get(start, set())


def violations(edges):
    found = []
    for crate, banned in FORBIDDEN.items():
        for dep in sorted(reachable(edges, crate) & banned):
            found.append(f"{crate} depends on {dep}")
    for crate, deps in edges.items():
        if "sandgate-tooling" in deps and crate not in MAY_USE_TOOLING and crate != "sandgate-tooling":
            found.append(f"{crate} depends on sandgate-tooling (only the binary may)")
    return found


def main():
    edges = graph()
    missing = HOST - edges.keys()
    if missing:
        sys.exit(f"check_deps: crates not in the workspace: {sorted(missing)}")
    if "--self-test" in sys.argv:
        edges["sandgate-auth"] = edges["sandgate-auth"] | {"sandgate-runtime"}
        if "sandgate-auth depends on sandgate-runtime" not in violations(edges):
            sys.exit("check_deps self-test: an auth → runtime edge was not caught")
        print("check_deps self-test: an auth → runtime edge is caught")
        return
    found = violations(edges)
    for v in found:
        print(f"forbidden dependency: {v}", file=sys.stderr)
    if found:
        sys.exit(1)
    print("check_deps: the dependency rule holds")


if __name__ == "__main__":
    main()
