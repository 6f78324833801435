#!/usr/bin/env python3
"""The test build compiles every dependency of the `sandgate` binary with the features the
binary's own build gives it.

`scripts/build-policies.sh` builds the binary for the workspace's default members
(`cargo build --release --bin sandgate`); `cargo test` builds the same members with their
dev-dependencies too. A dev-dependency that turns on a feature of a crate the host uses (the
engines benchmark's Cedar turns on `serde_json`'s `preserve_order`) makes the tests run on
dependencies built differently from the shipped binary's, and makes every build compile
wasmtime and everything above it twice. Such crates belong behind the `bench` features.

Compares the resolved features (`cargo tree`) of every package both builds compile and exits 1
naming each package the test build compiles with features the binary's build does not, and
each workspace crate the binary's build compiles with its test hooks (`bench-internals`,
`bench`): building for every default member, the binary must not pick up the features the test
crate asks for. `--self-test` checks that turning on `sandgate-runtime`'s
`bench` feature in the test build is caught.
"""

import functools
import subprocess
import sys


@functools.cache
def host_target():
    out = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("host: "))


def resolved(edges, features=()):
    """`{package: {feature list, …}}` for the default members' build with dependency `edges`
    (a package resolved twice, for build scripts and for the target, has two lists)."""
    args = ["cargo", "tree", "--locked", "-e", edges, "--target", host_target(), "--prefix", "none", "-f", "{p}|{f}"]
    args += [f"--features={f}" for f in features]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    packages = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        package, enabled = line.split("|", 1)
        package = package.replace(" (proc-macro)", "").split(" (")[0].strip()
        packages.setdefault(package, set()).add(enabled.replace(" (*)", "").strip())
    return packages


def differences(binary, tests):
    """Every package the binary's build compiles with a feature list the test build does not,
    as `(package, binary's lists, tests' lists)`. A list the test build adds beside the binary's
    (a dev-dependency using, for the target, a crate the binary uses only in a build script) is
    compiled in addition and rebuilds nothing of the binary's."""
    return sorted(
        (package, sorted(binary[package]), sorted(tests[package]))
        for package in binary.keys() & tests.keys()
        if not package.startswith("sandgate") and not binary[package] <= tests[package]
    )


def test_hooks(binary):
    """The workspace crates the binary's build compiles with their test and benchmark hooks
    (`bench-internals`, `bench`): those must never ship."""
    return sorted(
        package
        for package, lists in binary.items()
        if package.startswith("sandgate") and any({"bench", "bench-internals"} & set(l.split(",")) for l in lists)
    )


def main():
    binary = resolved("normal,build")
    if "--self-test" in sys.argv:
        found = differences(binary, resolved("normal,build,dev", ["sandgate-runtime/bench"]))
        if not any(package.startswith("serde_json ") for package, _, _ in found):
            sys.exit("check_build_parity self-test: the benchmarks' serde_json features were not caught")
        if not test_hooks(resolved("normal,build", ["sandgate-runtime/bench-internals"])):
            sys.exit("check_build_parity self-test: a binary built with bench-internals was not caught")
        print("check_build_parity self-test: the benchmarks' serde_json features and a binary with test hooks are caught")
        return
    hooks = test_hooks(binary)
    for package in hooks:
        print(f"{package}: the binary's build turns on its test hooks")
    found = differences(binary, resolved("normal,build,dev"))
    for package, built, tested in found:
        print(f"{package}: the binary's build has features {built}, the test build {tested}")
    if found or hooks:
        sys.exit(f"check_build_parity: {len(found)} dependencies built with other features by the tests, {len(hooks)} crates with test hooks in the binary")
    print("check_build_parity: the test build compiles the binary's dependencies as the binary does, and the binary has no test hooks")


if __name__ == "__main__":
    main()
