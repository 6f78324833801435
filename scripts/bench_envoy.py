#!/usr/bin/env python3
"""Latency Envoy + ext_authz + Sandgate adds over Envoy alone, in one run.

Run: scripts/bench-load.sh envoy. The application is hyper answering a fixed 200
(`fixed_200` example). Envoy 1.40 (`--concurrency 1`) runs three ways in front of it: alone,
with gRPC ext_authz to Sandgate, with HTTP ext_authz to Sandgate. Sandgate runs the RBAC
example on an RS256 token. wrk for DURATION seconds each after a 2 s warm-up, with one
connection (the latency one request sees on an idle system) and with 32 (under saturation)."""

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

DURATION = int(os.environ.get("DURATION", "8"))
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
    headers = {"Authorization": f"Bearer {token}"}
    results = {}
    try:
        for name, template in (("Envoy alone", ROOT / "tests" / "e2e" / "envoy-alone.yaml"),
                               ("Envoy + gRPC ext_authz + Sandgate", ROOT / "examples" / "envoy" / "envoy-grpc.yaml"),
                               ("Envoy + HTTP ext_authz + Sandgate", ROOT / "examples" / "envoy" / "envoy-http.yaml")):
            port = free_port()
            text = template.read_text()
            for placeholder, real in {8000: port, 8080: app_port, 8183: grpc_port, 8181: sandgate_port}.items():
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
                results[name] = wrk(port, headers, DURATION)
                results[name + ", 1 connection"] = wrk(port, headers, DURATION, connections=1)
            finally:
                envoy.terminate()
                envoy.wait(10)
            print(f"{name}: {results[name]}", file=sys.stderr)
    finally:
        for proc in (app, sandgate):
            proc.terminate()
            proc.wait(10)
    print("\n| setup | connections | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs |\n|---|---|---|---|---|---|---|")
    for single in (True, False):
        alone = results["Envoy alone" + (", 1 connection" if single else "")]
        for name, (rps, p50, p99) in results.items():
            if name.endswith(", 1 connection") == single:
                print(f"| {name.replace(', 1 connection', '')} | {1 if single else 32} | {rps:,.0f} | {p50:.0f} | {p99:.0f} | {p50 - alone[1]:+.0f} | {p99 - alone[2]:+.0f} |")


if __name__ == "__main__":
    main()
