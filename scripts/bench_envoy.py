#!/usr/bin/env python3
"""Envoy + ext_authz + Sandgate against what a user could run instead, in one run.

Run: scripts/bench-load.sh envoy. The application is hyper answering a fixed 200
(`fixed_200` example). Envoy 1.40 (`--concurrency 1`) runs six ways in front of it: alone;
with its own in-process `jwt_authn` + RBAC filters enforcing the RBAC example's rules
(scripts/envoy-jwt-rbac.yaml: roles from the token's payload, JWT cache on); with gRPC
ext_authz to Sandgate; with HTTP ext_authz to Sandgate; and with gRPC and with HTTP ext_authz
to a second `fixed_200`, an authorization service that does no work at all: the floor any
ext_authz service reaches behind this Envoy. Sandgate runs the RBAC example on an RS256 token. Each
setup: wrk for DURATION (5) seconds after a 2 s warm-up, with 32 connections (saturation) and
with one (the latency one request sees on an idle system). ROUNDS (3) rounds, the setups in
turn within each; ratios are taken within a round, their median reported. Also the CPU time
Envoy and the authorization service each spend per request at saturation (from /proc)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import RELEASE, ROOT, free_port, start  # noqa: E402
from bench_records import cpu_seconds  # noqa: E402

DURATION = int(os.environ.get("DURATION", "5"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ENVOY = ROOT / ".venv-envoy" / "bin" / "envoy"
ISSUER, AUDIENCE = "https://issuer.bench", "bench"


def wrk(port, headers, seconds, connections=32):
    import re

    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/api/orders/7"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        sys.exit(f"non-2xx responses:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1_000_000}[m.group(2)]

    return rps, pct(50), pct(99)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-envoy-bench-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "alg": "RS256"})
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "roles": ["reader"], "exp": now + 3600}, key, algorithm="RS256", headers={"kid": "k1"})
    grpc_port = free_port()
    (tmp / "sandgate.toml").write_text(f"""
[server]
proxy = "envoy"
default_policy = "rbac"
[grpc]
listen = "127.0.0.1:{grpc_port}"
[[issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["RS256"]
[[issuers.keys]]
jwks_file = "{tmp / 'jwks.json'}"
[[policies]]
id = "rbac"
module = "{ROOT / 'target' / 'policies' / 'rbac.wasm'}"
data = "{ROOT / 'examples' / 'rbac-data.json'}"
""")
    app, app_port = start([str(RELEASE / "examples" / "fixed_200")])
    sandgate, sandgate_port = start([str(RELEASE / "sandgate"), "serve", "--config", str(tmp / "sandgate.toml")])
    null_authz, null_authz_port = start([str(RELEASE / "examples" / "fixed_200")])
    headers = {"Authorization": f"Bearer {token}"}
    # setup -> (Envoy configuration, the HTTP authorization service's port, that service's process)
    setups = {
        "Envoy alone": (ROOT / "tests" / "e2e" / "envoy-alone.yaml", sandgate_port, sandgate),
        "Envoy jwt_authn + RBAC, in-process": (ROOT / "scripts" / "envoy-jwt-rbac.yaml", sandgate_port, sandgate),
        "Envoy + gRPC ext_authz + Sandgate": (ROOT / "examples" / "envoy" / "envoy-grpc.yaml", sandgate_port, sandgate),
        "Envoy + HTTP ext_authz + Sandgate": (ROOT / "examples" / "envoy" / "envoy-http.yaml", sandgate_port, sandgate),
        "Envoy + gRPC ext_authz + no authorization":
            (ROOT / "examples" / "envoy" / "envoy-grpc.yaml", null_authz_port, null_authz),
        "Envoy + HTTP ext_authz + no authorization":
            (ROOT / "examples" / "envoy" / "envoy-http.yaml", null_authz_port, null_authz),
    }
    rounds = []  # one dict per round: setup -> (saturated (rps, p50, p99), one connection (rps, p50, p99))
    try:
        for _ in range(ROUNDS):
            results = {}
            for name, (template, authz_port, authz) in setups.items():
                port = free_port()
                text = template.read_text().replace("JWKS_PATH", str(tmp / "jwks.json"))
                grpc_authz_port = grpc_port if authz is sandgate else authz_port
                for placeholder, real in {8000: port, 8080: app_port, 8183: grpc_authz_port, 8181: authz_port}.items():
                    text = text.replace(f"port_value: {placeholder}", f"port_value: {real}")
                config = tmp / template.name
                config.write_text(text)
                envoy = subprocess.Popen([str(ENVOY), "-c", str(config), "--disable-hot-restart", "--log-level", "error", "--concurrency", "1"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    import socket
                    deadline = time.time() + 15
                    while time.time() < deadline:
                        with socket.socket() as s:
                            if s.connect_ex(("127.0.0.1", port)) == 0:
                                break
                        time.sleep(0.05)
                    wrk(port, headers, 2)
                    measured = []
                    for connections in (32, 1):
                        before = (cpu_seconds(authz.pid), cpu_seconds(envoy.pid))
                        rps, p50, p99 = wrk(port, headers, DURATION, connections=connections)
                        after = (cpu_seconds(authz.pid), cpu_seconds(envoy.pid))
                        per_request = [1e6 * (a - b) / (rps * DURATION) for a, b in zip(after, before)]
                        measured.append((rps, p50, p99, *per_request))
                    results[name] = tuple(measured)
                finally:
                    envoy.terminate()
                    envoy.wait(10)
                print(f"{name}: {results[name]}", file=sys.stderr)
            rounds.append(results)
    finally:
        for proc in (app, sandgate, null_authz):
            proc.terminate()
            proc.wait(10)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    base = "Envoy jwt_authn + RBAC, in-process"
    print(f"\nMedians of {ROUNDS} rounds; ratios and added latency taken within each round, against the in-process filters.")
    print("\n| setup | req/s (32 conn.) | p50 µs | p99 µs | req/s ratio to in-process (range) | CPU µs/request: Envoy, authorization service | 1 conn.: p50 µs | added p50 µs over in-process (range) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in setups:
        sat = [r[name][0] for r in rounds]
        one = [r[name][1] for r in rounds]
        ratios = sorted(r[name][0][0] / r[base][0][0] for r in rounds)
        added = sorted(r[name][1][1] - r[base][1][1] for r in rounds)
        print(f"| {name} | {median([x[0] for x in sat]):,.0f} | {median([x[1] for x in sat]):.0f} | {median([x[2] for x in sat]):.0f} | "
              f"**{median(ratios):.2f}** ({ratios[0]:.2f}–{ratios[-1]:.2f}) | {median([x[4] for x in sat]):.1f}, "
              f"{median([x[3] for x in sat]):.1f} | {median([x[1] for x in one]):.0f} | "
              f"**{median(added):+.0f}** ({added[0]:+.0f} to {added[-1]:+.0f}) |")
    grpc_http = sorted(r["Envoy + gRPC ext_authz + Sandgate"][0][0] / r["Envoy + HTTP ext_authz + Sandgate"][0][0] for r in rounds)
    print(f"\ngRPC / HTTP ext_authz at saturation: **{median(grpc_http):.2f}** ({grpc_http[0]:.2f}–{grpc_http[-1]:.2f})")
    floor = sorted(r["Envoy + gRPC ext_authz + no authorization"][0][0] / r["Envoy + HTTP ext_authz + no authorization"][0][0] for r in rounds)
    print(f"gRPC / HTTP ext_authz with no authorization service work: **{median(floor):.2f}** ({floor[0]:.2f}–{floor[-1]:.2f})")


if __name__ == "__main__":
    main()
