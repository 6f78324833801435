#!/usr/bin/env python3
"""Start-up time of a sidecar whose policy is an OCI artifact, against one whose policy is a
file (the baseline), in alternating rounds on this machine:

- `file`:   module = "target/policies/rbac.wasm" (read + compile)
- `cold`:   module = "oci://127.0.0.1:PORT/bench/rbac:v1", empty cache (resolve the tag, pull
            the manifest and the layer, verify, cache, compile)
- `cached`: module = "oci://…/bench/rbac@sha256:…", the registry stopped (cache read, verify,
            compile)
- `pull`:   `sandgate pull` of the tag into an empty cache (process start, resolve, pull,
            verify, cache; no compile), for what the network part alone costs

Each sample is the time from starting `sandgate serve` to its "listening on" line (the state,
every policy compiled and probed, is loaded before anything is bound). Needs `docker-registry`
(Debian package) and the release build with policies (`./scripts/build-policies.sh`).

    python3 scripts/bench_oci.py [ROUNDS]
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SANDGATE = ROOT / "target/release/sandgate"
RBAC = ROOT / "target/policies/rbac.wasm"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(directory, port):
    config = directory / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {directory / 'storage'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([shutil.which("docker-registry") or "/usr/bin/docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.02)
    raise RuntimeError("docker-registry did not start")


def startup_seconds(directory, module, cache_dir):
    config = directory / "bench.toml"
    config.write_text(
        f'[server]\nproxy = "envoy"\ndefault_policy = "rbac"\n[[policies]]\nid = "rbac"\nmodule = "{module}"\n'
        f'[registry]\ncache_dir = "{cache_dir}"\n'
    )
    began = time.perf_counter()
    proc = subprocess.Popen([str(SANDGATE), "serve", "--config", str(config), "--listen", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "error"})
    for line in proc.stderr:
        if "listening on" in line:
            elapsed = time.perf_counter() - began
            break
    else:
        raise RuntimeError(f"sandgate did not start for {module}")
    proc.terminate()
    proc.wait(timeout=15)
    return elapsed


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        registry = start_registry(tmp, port)
        tag = f"oci://127.0.0.1:{port}/bench/rbac:v1"
        pushed = subprocess.run([str(SANDGATE), "push", str(RBAC), tag], capture_output=True, text=True, check=True)
        pinned = f"oci://127.0.0.1:{port}/bench/rbac@{pushed.stdout.strip()}"
        warm = tmp / "warm-cache"
        subprocess.run([str(SANDGATE), "pull", pinned, "--out", str(tmp / "p.wasm"), "--cache-dir", str(warm)], capture_output=True, check=True)
        samples = {"file": [], "cold": [], "cached": [], "pull": []}
        for r in range(rounds):
            # file → cold (registry up) → cached (registry down), then the registry back up.
            samples["file"].append(startup_seconds(tmp, RBAC, tmp / "unused-cache"))
            samples["cold"].append(startup_seconds(tmp, tag, tmp / f"cold-{r}"))
            began = time.perf_counter()
            subprocess.run([str(SANDGATE), "pull", tag, "--out", str(tmp / "p.wasm"), "--cache-dir", str(tmp / f"pull-{r}")], capture_output=True, check=True)
            samples["pull"].append(time.perf_counter() - began)
            registry.terminate()
            registry.wait()
            samples["cached"].append(startup_seconds(tmp, pinned, warm))
            registry = start_registry(tmp, port)
        registry.terminate()
        registry.wait()
    base = statistics.median(samples["file"])
    print(f"{rounds} rounds, start to listening, RBAC module ({RBAC.stat().st_size} bytes)")
    print("| start | median ms | min ms | ratio to file (median of per-round ratios) |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        ratios = [v / f for v, f in zip(values, samples["file"])]
        print(f"| {name} | {statistics.median(values) * 1000:.1f} | {min(values) * 1000:.1f} | {statistics.median(ratios):.2f} |")
    print(f"file baseline median: {base * 1000:.1f} ms")


if __name__ == "__main__":
    main()
