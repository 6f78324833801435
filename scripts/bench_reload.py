#!/usr/bin/env python3
"""Decision latency during continuous policy reloads versus steady state, in one run.

Run: scripts/bench-load.sh reload. Sandgate serves the `versioned` fixture policy; wrk -t2
-c64 measures DURATION seconds steady, then DURATION seconds while a client replaces the
policy through the admin API back to back, counting the reloads, in two ways:
- distinct modules: v1/v2 with a unique custom section appended each time, so every upload
  has a new digest and is compiled;
- known modules: v1, v2, v1, … as they are, which Sandgate recognises by digest (rollback)."""

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import RELEASE, ROOT, free_port, start, wrk  # noqa: E402

DURATION = int(os.environ.get("DURATION", "8"))
TOKEN = "bench-admin-token-of-at-least-32-chars"


def main():
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-reload-"))
    policies = ROOT / "target" / "policies"
    admin_port = free_port()
    config = tmp / "reload.toml"
    config.write_text(f"""
[server]
proxy = "nginx"
default_policy = "live"
[runtime]
max_instances = 128
[admin]
listen = "127.0.0.1:{admin_port}"
token = "{TOKEN}"
[[policies]]
id = "live"
module = "{policies / 'versioned-v1.wasm'}"
""")
    modules = [(policies / f"versioned-v{v}.wasm").read_bytes() for v in (1, 2)]
    proc, port = start([str(RELEASE / "sandgate"), "serve", "--config", str(config)])
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/x", "X-Forwarded-Host": "app.bench", "X-Forwarded-Proto": "http"}
    try:
        wrk(port, headers, 2)
        steady = wrk(port, headers, DURATION)
        rows = [("steady", steady, None)]
        for name, distinct in (("continuous reloads, distinct modules", True), ("continuous reloads, known modules", False)):
            stop, reloads = threading.Event(), [0]

            def reload():
                while not stop.is_set():
                    body = modules[reloads[0] % 2]
                    if distinct:  # a custom section (id 0): new digest, same code
                        tag = f"{name}-{reloads[0]}".encode()
                        body += custom_section(tag)
                    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/policies/live", data=body, method="PUT", headers={"Authorization": f"Bearer {TOKEN}"})
                    with urllib.request.urlopen(request, timeout=30) as r:
                        assert r.status == 200
                    reloads[0] += 1

            thread = threading.Thread(target=reload)
            thread.start()
            during = wrk(port, headers, DURATION)
            stop.set()
            thread.join()
            rows.append((name, during, reloads[0]))
    finally:
        proc.terminate()
        proc.wait(10)
    print("\n| phase | reloads | req/s | p50 µs | p99 µs | p50 / steady | p99 / steady |\n|---|---|---|---|---|---|---|")
    for name, (rps, p50, p99), reloads in rows:
        print(f"| {name} | {reloads if reloads is not None else '-'} | {rps:,.0f} | {p50:.0f} | {p99:.0f} | {p50 / steady[1]:.2f} | {p99 / steady[2]:.2f} |")


def custom_section(payload):
    """A custom section named `sandgate-bench` holding `payload` (sizes < 128 bytes)."""
    name = b"sandgate-bench"
    content = bytes([len(name)]) + name + payload
    return bytes([0, len(content)]) + content


if __name__ == "__main__":
    main()
