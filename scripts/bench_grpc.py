#!/usr/bin/env python3
"""This build of `sandgate` against another on the gRPC ext_authz listener, under load: the
RBAC example deciding one reader's `GET /api/orders` (HS256), sent as Envoy's `CheckRequest`
by h2load (4 connections, 16 streams each, one request a stream) for DURATION (3) seconds
after a 1 s warm-up, `capture = "none"`. Rounds alternate which build goes first; the median
of the per-round ratios (this / baseline) of requests per second and of the sidecar's CPU per
check is reported with its range. Before each run one check is sent with grpcio and must be
allowed (h2load sees HTTP statuses only, not gRPC ones), and no request may fail.

    ./scripts/build-policies.sh
    BASELINE_SANDGATE=/path/to/other/sandgate .venv/bin/python scripts/bench_grpc.py   # ROUNDS (6), DURATION (3 s)
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records as records  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "6"))
DURATION = int(os.environ.get("DURATION", "3"))


def check_request():
    """A reader's `GET /api/orders` as Envoy's `CheckRequest`."""
    from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
    headers = {k.lower(): v for k, v in records.reader_headers().items() if not k.startswith("X-")}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/api/orders", host="api.test", scheme="https",
                                                              protocol="HTTP/1.1", headers=headers)
    request = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)))
    return request


def check_message(path):
    """The check, framed as a gRPC message, written to `path`."""
    body = check_request().SerializeToString()
    path.write_bytes(b"\0" + len(body).to_bytes(4, "big") + body)


def allowed(port):
    """Whether one check through grpcio is answered OK (an allow)."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                   request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                                   response_deserializer=external_auth_pb2.CheckResponse.FromString)
        return call(check_request(), timeout=10).status.code == 0


def h2load(port, message, seconds):
    """Requests per second h2load reached; exits if any request failed."""
    out = subprocess.run(["h2load", "-c", "4", "-m", "16", "-D", str(seconds), "-d", str(message),
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          f"http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check"],
                         capture_output=True, text=True, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not done or int(done.group(3)) or int(done.group(4)):
        sys.exit(f"h2load saw failures:\n{out}")
    return float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))


def main():
    baseline = Path(os.environ.get("BASELINE_SANDGATE") or sys.exit("set BASELINE_SANDGATE to the other build"))
    builds = {"this build": records.SANDGATE, "baseline": baseline}
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-bench-grpc-"))
    message = tmp / "check.bin"
    check_message(message)
    runs = {}  # build -> [(req/s, CPU µs per check)]
    for n in range(ROUNDS):
        order = list(builds.items()) if n % 2 == 0 else list(reversed(builds.items()))
        for build, binary in order:
            grpc_port = records.free_port()
            config = records.config(tmp, "grpc", 'capture = "none"')
            config.write_text(config.read_text() + f'\n[grpc]\nlisten = "127.0.0.1:{grpc_port}"\n')
            records.SANDGATE = binary
            proc, _ = records.serve(config, tmp / "sidecar.log")
            try:
                if not allowed(grpc_port):
                    sys.exit(f"{build}: the check is not allowed")
                h2load(grpc_port, message, 1)
                before = records.cpu_seconds(proc.pid)
                rps = h2load(grpc_port, message, DURATION)
                cpu = records.cpu_seconds(proc.pid) - before
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            runs.setdefault(build, []).append((rps, 1e6 * cpu / (rps * DURATION)))
    this, base = runs["this build"], runs["baseline"]
    rps = sorted(t[0] / b[0] for t, b in zip(this, base))
    cpu = sorted(t[1] / b[1] for t, b in zip(this, base))
    print(f"| case | this build req/s | baseline req/s | req/s ratio (median of {ROUNDS}, range) | CPU µs/check this / baseline | CPU ratio (range) |")
    print("|---|---|---|---|---|---|")
    print(f"| gRPC Check, RBAC HS256 | {statistics.median(t[0] for t in this):,.0f} | {statistics.median(b[0] for b in base):,.0f} | "
          f"**{statistics.median(rps):.3f}** ({rps[0]:.2f}–{rps[-1]:.2f}) | "
          f"{statistics.median(t[1] for t in this):.1f} / {statistics.median(b[1] for b in base):.1f} | "
          f"**{statistics.median(cpu):.3f}** ({cpu[0]:.2f}–{cpu[-1]:.2f}) |")


if __name__ == "__main__":
    main()
