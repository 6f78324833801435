#!/usr/bin/env python3
"""The replay proof: N checks with distinct tokens against one sidecar (`capture = "input"`,
records to a file) while, concurrently, its keys rotate, tokens and subjects are revoked and
unrevoked, its RBAC data document and a module reload; then `sandgate replay` decides every
record again and must find 0 differences.

    ./scripts/build-policies.sh
    .venv/bin/python scripts/replay_proof.py 1000000

Everything runs on 127.0.0.1 and stops by itself. Prints one JSON line of figures.
"""

import base64
import http.client
import json
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
SANDGATE = Path(os.environ.get("SANDGATE_BINARY", ROOT / "target" / "release" / "sandgate"))
POLICIES = ROOT / "target" / "policies"
ISSUER, AUDIENCE, TOKEN = "https://issuer.test", "orders-api", "an-admin-token-of-at-least-32-characters"
SECRETS = {"hs-a": "the-first-secret-of-at-least-32-bytes!", "hs-b": "the-second-secret-of-at-least-32-bytes"}
RBAC = {"roles": {"reader": [{"methods": ["GET", "HEAD"], "paths": ["/api/**"]}], "writer": [{"methods": ["GET", "POST"], "paths": ["/api/**"]}]}}
NARROW = {"roles": {"reader": [{"methods": ["HEAD"], "paths": ["/api/**"]}], "writer": RBAC["roles"]["writer"]}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def oct_jwk(kid):
    return {"kty": "oct", "kid": kid, "alg": "HS256", "k": base64.urlsafe_b64encode(SECRETS[kid].encode()).decode().rstrip("=")}


def admin(port, method, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.status


def traffic(port, part, parts, count, answered):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    now = int(time.time())
    n = 0
    for i in range(part, count, parts):
        kid = "hs-a" if i % 2 else "hs-b"
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{i % 50}", "jti": f"jti-{i}", "iat": now, "exp": now + 3600,
                  "roles": [["reader"], ["writer"], []][i % 3]}
        token = jwt.encode(claims, SECRETS[kid], algorithm="HS256", headers={"kid": kid})
        uri = "/live/x" if i % 10 == 0 else f"/api/orders/{i}"
        conn.request("GET", "/auth", headers={"X-Original-URI": uri, "X-Original-Method": "POST" if i % 5 == 0 else "GET",
                                              "X-Forwarded-Host": "api.test", "X-Forwarded-Proto": "https", "Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        r.read()
        n += 1
    with answered.get_lock():
        answered.value += n


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    work = Path(tempfile.mkdtemp(prefix="sandgate-replay-proof-"))
    records, archive, data = work / "records.log", work / "archive", work / "rbac.json"
    data.write_text(json.dumps(RBAC))
    admin_port = free_port()
    (work / "sandgate.toml").write_text(f"""
[server]
proxy = "nginx"
default_policy = "rbac"
[admin]
listen = "127.0.0.1:{admin_port}"
token = "{TOKEN}"
[[issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["HS256"]
[[issuers.keys]]
kid = "hs-a"
algorithm = "HS256"
secret = "{SECRETS['hs-a']}"
[[policies]]
id = "rbac"
module = "{POLICIES / 'rbac.wasm'}"
data = "{data}"
[[policies]]
id = "live"
module = "{POLICIES / 'versioned-v1.wasm'}"
[[routes]]
path_prefix = "/live"
policy = "live"
[decision_log]
capture = "input"
sink = "file"
path = "{records}"
max_file_mib = 100000
archive_dir = "{archive}"
""")
    proc = subprocess.Popen([str(SANDGATE), "serve", "--config", str(work / "sandgate.toml"), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stderr:
        m = re.search(r"listening on http://[0-9.]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    stop = threading.Event()
    changes = {"key_rotations": 0, "revocation_changes": 0, "data_reloads": 0, "module_reloads": 0}

    def churn():
        v1, v2 = (POLICIES / "versioned-v1.wasm").read_bytes(), (POLICIES / "versioned-v2.wasm").read_bytes()
        n = 0
        while not stop.is_set():
            n += 1
            admin(admin_port, "PUT", "/v1/keys", {"issuer": ISSUER, "jwks": {"keys": [oct_jwk(k) for k in [["hs-a"], ["hs-b"], ["hs-a", "hs-b"]][n % 3]]}})
            changes["key_rotations"] += 1
            admin(admin_port, "POST" if n % 4 else "DELETE", "/v1/revocations",
                  {"jtis": [f"jti-{random.randrange(count)}" for _ in range(20)], "subjects": [f"user-{n % 50}"]})
            changes["revocation_changes"] += 1
            admin(admin_port, "PUT", "/v1/policies/rbac/data", NARROW if n % 2 else RBAC)
            changes["data_reloads"] += 1
            if n % 3 == 0:
                request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/policies/live", data=v2 if n % 2 else v1, method="PUT",
                                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/wasm"})
                urllib.request.urlopen(request, timeout=30).read()
                changes["module_reloads"] += 1
            time.sleep(0.02)

    # Spawned, not forked: a fork copies whatever lock another thread holds at that moment.
    context = multiprocessing.get_context("spawn")
    answered = context.Value("q", 0)
    parts = 3
    workers = [context.Process(target=traffic, args=(port, p, parts, count, answered)) for p in range(parts)]
    churner = threading.Thread(target=churn)
    churner.start()
    started = time.time()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    storm_secs = time.time() - started
    stop.set()
    churner.join()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    dropped = int(float(re.search(r"^sandgate_decision_log_dropped_total (\S+)", metrics, re.M).group(1)))
    proc.terminate()
    proc.wait(timeout=60)
    lines = sum(1 for _ in open(records))
    started = time.time()
    out = subprocess.run([str(SANDGATE), "replay", str(records), "--archive", str(archive), "--json"], capture_output=True, text=True)
    replay_secs = time.time() - started
    report = json.loads(out.stdout)
    print(json.dumps({
        "checks": answered.value, "records": lines, "dropped": dropped, "storm_secs": round(storm_secs, 1),
        "replay_secs": round(replay_secs, 1), "replayed": report["replayed"], "same": report["same"],
        "differ": report["differ"], "skipped": report["skipped"], **changes, "exit": out.returncode,
    }))
    subprocess.run(["rm", "-rf", str(work)])
    # The proof holds only if every check left its record and every record was decided again: a
    # record left out for any reason (the host's load, a missing module) proves nothing.
    if out.returncode == 0 and not (dropped == 0 and lines == answered.value == count == report["replayed"]):
        sys.exit(f"not every check was recorded and replayed: {count} sent, {answered.value} answered, {lines} records, "
                 f"{dropped} dropped, {report['replayed']} replayed")
    sys.exit(out.returncode)


if __name__ == "__main__":
    main()
