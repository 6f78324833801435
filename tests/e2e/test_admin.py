"""Hot-loading through the admin API and the policy directory, under load: nothing lost, every
answer from exactly one version, read-your-writes, and bad uploads refused with the old
version still serving."""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import ISSUER, POLICIES, ROOT, SANDGATE, free_port

TOKEN = "admin-test-token-0123456789-abcdefghij"


def admin(sandgate, method, path, body=b"", token=TOKEN, content_type="application/octet-stream"):
    if isinstance(body, (dict, list)):
        body, content_type = json.dumps(body).encode(), "application/json"
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(sandgate.admin + path, data=body if method in ("PUT", "POST", "DELETE") else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def sandgate(start_sandgate, static_issuer, rbac_policy):
    port = free_port()
    s = start_sandgate(
        issuers=[static_issuer],
        policies=[rbac_policy, {"id": "live", "module": str(POLICIES / "versioned-v1.wasm")}],
        routes=[{"path_prefix": "/live", "policy": "live"}],
        server={"default_policy": "rbac"},
        admin={"listen": f"127.0.0.1:{port}", "token": TOKEN},
    )
    s.admin = f"http://127.0.0.1:{port}"
    return s


def version_of(sandgate):
    status, headers, _ = sandgate.check({"X-Original-URI": "/live/x"})
    return status, headers.get("x-policy-version")


def test_100_reloads_under_64_clients_lose_nothing_and_never_go_back(sandgate):
    v1, v2 = (POLICIES / "versioned-v1.wasm").read_bytes(), (POLICIES / "versioned-v2.wasm").read_bytes()
    stop = threading.Event()
    observations = []  # (started, status, version)
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            started = time.monotonic()
            status, version = version_of(sandgate)
            with lock:
                observations.append((started, status, version))

    reloads = []  # (call started, call returned, version now live)
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        clients = [pool.submit(client) for _ in range(64)]
        time.sleep(0.3)
        for i in range(100):
            version = "2" if i % 2 == 0 else "1"
            began = time.monotonic()
            status, body = admin(sandgate, "PUT", "/v1/policies/live", v2 if version == "2" else v1)
            assert status == 200, body
            reloads.append((began, time.monotonic(), version))
        time.sleep(0.2)
        stop.set()
        for c in clients:
            c.result()

    assert len(observations) > 1000
    bad = [o for o in observations if o[1] != 200 or o[2] not in ("1", "2")]
    assert bad == [], f"failed or unversioned answers: {bad[:5]}"
    # Once reload i has returned, a check that starts before reload i+1 begins sees its version.
    for i, (_, returned, version) in enumerate(reloads):
        next_began = reloads[i + 1][0] if i + 1 < len(reloads) else float("inf")
        stale = [o for o in observations if returned <= o[0] < next_began and o[2] != version]
        assert stale == [], f"after reload {i} returned, a later check saw version {stale[0][2]}"


def test_revocation_is_read_your_writes_1000_times_under_load(sandgate, keys):
    stop = threading.Event()
    background_token = keys.token(roles=["reader"], jti="background")

    def load():
        while not stop.is_set():
            assert sandgate.check({"Authorization": f"Bearer {background_token}", "X-Original-URI": "/api/x"})[0] == 200

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        workers = [pool.submit(load) for _ in range(8)]
        for i in range(1000):
            token = keys.token(roles=["reader"], jti=f"jti-{i}")
            status, body = admin(sandgate, "POST", "/v1/revocations", {"jtis": [f"jti-{i}"]})
            assert status == 200, body
            status, headers, _ = sandgate.check({"Authorization": f"Bearer {token}", "X-Original-URI": "/api/x"})
            assert (status, headers.get("x-sandgate-reason")) == (401, "token_revoked"), f"repetition {i}"
        stop.set()
        for w in workers:
            w.result()
    # and un-revoking works too
    assert admin(sandgate, "DELETE", "/v1/revocations", {"jtis": ["jti-0"]})[0] == 200
    assert sandgate.check({"Authorization": f"Bearer {keys.token(roles=['reader'], jti='jti-0')}", "X-Original-URI": "/api/x"})[0] == 200


def bad_uploads():
    rbac = (POLICIES / "rbac.wasm").read_bytes()
    return {
        "not wasm": (b"#!/bin/sh\necho pwned\n", "not a WebAssembly file"),
        "a core module": (b"\0asm\x01\0\0\0", "core WebAssembly module, not a component"),
        "wrong exports": (b"\0asm\x0d\0\x01\0", "does not export `sandgate:policy/policy@0.2.0`"),
        "an HTTP import": ((POLICIES / "bad-import.wasm").read_bytes(), "`wasi:http/outgoing-handler@0.2.0`"),
        "loops on the probe": ((POLICIES / "hostile.wasm").read_bytes(), "failed its probe check: the policy ran past its time limit"),
        "truncated": (rbac[: len(rbac) // 2], "invalid"),
    }


@pytest.mark.parametrize("case", list(bad_uploads()))
def test_bad_uploads_are_refused_and_the_old_policy_keeps_answering(sandgate, case):
    body, message = bad_uploads()[case]
    before = admin(sandgate, "GET", "/v1/snapshot")[1]
    status, answer = admin(sandgate, "PUT", "/v1/policies/live", body)
    assert 400 <= status < 500, (status, answer)
    assert message in answer["error"], answer
    assert version_of(sandgate) == (200, "1")
    after = admin(sandgate, "GET", "/v1/snapshot")[1]
    assert after["snapshot"] == before["snapshot"], "a rejected upload published nothing"


def test_bad_data_is_refused_and_data_changes_are_versioned(sandgate, keys):
    status, answer = admin(sandgate, "PUT", "/v1/policies/rbac/data", b"{not json", content_type="application/json")
    assert status == 400 and "not JSON" in answer["error"]
    token = keys.token(roles=["auditor"])
    auth = {"Authorization": f"Bearer {token}", "X-Original-URI": "/api/x"}
    assert sandgate.check(auth)[0] == 403
    status, snap = admin(sandgate, "PUT", "/v1/policies/rbac/data", {"roles": {"auditor": [{"methods": ["GET"], "paths": ["/api/**"]}]}})
    assert status == 200
    assert sandgate.check(auth)[0] == 200
    rbac = next(p for p in snap["policies"] if p["id"] == "rbac")
    assert rbac["data_version"] == 2
    line = sandgate.decision_log()[-1]
    assert (line["snapshot"], line["data"]) == (snap["snapshot"], 2)


def test_snapshot_lists_policies_with_digests(sandgate):
    status, snap = admin(sandgate, "GET", "/v1/snapshot")
    assert status == 200
    import hashlib

    ids = {p["id"]: p for p in snap["policies"]}
    assert ids["live"]["digest"] == hashlib.sha256((POLICIES / "versioned-v1.wasm").read_bytes()).hexdigest()
    assert ids["rbac"]["loaded_at"] > 0
    assert ids["live"]["contract"] == "0.2.0", "which contract each policy was built against"
    assert {"snapshot", "key_set", "revocations"} <= snap.keys()


def test_remove_and_routed_policies(sandgate):
    assert admin(sandgate, "DELETE", "/v1/policies/live")[0] == 409  # a route uses it
    assert admin(sandgate, "PUT", "/v1/policies/extra", (POLICIES / "allow-all.wasm").read_bytes())[0] == 200
    assert admin(sandgate, "DELETE", "/v1/policies/extra")[0] == 200
    assert admin(sandgate, "DELETE", "/v1/policies/extra")[0] == 404


def test_key_rotation_through_the_admin_api(sandgate, keys):
    from conftest import ISSUER, Keys

    new = Keys()
    token = new.token("RS256", kid="rotated", roles=["reader"])
    auth = {"Authorization": f"Bearer {token}", "X-Original-URI": "/api/x"}
    assert sandgate.check(auth)[1]["x-sandgate-reason"] == "unknown_kid"
    status, snap = admin(sandgate, "PUT", "/v1/keys", {"issuer": ISSUER, "jwks": {"keys": [new.jwk(new.rsa, "rotated", "RS256")]}})
    assert status == 200, snap
    assert sandgate.check(auth)[0] == 200
    old = keys.token("RS256", roles=["reader"])
    assert sandgate.check({"Authorization": f"Bearer {old}", "X-Original-URI": "/api/x"})[0] == 401, "rotated-out key no longer accepted"


def test_shadow_candidate_never_changes_answers_and_disagreements_are_counted(sandgate):
    status, _ = admin(sandgate, "PUT", "/v1/policies/live/shadow", (POLICIES / "versioned-v2.wasm").read_bytes())
    assert status == 200
    for _ in range(20):
        assert version_of(sandgate) == (200, "1")
    time.sleep(0.3)
    with urllib.request.urlopen(sandgate.base + "/metrics") as r:
        metrics = r.read().decode()
    assert 'sandgate_shadow_evaluations_total{policy="live",result="disagree"} 20' in metrics
    disagreements = [l for l in sandgate.decision_log() if l.get("shadow_disagreement")]
    assert len(disagreements) == 20 and "x-policy-version" in disagreements[0]["candidate"]
    # Every line, the disagreements among them, is what the published schema describes.
    import jsonschema
    schema = json.loads((ROOT / "docs" / "decision-record.schema.json").read_text())
    for line in sandgate.decision_log():
        jsonschema.validate(line, schema)
    assert admin(sandgate, "DELETE", "/v1/policies/live/shadow")[0] == 200


def test_admin_without_the_token_is_401(sandgate):
    assert admin(sandgate, "GET", "/v1/snapshot", token=None)[0] == 401
    assert admin(sandgate, "GET", "/v1/snapshot", token="wrong")[0] == 401
    assert admin(sandgate, "PUT", "/v1/policies/live", (POLICIES / "versioned-v2.wasm").read_bytes(), token="wrong")[0] == 401
    assert version_of(sandgate) == (200, "1")


def test_non_loopback_admin_without_a_token_refuses_to_start(tmp_path, static_issuer, rbac_policy):
    from conftest import write_config

    write_config(tmp_path / "c.toml", issuers=[static_issuer], policies=[rbac_policy], server={"proxy": "nginx", "default_policy": "rbac"}, admin={"listen": "0.0.0.0:0"})
    out = subprocess.run([str(SANDGATE), "serve", "--config", str(tmp_path / "c.toml"), "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "refusing to start" in out.stderr and "non-loopback" in out.stderr


def wait_for(predicate, what, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_policy_directory_is_watched(start_sandgate, static_issuer, tmp_path):
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    shutil.copy(POLICIES / "versioned-v1.wasm", policy_dir / "live.wasm")
    sandgate = start_sandgate(
        issuers=[static_issuer], policies=[], routes=[{"path_prefix": "/live", "policy": "live"}],
        server={"policy_dir": str(policy_dir), "policy_dir_poll_ms": 50},
    )
    wait_for(lambda: version_of(sandgate) == (200, "1"), "v1 to load from the directory")
    # Replace it: atomically (rename) as deployment tools do.
    shutil.copy(POLICIES / "versioned-v2.wasm", policy_dir / "live.wasm.tmp")
    os.replace(policy_dir / "live.wasm.tmp", policy_dir / "live.wasm")
    wait_for(lambda: version_of(sandgate) == (200, "2"), "v2 to replace v1")
    # A broken module is refused; v2 keeps answering.
    (policy_dir / "live.wasm").write_bytes(b"garbage")
    time.sleep(0.5)
    assert version_of(sandgate) == (200, "2")
    # Removing the module unloads the policy: its route is closed, not opened.
    (policy_dir / "live.wasm").unlink()
    wait_for(lambda: version_of(sandgate)[0] == 403, "the policy to unload")
    assert sandgate.check({"X-Original-URI": "/live/x"})[1]["x-sandgate-reason"] == "no_route"


def test_an_operator_can_block_a_key_id_at_once(sandgate, keys):
    token = keys.token("RS256", roles=["reader"])
    auth = {"Authorization": f"Bearer {token}", "X-Original-URI": "/api/x"}
    assert sandgate.check(auth)[0] == 200
    status, snap = admin(sandgate, "POST", "/v1/keys/blocked", {"issuer": ISSUER, "kid": "rsa-1"})
    assert status == 200 and "rsa-1" in next(i for i in snap["issuers"] if i["issuer"] == ISSUER)["blocked_kids"]
    status, headers, _ = sandgate.check(auth)
    assert (status, headers["x-sandgate-reason"]) == (401, "kid_blocked")
    assert admin(sandgate, "DELETE", "/v1/keys/blocked", {"issuer": ISSUER, "kid": "rsa-1"})[0] == 200
    assert sandgate.check(auth)[0] == 200
    assert admin(sandgate, "POST", "/v1/keys/blocked", {"issuer": "https://nobody.test", "kid": "x"})[0] == 404


def test_a_short_admin_token_refuses_to_start(tmp_path, static_issuer, rbac_policy):
    from conftest import write_config

    write_config(tmp_path / "c.toml", issuers=[static_issuer], policies=[rbac_policy], server={"proxy": "nginx", "default_policy": "rbac"},
                 admin={"listen": "127.0.0.1:0", "token": "short-token"})
    out = subprocess.run([str(SANDGATE), "serve", "--config", str(tmp_path / "c.toml"), "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "at least 32" in out.stderr, out.stderr


def test_a_generated_admin_token_goes_to_a_private_file_never_to_the_log(start_sandgate, static_issuer, rbac_policy):
    import re
    import stat

    port = free_port()
    sandgate = start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"default_policy": "rbac"}, admin={"listen": f"127.0.0.1:{port}"})
    line = next(l for l in sandgate.stderr_lines if "admin token" in l)
    path = re.search(r"written to (\S+)", line).group(1)
    token = open(path).read().strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(token) >= 32 and token not in "".join(sandgate.stderr_lines)
    sandgate.admin = f"http://127.0.0.1:{port}"
    assert admin(sandgate, "GET", "/v1/snapshot", token=token)[0] == 200


def test_the_admin_unix_socket_is_private(start_sandgate, static_issuer, rbac_policy, tmp_path):
    import stat

    socket_path = tmp_path / "admin.sock"
    start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"default_policy": "rbac"}, admin={"unix_socket": str(socket_path)})
    assert stat.S_IMODE(os.stat(socket_path).st_mode) & 0o077 == 0
