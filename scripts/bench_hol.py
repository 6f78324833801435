#!/usr/bin/env python3
"""Head-of-line benchmark: allow-all checks and /healthz, idle and while 16 clients hammer a
policy that loops until its time limit (the hostile fixture's /loop, 100 ms).

Run: scripts/bench-load.sh hol  (with BASELINE_SANDGATE=PATH also measures that build).
Each phase: wrk -t1 -c8 for DURATION (5) seconds on allow-all checks, while a client asks
/healthz every 20 ms on its own connection; in the loaded phase 16 more clients send /loop
checks back to back. Prints a Markdown table: allow-all p50/p99, /healthz p50/max, and what the
looping clients were answered."""

import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import free_port, start, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DURATION = int(os.environ.get("DURATION", "5"))
HEADERS = {"X-Original-Method": "GET", "X-Forwarded-Host": "app.bench", "X-Forwarded-Proto": "http"}


def config(tmp):
    path = tmp / "hol.toml"
    path.write_text(f"""
[server]
proxy = "nginx"
default_policy = "open"
[[routes]]
path_prefix = "/loop"
policy = "loop"
[[policies]]
id = "open"
module = "{ROOT / "target" / "policies" / "allow-all.wasm"}"
[[policies]]
id = "loop"
module = "{ROOT / "target" / "policies" / "hostile.wasm"}"
""")
    return str(path)


def healthz(port, stop, samples):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        started = time.perf_counter()
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        samples.append((time.perf_counter() - started) * 1e6)
        time.sleep(0.02)


def looper(port, stop, answers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        connection.request("GET", "/auth", headers={**HEADERS, "X-Original-URI": "/loop"})
        response = connection.getresponse()
        response.read()
        key = f"{response.status} {response.getheader('x-sandgate-reason')}"
        answers[key] = answers.get(key, 0) + 1


def phase(port, loaded):
    stop, samples, answers = threading.Event(), [], {}
    threads = [threading.Thread(target=healthz, args=(port, stop, samples))]
    if loaded:
        threads += [threading.Thread(target=looper, args=(port, stop, answers)) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    rps, p50, p99 = wrk_small(port)
    stop.set()
    for t in threads:
        t.join()
    return rps, p50, p99, statistics.median(samples), max(samples), answers


def wrk_small(port):
    args = ["wrk", "-t1", "-c8", f"-d{DURATION}s", "--latency"]
    for k, v in {**HEADERS, "X-Original-URI": "/api/x"}.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/auth"], capture_output=True, text=True, check=True).stdout
    import re

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1_000_000}[m.group(2)]

    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), pct(50), pct(99)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-hol-"))
    builds = [("this build", str(ROOT / "target" / "release" / "sandgate"))]
    if os.environ.get("BASELINE_SANDGATE"):
        builds.append(("baseline build", os.environ["BASELINE_SANDGATE"]))
    print("| build | phase | allow-all req/s | p50 µs | p99 µs | /healthz p50 µs | /healthz max µs | looping clients answered |")
    print("|---|---|---|---|---|---|---|---|")
    for name, binary in builds:
        for loaded in (False, True):
            proc, port = start([binary, "serve", "--config", config(tmp)])
            try:
                rps, p50, p99, h50, hmax, answers = phase(port, loaded)
            finally:
                proc.terminate()
                proc.wait(10)
            looped = ", ".join(f"{v} × {k}" for k, v in sorted(answers.items())) or "-"
            print(f"| {name} | {'16 looping clients' if loaded else 'idle'} | {rps:,.0f} | {p50:.0f} | {p99:.0f} | {h50:.0f} | {hmax:.0f} | {looped} |", flush=True)


if __name__ == "__main__":
    main()
