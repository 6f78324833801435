#!/usr/bin/env python3
"""What a sidecar holds in memory: the RBAC example (HS256), `[runtime]` defaults unless
MAX_INSTANCES / MEMORY_LIMIT_MIB are set in the environment.

- resident memory (RSS) just started, and after 20,000 checks (every pool slot the checks
  used is then resident);
- RSS with 1,000 idle keep-alive connections open, each having sent one check;
- the virtual address space reserved (VmSize), which is mostly the instance pool's slots.

    ./scripts/build-policies.sh
    .venv/bin/python scripts/bench_memory.py
"""

import os
import socket
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records as records  # noqa: E402
from bench_load import wrk  # noqa: E402

CONNECTIONS = 1000
# `SANDGATE=PATH`: measure another build.
if "SANDGATE" in os.environ:
    records.SANDGATE = Path(os.environ["SANDGATE"])


def status(pid, field):
    """A field of /proc/PID/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-bench-memory-"))
    runtime = "".join(f"{key} = {os.environ[env]}\n" for key, env in
                      (("max_instances", "MAX_INSTANCES"), ("memory_limit_mib", "MEMORY_LIMIT_MIB")) if env in os.environ)
    config = records.config(tmp, "memory", 'capture = "none"')
    if runtime:
        config.write_text(config.read_text() + f"[runtime]\n{runtime}")
    proc, port = records.serve(config, tmp / "sidecar.log")
    try:
        time.sleep(1)
        started = status(proc.pid, "VmRSS")
        headers = records.reader_headers()
        wrk(port, headers, 1)
        time.sleep(1)
        warm = status(proc.pid, "VmRSS")
        request = ("GET /auth HTTP/1.1\r\nHost: sidecar\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
        sockets = []
        for _ in range(CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(request)
            sockets.append(s)
        for s in sockets:
            assert s.recv(4096).startswith(b"HTTP/1.1 200"), "every connection's check must be allowed"
        time.sleep(1)
        connected = status(proc.pid, "VmRSS")
        virtual = status(proc.pid, "VmSize")
        for s in sockets:
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("| runtime | RSS started MiB | RSS after 20,000+ checks MiB | RSS with 1,000 open connections MiB | per 1,000 connections MiB | virtual (VmSize) GiB |")
    print("|---|---|---|---|---|---|")
    print(f"| {runtime.strip().replace(chr(10), ', ') or 'defaults'} | {started:.1f} | {warm:.1f} | {connected:.1f} | {connected - warm:.1f} | {virtual / 1024:,.1f} |")


if __name__ == "__main__":
    main()
