#!/usr/bin/env python3
"""Fleet propagation: the time from a revocation's write to its application on every sidecar
of a fleet of N, as `sandgate fleet revoke --wait` observes it (from just before the write to
the moment the status of every live sidecar reports the write's revision), for each N asked
for, on this machine; and the resident memory of an idle fleet sidecar.

Starts `nats-server -js` (Debian package) and N `sandgate serve` processes on loopback, all
stopped at the end. Needs the release build (`cargo build --release --bin sandgate`).

    python3 scripts/bench_fleet.py [WRITES] [N ...]      # default: 200 writes, N = 5 20 50
"""

import os
import re
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(n, writes, tmp):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    nats = subprocess.Popen([shutil.which("nats-server") or "/usr/bin/nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp / f"js-{n}")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    fleet = f"bench{n}"
    sidecars = []
    try:
        for i in range(n):
            d = tmp / f"n{n}-{i}"
            d.mkdir()
            (d / "sandgate.toml").write_text(
                '[server]\nproxy = "envoy"\n[runtime]\nmax_instances = 4\neval_threads = 1\nmax_threads_per_policy = 1\n'
                f'[registry]\ncache_dir = "{d / "oci"}"\n'
                f'[fleet]\nurl = "{url}"\nname = "{fleet}"\nnode_id = "node-{i}"\ncache_dir = "{d / "fleet"}"\nheartbeat_ms = 1000\n'
            )
            sidecars.append(subprocess.Popen([str(SANDGATE), "serve", "--config", str(d / "sandgate.toml"), "--listen", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"}))
        # Every sidecar's status present before measuring.
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run([str(SANDGATE), "fleet", "--url", url, "--name", fleet, "status"], capture_output=True, text=True)
            if out.stdout.count("node-") >= n:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"only {out.stdout.count('node-')} of {n} sidecars reported")
        time.sleep(2)
        memory = statistics.median(rss_kib(p.pid) for p in sidecars)
        took = []
        for w in range(writes):
            out = subprocess.run([str(SANDGATE), "fleet", "--url", url, "--name", fleet, "revoke", "--jti", f"bench-{w}", "--wait=30"], capture_output=True, text=True)
            m = re.search(r"applied by all (\d+) live sidecars ([0-9.]+) ms", out.stderr)
            if not m or int(m.group(1)) != n:
                raise RuntimeError(f"write {w}: {out.stderr}")
            took.append(float(m.group(2)))
        took.sort()
        p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
        return statistics.median(took), p99, took[-1], memory
    finally:
        for p in sidecars:
            p.terminate()
        for p in sidecars:
            p.wait()
        nats.terminate()
        nats.wait()


def main():
    writes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    sizes = [int(a) for a in sys.argv[2:]] or [5, 20, 50]
    print(f"{writes} revocations per fleet size, each with --wait, one at a time")
    print("| sidecars | p50 ms | p99 ms | max ms | idle sidecar RSS MiB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            p50, p99, worst, memory = run(n, writes, Path(tmp))
            print(f"| {n} | {p50:.1f} | {p99:.1f} | {worst:.1f} | {memory / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
