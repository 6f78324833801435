#!/usr/bin/env python3
"""Load benchmark of the sidecar, all in one run: hyper answering a fixed 200, Sandgate with an
allow-all policy, the RBAC example with HS256/RS256/ES256/EdDSA tokens, and the native-Rust
baseline (same server, same verification, RBAC logic compiled into the host).

Run: scripts/bench-load.sh  (builds everything, then runs this with the test venv's Python).
With BASELINE_SANDGATE=PATH: only this build against that build, allow-all and RBAC ES256
(BASELINE_POLICIES=DIR: the baseline build's policies, e.g. built against an older contract).
Also: the verified-token cache (on by default) against no cache, with one repeated token and
with a stream of all-distinct tokens. Prints a Markdown table for docs/BENCHMARKS.md. Each
case: wrk -t2 -c64 for DURATION (5) seconds after a 2 s warm-up, every server on 127.0.0.1 with
its decision log sent to /dev/null. Each comparison is measured ROUNDS (3) times, baseline then
case back to back, and the median ratio reported."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "target" / "release"
DURATION = int(os.environ.get("DURATION", "5"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ISSUER, AUDIENCE, SECRET = "https://issuer.bench", "bench", "a-benchmark-hs256-secret-of-32-bytes!"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd):
    port = free_port()
    proc = subprocess.Popen(cmd + [f"127.0.0.1:{port}"] if "serve" not in cmd else cmd + ["--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"})
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"{cmd} did not start")


def wrk(port, headers, seconds, script=None, connections=64):
    threads = min(2, connections)
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"] + (["-s", script] if script else [])
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/auth"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        sys.exit(f"non-2xx responses in a benchmark that must allow:\n{out}")

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]

    return rps, pct(50), pct(99)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-bench-"))
    keys = {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048), "ES256": ec.generate_private_key(ec.SECP256R1()), "EdDSA": ed25519.Ed25519PrivateKey.generate()}
    algos = {"RS256": jwt.algorithms.RSAAlgorithm, "ES256": jwt.algorithms.ECAlgorithm, "EdDSA": jwt.algorithms.OKPAlgorithm}
    jwks = []
    for alg, key in keys.items():
        jwk = json.loads(algos[alg].to_jwk(key.public_key()))
        jwk.update({"kid": alg, "alg": alg, "use": "sig"})
        jwks.append(jwk)
    (tmp / "jwks.json").write_text(json.dumps({"keys": jwks}))
    (tmp / "rbac-data.json").write_text((ROOT / "examples" / "rbac-data.json").read_text())
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "roles": ["reader"], "iat": now, "exp": now + 3600}
    tokens = {alg: jwt.encode(claims, key, algorithm=alg, headers={"kid": alg}) for alg, key in keys.items()}
    tokens["HS256"] = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "HS256"})

    def config(policy, cache=True, policies=ROOT / "target" / "policies"):
        path = tmp / f"{policy}{'' if cache else '-nocache'}-{abs(hash(str(policies)))}.toml"
        data = f'data = "{tmp / "rbac-data.json"}"' if policy == "rbac" else ""
        path.write_text(f"""
[server]
proxy = "nginx"
default_policy = "{policy}"
token_cache_size = {10000 if cache else 0}
[runtime]
max_instances = 128
[[issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["HS256", "RS256", "ES256", "EdDSA"]
[[issuers.keys]]
jwks_file = "{tmp / "jwks.json"}"
[[issuers.keys]]
kid = "HS256"
algorithm = "HS256"
secret = "{SECRET}"
[[policies]]
id = "{policy}"
module = "{policies / (policy + ".wasm")}"
{data}
""")
        return str(path)

    # What nginx sets on its auth request (examples/nginx/nginx.conf).
    request = {"X-Original-Method": "GET", "X-Original-URI": "/api/orders/7", "X-Forwarded-Host": "app.bench", "X-Forwarded-Proto": "http"}
    sandgate = lambda policy, cache=True: [str(RELEASE / "sandgate"), "serve", "--config", config(policy, cache)]
    cases = {"hyper fixed 200": ([str(RELEASE / "examples" / "fixed_200")], {}),
             "sandgate allow-all, no token": (sandgate("allow-all"), request)}
    for alg in ["HS256", "RS256", "ES256", "EdDSA"]:
        auth = {**request, "Authorization": f"Bearer {tokens[alg]}"}
        cases[f"sandgate RBAC {alg}"] = (sandgate("rbac"), auth)
        cases[f"native-Rust RBAC {alg}"] = ([str(RELEASE / "examples" / "native_baseline_server"), config("rbac")], auth)
    # The verified-token cache: the allow-all policy with a repeated ES256 token (the token path
    # alone: header, cache, revocation, the credential handed to the policy), ES256 without the
    # cache, and a stream of all-distinct ES256 tokens (more tokens than requests) with and
    # without it.
    es256 = {**request, "Authorization": f"Bearer {tokens['ES256']}"}
    cases["sandgate allow-all, ES256 token"] = (sandgate("allow-all"), es256)
    cases["sandgate RBAC ES256, no token cache"] = (sandgate("rbac", cache=False), es256)
    distinct = distinct_tokens(tmp, keys["ES256"], claims, 160_000)
    cases["RBAC ES256 all-distinct tokens, cache on"] = (sandgate("rbac"), distinct)
    cases["RBAC ES256 all-distinct tokens, cache off"] = (sandgate("rbac", cache=False), distinct)

    # (case, baseline): each round measures the baseline and then the case, back to back, so the
    # slow drifts of this shared machine cancel out of their ratio; the table reports medians.
    comparisons = [("sandgate allow-all, no token", "hyper fixed 200")]
    comparisons += [(f"sandgate RBAC {alg}", f"native-Rust RBAC {alg}") for alg in ["HS256", "RS256", "ES256", "EdDSA"]]
    comparisons += [("sandgate allow-all, ES256 token", "sandgate allow-all, no token"),
                    ("sandgate RBAC ES256", "sandgate allow-all, no token"),
                    ("sandgate RBAC ES256, no token cache", "sandgate RBAC ES256"),
                    ("RBAC ES256 all-distinct tokens, cache on", "RBAC ES256 all-distinct tokens, cache off")]

    # `BASELINE_SANDGATE=PATH`: this build against another build of `sandgate` (e.g. the commit
    # before a refactoring), same configs, same requests.
    other = os.environ.get("BASELINE_SANDGATE")
    if other:
        other_policies = Path(os.environ.get("BASELINE_POLICIES") or ROOT / "target" / "policies")
        other_build = lambda policy: [other, "serve", "--config", config(policy, policies=other_policies)]
        cases["baseline build allow-all, no token"] = (other_build("allow-all"), request)
        cases["baseline build RBAC ES256"] = (other_build("rbac"), es256)
        comparisons = [("sandgate allow-all, no token", "baseline build allow-all, no token"),
                       ("sandgate RBAC ES256", "baseline build RBAC ES256")]

    # `ONLY=<text>`: just the comparisons whose case name contains it.
    comparisons = [c for c in comparisons if os.environ.get("ONLY", "") in c[0]]

    def measure(name):
        cmd, headers = cases[name]
        proc, port = start(cmd)
        try:
            if isinstance(headers, Path):  # a wrk script; one pass, no warm-up (tokens must not repeat)
                result = wrk(port, {}, min(DURATION, 6), script=str(headers))
            else:
                wrk(port, headers, 2)
                result = wrk(port, headers, DURATION)
        finally:
            proc.terminate()
            proc.wait(10)
        print(f"{name}: {result[0]:.0f} req/s, p50 {result[1]:.0f} µs, p99 {result[2]:.0f} µs", file=sys.stderr)
        return result

    runs = {pair: [] for pair in comparisons}
    for _ in range(ROUNDS):
        for case, baseline in comparisons:
            base = measure(baseline)
            runs[(case, baseline)].append((measure(case), base))

    print(f"\nMedians of {ROUNDS} rounds; each round measured the baseline right before the case.")
    print("\n| case | req/s | p50 µs | p99 µs | baseline | baseline req/s | ratio (range) |\n|---|---|---|---|---|---|---|")
    median = lambda xs: sorted(xs)[len(xs) // 2]
    for (case, baseline), pairs in runs.items():
        ratios = [c[0] / b[0] for c, b in pairs]
        rps, p50, p99 = (median([c[k] for c, _ in pairs]) for k in range(3))
        base = median([b[0] for _, b in pairs])
        print(f"| {case} | {rps:,.0f} | {p50:.0f} | {p99:.0f} | {baseline} | {base:,.0f} | **{median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) |")


def distinct_tokens(tmp, key, claims, n):
    """A wrk script sending `n` distinct ES256 tokens, each thread its own half."""
    path = tmp / "tokens.txt"
    with open(path, "w") as f:
        for i in range(n):
            f.write(jwt.encode({**claims, "jti": f"t-{i}"}, key, algorithm="ES256", headers={"kid": "ES256"}) + "\n")
    script = tmp / "distinct.lua"
    script.write_text(f"""
local tokens = {{}}
for line in io.lines("{path}") do tokens[#tokens + 1] = line end
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
local i = 0
function request()
  i = i + 1
  local t = tokens[(id * {n // 2} + i) % #tokens + 1]
  return wrk.format(nil, nil, {{["Authorization"] = "Bearer " .. t, ["X-Original-Method"] = "GET", ["X-Original-URI"] = "/api/orders/7",
                                ["X-Forwarded-Host"] = "app.bench", ["X-Forwarded-Proto"] = "http"}})
end
""")
    return script


if __name__ == "__main__":
    main()
