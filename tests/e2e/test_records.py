"""Decision records: captured inputs that replay exactly (`sandgate replay`), while keys rotate,
tokens are revoked and policies and data reload under load; the impact diff of a candidate
module; the record schema; `capture = "none"`; and the NATS JetStream sink losing nothing while
NATS is down."""

import base64
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import jwt
import lz4.frame
import pytest

from conftest import AUDIENCE, ISSUER, POLICIES, RBAC_DATA, ROOT, SANDGATE, Sandgate, free_port, write_config
from test_admin import TOKEN, admin

SECRETS = {"hs-a": "the-first-secret-of-at-least-32-bytes!", "hs-b": "the-second-secret-of-at-least-32-bytes"}


def oct_jwk(kid):
    return {"kty": "oct", "kid": kid, "alg": "HS256", "k": base64.urlsafe_b64encode(SECRETS[kid].encode()).decode().rstrip("=")}


def mint(i, kid):
    now = int(time.time())
    roles = [["reader"], ["writer"], []][i % 3]
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{i % 50}", "jti": f"jti-{i}", "iat": now, "exp": now + 600, "roles": roles}
    return jwt.encode(claims, SECRETS[kid], algorithm="HS256", headers={"kid": kid})


def start(tmp_path, capture="input", extra=""):
    config = tmp_path / f"sandgate-{capture}.toml"
    records = tmp_path / f"records-{capture}.log"
    data = tmp_path / "rbac-data.json"
    data.write_text(json.dumps(RBAC_DATA))
    admin_port = free_port()
    write_config(
        config,
        issuers=[{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"], "keys": [{"kid": "hs-a", "algorithm": "HS256", "secret": SECRETS["hs-a"]}]}],
        policies=[{"id": "rbac", "module": str(POLICIES / "rbac.wasm"), "data": str(data)}, {"id": "live", "module": str(POLICIES / "versioned-v1.wasm")}],
        routes=[{"path_prefix": "/live", "policy": "live"}],
        server={"proxy": "nginx", "default_policy": "rbac"},
        admin={"listen": f"127.0.0.1:{admin_port}", "token": TOKEN},
        extra_toml=(
            f'[decision_log]\ncapture = "{capture}"\nsink = "file"\npath = "{records}"\n'
            f'archive_dir = "{tmp_path / "archive"}"\nredact_headers = ["x-api-key"]\n' + extra
        ),
    )
    s = Sandgate(config, tmp_path / f"stdout-{capture}.log", proxy="nginx")
    s.admin = f"http://127.0.0.1:{admin_port}"
    return s, records


def replay(records, *args):
    return subprocess.run([str(SANDGATE), "replay", str(records), *args], capture_output=True, text=True, timeout=600)


class Client:
    """One keep-alive connection to the sidecar's forward-auth port."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def check(self, uri, token=None, method="GET"):
        headers = {"X-Original-URI": uri, "X-Original-Method": method, "X-Forwarded-Host": "api.test", "X-Forwarded-Proto": "https", "X-Api-Key": "k-secret"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.conn.request("GET", "/auth", headers=headers)
        r = self.conn.getresponse()
        r.read()
        return r.status, r.getheader("x-sandgate-request-id")


def test_a_storm_of_checks_under_rotation_revocation_and_reloads_replays_exactly(tmp_path):
    s, records = start(tmp_path)
    count = int(os.environ.get("SANDGATE_REPLAY_CHECKS", "12000"))
    tokens = [mint(i, "hs-a" if i % 2 else "hs-b") for i in range(count)]
    stop = threading.Event()
    changes = {"keys": 0, "revocations": 0, "data": 0, "modules": 0}

    def churn():
        v1, v2 = (POLICIES / "versioned-v1.wasm").read_bytes(), (POLICIES / "versioned-v2.wasm").read_bytes()
        narrow = {"roles": {"reader": [{"methods": ["HEAD"], "paths": ["/api/**"]}], "writer": RBAC_DATA["roles"]["writer"]}}
        n = 0
        while not stop.is_set():
            n += 1
            kids = [["hs-a"], ["hs-b"], ["hs-a", "hs-b"]][n % 3]
            assert admin(s, "PUT", "/v1/keys", {"issuer": ISSUER, "jwks": {"keys": [oct_jwk(k) for k in kids]}})[0] == 200
            changes["keys"] += 1
            revoked = [f"jti-{random.randrange(count)}" for _ in range(20)]
            assert admin(s, "POST" if n % 4 else "DELETE", "/v1/revocations", {"jtis": revoked, "subjects": [f"user-{n % 50}"]})[0] == 200
            changes["revocations"] += 1
            assert admin(s, "PUT", "/v1/policies/rbac/data", narrow if n % 2 else RBAC_DATA)[0] == 200
            changes["data"] += 1
            if n % 3 == 0:
                assert admin(s, "PUT", "/v1/policies/live", v2 if n % 2 else v1)[0] == 200
                changes["modules"] += 1
            time.sleep(0.01)

    answered = []

    def traffic(part):
        client = Client(s.port)
        for i in range(part, count, 4):
            uri = "/live/x" if i % 10 == 0 else f"/api/orders/{i}"
            answered.append(client.check(uri, tokens[i], method="POST" if i % 5 == 0 else "GET"))

    churner = threading.Thread(target=churn)
    churner.start()
    clients = [threading.Thread(target=traffic, args=(p,)) for p in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    stop.set()
    churner.join()
    s.stop()
    assert len(answered) == count
    assert min(changes.values()) >= 3, changes
    lines = [json.loads(l) for l in records.read_text().splitlines()]
    decisions = [l for l in lines if not l.get("shadow_disagreement")]
    assert len(decisions) == count
    assert {status for status, _ in answered} >= {200, 401, 403}
    # The record never holds a token or a redacted header's value.
    text = records.read_text()
    assert tokens[0] not in text and "k-secret" not in text and "[redacted]" in text

    out = replay(records, "--archive", str(tmp_path / "archive"), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["records"] == count and report["differ"] == 0, report
    assert report["replayed"] == count, report
    print(f"replayed {report['replayed']} of {count} checks: {report['same']} the same; changes during the storm: {changes}")


def test_a_candidate_shows_what_it_would_change_and_gates_on_it(tmp_path):
    s, records = start(tmp_path)
    client = Client(s.port)
    for i in range(30):
        client.check(f"/api/orders/{i}", mint(i, "hs-a"), method="POST" if i % 2 else "GET")
    s.stop()
    archive = str(tmp_path / "archive")
    out = replay(records, "--archive", archive, "--candidate", f"rbac={POLICIES / 'rbac.wasm'}")
    assert out.returncode == 0 and "0 would change" in out.stdout, out.stdout + out.stderr
    # A candidate for a policy no record names (a typo) changes nothing because it ran on
    # nothing: the gate must not pass (it used to exit 0).
    out = replay(records, "--archive", archive, "--candidate", f"rbca={POLICIES / 'allow-all.wasm'}")
    assert out.returncode == 3 and "nothing was replayed" in out.stderr and "`rbca`" in out.stderr, out.stdout + out.stderr
    out = replay(records, "--archive", archive, "--candidate", f"rbac={POLICIES / 'allow-all.wasm'}", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    # Readers' POSTs and role-less tokens were denied; allow-all lets them through, and sets
    # none of the headers RBAC set on what it allowed.
    changed = {k: v["count"] for k, v in report["changes"].items()}
    assert set(changed) == {"default (rbac): deny 403 forbidden → allow", "default (rbac): allow setting x-user, x-roles → allow"}, changed
    assert sum(changed.values()) == report["differ"] > 0
    assert all(v["examples"] for v in report["changes"].values())
    # A record whose answer was not what its input gives is caught: one reader's token in one
    # record turned into a writer's, with the recorded answer left as it was.
    lines = records.read_text().splitlines()
    # The roles are in the credential's `claims_json`, a JSON text inside the line.
    reader, writer = r'\"roles\":[\"reader\"]', r'\"roles\":[\"writer\"]'
    tampered_at = next(i for i, l in enumerate(lines) if '"decision":"deny"' in l and reader in l)
    lines[tampered_at] = lines[tampered_at].replace(reader, writer)
    tampered = tmp_path / "tampered.log"
    tampered.write_text("\n".join(lines) + "\n")
    out = replay(tampered, "--archive", archive, "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["differ"] == 1, out.stdout + out.stderr
    # So is one whose summary, what reports and log searches read, was changed and its input and
    # answer left: an allow turned into a deny, another subject, or a decision marked as a shadow
    # candidate's line to keep it from being replayed.
    lines = records.read_text().splitlines()
    allowed_at = next(i for i, l in enumerate(lines) if '"outcome":"allow"' in l)
    for field, edit in [
        ("outcome", lambda r: r.update(outcome="deny", status=403, reason="forbidden")),
        ("subject", lambda r: r.update(subject="mallory")),
        ("path", lambda r: r.update(path="/api/public")),
        ("credential", lambda r: r.update(shadow_disagreement=False, credential="none")),
    ]:
        record = json.loads(lines[allowed_at])
        edit(record)
        tampered.write_text("\n".join(lines[:allowed_at] + [json.dumps(record)] + lines[allowed_at + 1:]) + "\n")
        out = replay(tampered, "--archive", archive, "--json")
        report = json.loads(out.stdout)
        assert out.returncode == 1 and report["differ"] == 1, (field, out.stdout + out.stderr)
        assert list(report["changes"]) == [f"the record's `{field}` contradicts its input or answer"], (field, report["changes"])
    # What a report prints from a record cannot forge a line of the report or drive the
    # terminal; a line that is not UTF-8 is one unreadable record, not the end of the replay.
    record = json.loads(lines[allowed_at])
    record.update(outcome="deny", host="api.test\n3 records, 3 replayed: 3 the same, 0 differ\x1b[2J")
    tampered.write_bytes(b"\xff\xfe not a record\n" + "\n".join(lines[:allowed_at] + [json.dumps(record)]).encode() + b"\n")
    out = replay(tampered, "--archive", archive)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "\x1b" not in out.stdout and not any(l.startswith("3 records") for l in out.stdout.splitlines()), out.stdout
    assert "api.test\\n3 records" in out.stdout and "not replayed (unreadable): 1" in out.stdout, out.stdout
    # Without the archive nothing can be replayed: the report says so, and the replay does not
    # pass (it used to exit 0, as if every record had come out the same).
    out = replay(records, "--archive", str(tmp_path / "empty"))
    assert out.returncode == 3 and "missing_module" in out.stdout and "nothing was replayed" in out.stdout, out.stdout
    assert "replay incomplete" in out.stderr, out.stderr
    out = replay(records, "--archive", str(tmp_path / "empty"), "--allow-skipped")
    assert out.returncode == 0, out.stdout + out.stderr
    # A record of a format version this build does not know is not replayed as if it were
    # version 2: counted, and the replay is incomplete.
    future = tmp_path / "future.log"
    record = json.loads(lines[allowed_at])
    record["v"] = 3
    future.write_text("\n".join(lines[:allowed_at] + [json.dumps(record)]) + "\n")
    out = replay(future, "--archive", archive)
    assert out.returncode == 3 and "not replayed (unsupported_version): 1" in out.stdout, out.stdout + out.stderr
    # A version 1 line, which wrote the pinned time and versions in its input and the standard
    # claims out, replays as the check it records, with the claims it wrote.
    def version_1(line, roles=None):
        record = json.loads(line)
        record["v"] = 1
        record["input"]["now"] = record["ts"]
        record["input"]["versions"] = {k: record[k] for k in ("snapshot", "policy_digest", "key_set", "revocations", "data")}
        credential = record["input"]["credential"]
        claims = json.loads(credential["claims_json"])
        aud = claims.get("aud", [])
        credential.update(issuer=claims.get("iss", ""), subject=claims.get("sub", ""),
                          audiences=[aud] if isinstance(aud, str) else aud, scopes=[], roles=roles or claims.get("roles", []))
        for name, claim in (("expires_at", "exp"), ("issued_at", "iat"), ("token_id", "jti")):
            if claim in claims:
                credential[name] = claims[claim]
        return json.dumps(record)
    assert '"credential":"verified"' in lines[allowed_at] and "scope" not in lines[allowed_at]
    old = tmp_path / "version-1.log"
    old.write_text(version_1(lines[allowed_at]) + "\n")
    out = replay(old, "--archive", archive)
    assert out.returncode == 0 and "1 replayed: 1 the same" in out.stdout, out.stdout + out.stderr
    old.write_text(version_1(lines[allowed_at], roles=["nobody"]) + "\n")
    out = replay(old, "--archive", archive)
    assert out.returncode == 1 and "1 differ" in out.stdout, out.stdout + out.stderr


def test_replay_fetches_a_module_the_archive_lacks_from_its_registry(tmp_path):
    from test_oci import Registry, push
    registry = Registry(tmp_path / "registry")
    try:
        reference = registry.ref("sandgate/rbac", "v1")
        push(reference, "rbac")
        data = tmp_path / "rbac-data.json"
        data.write_text(json.dumps(RBAC_DATA))
        config = tmp_path / "oci.toml"
        records = tmp_path / "oci-records.log"
        write_config(
            config,
            issuers=[{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"], "keys": [{"kid": "hs-a", "algorithm": "HS256", "secret": SECRETS["hs-a"]}]}],
            policies=[{"id": "rbac", "module": reference, "data": str(data)}],
            routes=[{"path_prefix": "/api", "policy": "rbac"}],
            server={"proxy": "nginx"},
            registry={"cache_dir": str(tmp_path / "oci-cache")},
            extra_toml=f'[decision_log]\ncapture = "input"\nsink = "file"\npath = "{records}"\narchive_dir = "{tmp_path / "archive"}"\n',
        )
        s = Sandgate(config, tmp_path / "oci-stdout.log", proxy="nginx")
        client = Client(s.port)
        for i in range(10):
            client.check(f"/api/orders/{i}", mint(i, "hs-a"))
        s.stop()
        line = json.loads(records.read_text().splitlines()[0])
        assert line["policy_source"].startswith(f"oci://{registry.host}/sandgate/rbac@sha256:") and line["route"] == "/api", line
        # The archive without the module: not replayable, unless fetched from its registry.
        (tmp_path / "archive" / "blobs" / "sha256" / line["policy_digest"]).unlink()
        out = replay(records, "--archive", str(tmp_path / "archive"), "--json")
        assert json.loads(out.stdout)["skipped"] == {"missing_module": 10}, out.stdout
        out = replay(records, "--archive", str(tmp_path / "archive"), "--fetch", "--fetch-from", registry.host, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["same"] == 10, out.stdout + out.stderr
    finally:
        registry.stop()


def test_replay_gives_registry_credentials_only_to_the_registries_it_is_told(tmp_path):
    """A record names where its module came from, and whoever can write records (the stream's
    publishers, a file handed to a CI job) chooses it. `replay --fetch` with the operator's
    registry password must not send it to a registry a record names."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Collector(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="collector"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        s, records = start(tmp_path)
        Client(s.port).check("/api/orders/1", mint(1, "hs-a"))
        s.stop()
        line = json.loads(records.read_text().splitlines()[0])
        (tmp_path / "archive" / "blobs" / "sha256" / line["policy_digest"]).unlink()
        host = f"127.0.0.1:{collector.server_address[1]}"
        line["policy_source"] = f"oci://{host}/sandgate/rbac@sha256:{line['policy_digest']}"
        forged = tmp_path / "forged.log"
        forged.write_text(json.dumps(line) + "\n")
        env = {**os.environ, "SANDGATE_REGISTRY_PASSWORD": "the-operators-registry-password"}
        fetch = [str(SANDGATE), "replay", str(forged), "--archive", str(tmp_path / "archive"), "--fetch", "--username", "ci", "--json"]
        # Told only another registry: the record's is not contacted at all.
        out = subprocess.run([*fetch, "--fetch-from", "registry.example"], capture_output=True, text=True, timeout=120, env=env)
        assert json.loads(out.stdout)["skipped"] == {"missing_module": 1}, out.stdout + out.stderr
        assert f"`{host}` is not a registry given with --fetch-from" in out.stderr, out.stderr
        assert seen == [], seen
        # Told none: the same.
        out = subprocess.run(fetch, capture_output=True, text=True, timeout=120, env=env)
        assert json.loads(out.stdout)["skipped"] == {"missing_module": 1} and seen == [], out.stdout + out.stderr + str(seen)
        # The password is read from standard input once; records from standard input too is refused.
        out = subprocess.run([*fetch[:2], "-", *fetch[3:], "--password-stdin"], input="pw\n", capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "would both read standard input" in out.stderr, out.stdout + out.stderr
    finally:
        collector.shutdown()


def test_records_follow_the_schema_and_capture_none_writes_nothing(tmp_path):
    import jsonschema
    schema = json.loads((ROOT / "docs" / "decision-record.schema.json").read_text())
    for capture in ("metadata", "input"):
        s, records = start(tmp_path, capture=capture)
        client = Client(s.port)
        client.check("/api/orders/1", mint(1, "hs-a"))
        client.check("/api/orders/2", "not-a-token")
        client.check("/live/x")
        s.stop()
        lines = [json.loads(l) for l in records.read_text().splitlines()]
        assert len(lines) == 3
        for line in lines:
            jsonschema.validate(line, schema)
            assert line["v"] == 2 and line["data_digest"].startswith("sha256:")
            assert ("input" in line) == (capture == "input")
    s, records = start(tmp_path, capture="none")
    Client(s.port).check("/api/orders/1", mint(1, "hs-a"))
    metrics = urllib.request.urlopen(s.base + "/metrics", timeout=2).read().decode()
    s.stop()
    assert records.read_text() == ""
    assert 'sandgate_decisions_total{outcome="allow",reason="allow"} 1' in metrics


def test_a_verified_token_never_reaches_a_record_wherever_it_was_sent(tmp_path):
    s, records = start(tmp_path, capture="input")
    token = mint(1, "hs-a")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    # The token also in the query (RFC 6750's `access_token`) and in a header no list redacts.
    conn.request("GET", "/auth", headers={"X-Original-URI": f"/api/orders/1?access_token={token}", "X-Original-Method": "GET",
                                          "X-Forwarded-Host": "api.test", "X-Forwarded-Proto": "https",
                                          "Authorization": f"Bearer {token}", "X-Forwarded-Access-Token": token})
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    # In a path longer than the record's summary keeps (2,048 bytes): replaced in the input, and
    # the summary cut from the path as sent is still not a contradiction.
    conn.request("GET", "/auth", headers={"X-Original-URI": f"/api/share/{token}/{'a' * 2100}", "X-Original-Method": "GET",
                                          "X-Forwarded-Host": "api.test", "X-Forwarded-Proto": "https",
                                          "Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    s.stop()
    text = records.read_text()
    assert token not in text
    line = json.loads(text.splitlines()[0])
    assert line["input"]["query"] == "access_token=[redacted]"
    assert dict(line["input"]["headers"])["x-forwarded-access-token"] == "[redacted]"
    assert json.loads(text.splitlines()[1])["input"]["path"].startswith("/api/share/[redacted]/aaa")
    # The policy did not read them: the records still replay to the same decisions.
    result = replay(records, "--archive", str(tmp_path / "archive"), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["same"] == 2, result.stdout + result.stderr


class Nats:
    def __init__(self, directory, max_payload=None):
        from test_fleet import NATS
        self.binary, self.directory, self.port = NATS, directory, free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.args = []
        if max_payload:
            conf = directory / "nats.conf"
            conf.write_text(f"max_payload: {max_payload}\n")
            self.args = ["-c", str(conf)]
        self.start()

    def start(self):
        from conftest import wait_port
        self.log = open(self.directory / "nats.log", "a")
        self.proc = subprocess.Popen([self.binary, *self.args, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.directory / "js")], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "nats-server")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


def stream_messages(nats, stream, grouped=False):
    """Every record in `stream`, in order, its messages read by sequence over one NATS connection
    (`grouped`: a list of each message's records)."""
    import socket
    with socket.create_connection(("127.0.0.1", nats.port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nSUB _INBOX.r 1\r\n')

        def request(subject, body):
            sock.sendall(f"PUB {subject} _INBOX.r {len(body)}\r\n".encode() + body + b"\r\n")
            while True:
                line = f.readline()
                if line.startswith((b"MSG", b"HMSG")):
                    parts = line.split()
                    data = f.read(int(parts[-1]) + 2)[:-2]
                    return data[int(parts[-2]):] if line.startswith(b"HMSG") else data
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")

        info = json.loads(request(f"$JS.API.STREAM.INFO.{stream}", b""))
        last = info["state"]["last_seq"]
        messages = []
        for seq in range(1, last + 1):
            reply = json.loads(request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode()))
            if "message" in reply:
                # A message holds whole records, one a line, as one LZ4 frame when its headers
                # say `Content-Encoding: lz4` (decoded here by the reference LZ4 library).
                body = base64.b64decode(reply["message"]["data"])
                if b"Content-Encoding: lz4" in base64.b64decode(reply["message"].get("hdrs", "")):
                    body = lz4.frame.decompress(body)
                messages.append([json.loads(l) for l in body.splitlines() if l])
        return messages if grouped else [record for message in messages for record in message]


def nats_sink_config(tmp_path, nats, extra=""):
    """A sidecar config: RBAC behind nginx, HS256 tokens, `capture = "input"` records sent to
    `nats` through a spool in `tmp_path` (`extra`: more `[decision_log.nats]` settings)."""
    config = tmp_path / "sandgate.toml"
    data = tmp_path / "rbac-data.json"
    data.write_text(json.dumps(RBAC_DATA))
    write_config(
        config,
        issuers=[{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"], "keys": [{"kid": "hs-a", "algorithm": "HS256", "secret": SECRETS["hs-a"]}]}],
        policies=[{"id": "rbac", "module": str(POLICIES / "rbac.wasm"), "data": str(data)}],
        server={"proxy": "nginx", "default_policy": "rbac"},
        extra_toml='[decision_log]\ncapture = "input"\nsink = "nats"\n' + f'archive_dir = "{tmp_path / "archive"}"\n'
                   + f'[decision_log.nats]\nurl = "{nats.url}"\nspool_dir = "{tmp_path / "spool"}"\n' + extra,
    )
    return config


def test_a_server_with_a_small_max_payload_gets_every_record_it_can_take(tmp_path):
    """A NATS server that accepts only 8 KiB messages: records go out in messages it accepts,
    and each record longer than that is dropped and counted once instead of stopping every record
    behind it."""
    nats = Nats(tmp_path, max_payload=8192)
    config = nats_sink_config(tmp_path, nats, extra='compression = "none"\n')
    s = Sandgate(config, tmp_path / "stdout.log", proxy="nginx")
    try:
        client = Client(s.port)
        answered = [client.check(f"/api/orders/{i}", mint(i, "hs-a"))[1] for i in range(100)]

        def big():
            """A check whose 9 KB query makes a record NATS cannot take in one message."""
            client.conn.request("GET", "/auth", headers={"X-Original-URI": "/api/orders/big?pad=" + "p" * 9000, "X-Original-Method": "GET",
                                                         "X-Forwarded-Host": "api.test", "X-Forwarded-Proto": "https",
                                                         "Authorization": f"Bearer {mint(0, 'hs-a')}"})
            response = client.conn.getresponse()
            response.read()
            return response.getheader("x-sandgate-request-id")

        bigs = [big()]
        answered += [client.check(f"/api/orders/{i}", mint(i, "hs-a"))[1] for i in range(100, 200)]
        # The last record of all too long as well, once the others are sent: it is alone in
        # the spool, nothing follows it, and it is still passed.
        time.sleep(0.5)
        bigs.append(big())
        deadline = time.time() + 20
        ids = []
        while time.time() < deadline and len(ids) < len(answered):
            time.sleep(0.3)
            ids = [m["request_id"] for m in stream_messages(nats, "sandgate_decisions")]
        assert ids == answered, (len(ids), len(answered))
        assert not set(bigs) & set(ids)
        # Each dropped record is counted once, and the spool empties (a skipped line is never
        # peeked and counted again).
        time.sleep(1)
        metrics = urllib.request.urlopen(s.base + "/metrics", timeout=2).read().decode()
        assert "sandgate_decision_log_dropped_total 2" in metrics, metrics
        assert "sandgate_decision_spool_bytes 0" in metrics, metrics
        assert "too long for the NATS server's max_payload" in "".join(s.stderr_lines)
    finally:
        s.stop()
        nats.stop()


def test_records_that_trickle_in_go_out_in_fewer_fuller_messages(tmp_path):
    """A check every 20 ms: with a linger, the publisher lets records gather after each send and
    sends them together (every one, in order); without it, each goes out alone as it comes."""
    messages, elapsed = {}, {}
    for linger in (300, 0):
        directory = tmp_path / f"linger-{linger}"
        directory.mkdir()
        nats = Nats(directory)
        config = nats_sink_config(directory, nats, extra=f"linger_ms = {linger}\n")
        s = Sandgate(config, directory / "stdout.log", proxy="nginx")
        try:
            client = Client(s.port)
            answered = []
            started = time.time()
            for i in range(60):
                answered.append(client.check(f"/api/orders/{i}", mint(i, "hs-a"))[1])
                time.sleep(0.02)
            elapsed[linger] = time.time() - started
            deadline = time.time() + 20
            grouped = []
            while time.time() < deadline:
                grouped = stream_messages(nats, "sandgate_decisions", grouped=True)
                if sum(map(len, grouped)) >= len(answered):
                    break
                time.sleep(0.3)
            assert [r["request_id"] for m in grouped for r in m] == answered
            messages[linger] = len(grouped)
        finally:
            s.stop()
            nats.stop()
    # ~1.5 s of checks: about one message a linger, against about one a record.
    print(f"60 records, a check every 20 ms: {messages[300]} messages with a 300 ms linger "
          f"(over {elapsed[300]:.1f} s), {messages[0]} without")
    # About one message a linger, however long the checks took; without it, several times more.
    assert messages[300] <= elapsed[300] / 0.3 + 3, (messages, elapsed)
    assert messages[0] >= 2 * messages[300], messages


def test_the_nats_sink_loses_nothing_while_nats_is_down(tmp_path):
    nats = Nats(tmp_path)
    down_for = float(os.environ.get("SANDGATE_NATS_DOWN_SECS", "6"))
    config = nats_sink_config(tmp_path, nats)
    s = Sandgate(config, tmp_path / "stdout.log", proxy="nginx")
    try:
        answered = []
        stop = threading.Event()

        def traffic(part):
            client = Client(s.port)
            i = part
            while not stop.is_set():
                answered.append(client.check(f"/api/orders/{i}", mint(i, "hs-a"))[1])
                i += 2
                time.sleep(0.002)

        clients = [threading.Thread(target=traffic, args=(p,)) for p in range(2)]
        for c in clients:
            c.start()
        time.sleep(1)
        nats.stop()
        before = len(answered)
        time.sleep(down_for)
        during = len(answered)
        # What waits for NATS is on disk, and shown.
        metrics = urllib.request.urlopen(s.base + "/metrics", timeout=2).read().decode()
        spooled = int(re.search(r"^sandgate_decision_spool_bytes (\d+)", metrics, re.M).group(1))
        assert spooled > 0, metrics
        nats.start()
        time.sleep(1)
        stop.set()
        for c in clients:
            c.join()
        # The running sidecar resumes by itself: every record reaches the stream, once, without
        # a restart, and none was dropped.
        deadline = time.time() + 60
        ids = []
        while time.time() < deadline:
            ids = [m["request_id"] for m in stream_messages(nats, "sandgate_decisions")]
            if len(ids) >= len(answered):
                break
            time.sleep(0.5)
        assert during > 100, during
        assert len(ids) == len(set(ids)), "a record was stored twice"
        assert set(ids) == set(answered), (len(ids), len(answered), len(set(answered) - set(ids)))
        metrics = urllib.request.urlopen(s.base + "/metrics", timeout=2).read().decode()
        assert "sandgate_decision_log_dropped_total 0" in metrics, metrics
        assert re.search(r"^sandgate_decision_spool_bytes 0$", metrics, re.M), metrics
        s.stop()
        # A restart sends nothing again: a cursor left behind at a clean stop would.
        s = Sandgate(config, tmp_path / "stdout-2.log", proxy="nginx")
        time.sleep(2)
        ids = [m["request_id"] for m in stream_messages(nats, "sandgate_decisions")]
        assert len(ids) == len(set(ids)) == len(answered), (len(ids), len(set(ids)), len(answered))
        # Replayed straight from the stream: every record, the same.
        out = subprocess.run([str(SANDGATE), "replay", "--stream", "sandgate_decisions", "--nats-url", nats.url, "--archive", str(tmp_path / "archive"), "--json"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert report["replayed"] == len(answered) and report["differ"] == 0, report
        # Read from the stream with fetches on: the data document, left out of a copy of the
        # archive, is asked of the fleet's object store (there is none) while the stream is read.
        partial = tmp_path / "archive-without-data"
        shutil.copytree(tmp_path / "archive", partial)
        for digest in {m["data_digest"] for m in stream_messages(nats, "sandgate_decisions")}:
            (partial / "blobs" / "sha256" / digest.removeprefix("sha256:")).unlink()
        out = subprocess.run([str(SANDGATE), "replay", "--stream", "sandgate_decisions", "--nats-url", nats.url, "--archive", str(partial),
                              "--fetch", "--fleet-url", nats.url, "--fleet", "prod", "--json"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 3 and json.loads(out.stdout)["skipped"] == {"missing_data": len(answered)}, out.stdout + out.stderr
        print(f"NATS down {down_for:.0f} s: {during - before} checks meanwhile ({spooled:,} bytes spooled); "
              f"{len(answered)} checks, {len(ids)} records in the stream, replayed {report['replayed']}, 0 lost, 0 twice")
    finally:
        s.stop()
        nats.stop()


def test_a_sidecar_restarted_under_load_sends_no_record_twice(tmp_path):
    """A clean stop while records flow leaves the spool's cursor at what JetStream acknowledged:
    the restarted sidecar sends nothing again (and loses nothing)."""
    nats = Nats(tmp_path)
    config = nats_sink_config(tmp_path, nats)
    answered = []
    try:
        for run in range(3):
            s = Sandgate(config, tmp_path / f"stdout-{run}.log", proxy="nginx")
            try:
                client = Client(s.port)
                started = time.time()
                # Records flowing right up to the stop: the last ones are acknowledged during it.
                while time.time() - started < 1.5:
                    answered.append(client.check(f"/api/orders/{len(answered)}", mint(len(answered), "hs-a"))[1])
            finally:
                s.stop()
        # The last sidecar's records, and anything a cursor left behind would send again.
        s = Sandgate(config, tmp_path / "stdout-last.log", proxy="nginx")
        deadline = time.time() + 30
        ids = []
        while time.time() < deadline and len(ids) < len(answered):
            time.sleep(0.5)
            ids = [m["request_id"] for m in stream_messages(nats, "sandgate_decisions")]
        time.sleep(2)
        ids = [m["request_id"] for m in stream_messages(nats, "sandgate_decisions")]
        assert len(answered) > 100, len(answered)
        assert set(ids) == set(answered), (len(ids), len(answered))
        assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} records stored twice"
    finally:
        s.stop()
        nats.stop()


def serve_wasip2_fixture(tmp_path, runtime=None):
    """A sidecar serving the hostile `wasm32-wasip2` fixture as policy `p2` with `runtime`
    limits, recording every check's input to a file and archiving its module and data: the
    sidecar, its configuration file and its records file."""
    records = tmp_path / "records.log"
    config = tmp_path / "sandgate.toml"
    write_config(
        config,
        issuers=[{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"], "keys": [{"kid": "hs-a", "algorithm": "HS256", "secret": SECRETS["hs-a"]}]}],
        policies=[{"id": "p2", "module": str(POLICIES / "hostile-wasip2-servable.wasm")}],
        server={"proxy": "nginx", "default_policy": "p2"},
        runtime=runtime,
        extra_toml=f'[decision_log]\ncapture = "input"\nsink = "file"\npath = "{records}"\narchive_dir = "{tmp_path / "archive"}"\n',
    )
    return Sandgate(config, tmp_path / "stdout.log", proxy="nginx"), config, records


def test_replay_runs_policies_under_the_sidecars_limits_and_leaves_out_what_its_clock_decided(tmp_path):
    """A sidecar with 2 MiB instances: a check that copies a 1 MiB string runs out of memory
    there, and must in the replay too, which takes the limit from the sidecar's configuration
    (`--config`) or `--memory-limit-mib`. A check denied `policy_timeout` was decided by the
    sidecar's clock under its load: the replay leaves it out (`host_condition`) instead of
    calling its quicker answer a difference. Such a record is made here by editing a quick
    check's record as an overloaded sidecar would have written it."""
    s, config, records = serve_wasip2_fixture(tmp_path, runtime={"memory_limit_mib": 2, "timeout_ms": 250})
    try:
        client = Client(s.port)
        statuses = [client.check(path)[0] for path in ["/wasi/sleep", "/alias-decision", "/wasi/clock-spin"]]
    finally:
        s.stop()
    lines = [json.loads(l) for l in records.read_text().splitlines()]
    assert [(l["path"], l["reason"]) for l in lines] == [
        ("/wasi/sleep", "allow"), ("/alias-decision", "policy_out_of_memory"), ("/wasi/clock-spin", "policy_timeout")], lines
    assert statuses[:2] == [200, 403], statuses
    archive = ["--archive", str(tmp_path / "archive"), "--json"]

    def replayed(*args):
        out = replay(records, *archive, *args)
        return out.returncode, json.loads(out.stdout or "{}"), out.stderr

    # The sidecar's limits, from its configuration or given: every record as it was.
    for args, limits in (([f"--config={config}"], "memory_limit_mib = 2 and timeout_ms = 250"),
                         (["--memory-limit-mib", "2"], "memory_limit_mib = 2 and timeout_ms = 100")):
        code, report, err = replayed(*args)
        assert limits in err, err
        assert (code, report["replayed"], report["same"], report["skipped"]) == (0, 2, 2, {"host_condition": 1}), (args, report, err)
    # Under the default 16 MiB, the copy no longer runs out of memory: a difference.
    code, report, err = replayed()
    assert "memory_limit_mib = 16" in err and (code, report["differ"]) == (1, 1), (report, err)
    # A quick check recorded as denied out of time (an overloaded sidecar): not a difference.
    quick = lines[0]
    timed_out = dict(quick, outcome="deny", status=lines[2]["status"], reason="policy_timeout", fault=lines[2]["fault"],
                     decision=lines[2]["decision"], request_id=quick["request_id"] + "-late")
    records.write_text(json.dumps(quick) + "\n" + json.dumps(timed_out) + "\n")
    code, report, err = replayed(f"--config={config}")
    assert (code, report["replayed"], report["same"], report["skipped"]) == (0, 1, 1, {"host_condition": 1}), (report, err)


def test_a_wasip2_policy_replays_exactly_what_its_wasi_gave_it(tmp_path):
    """A `wasm32-wasip2` policy reads the wall clock, randomness and stdin, prints, exits: the
    sidecar serves it, records each check, and replaying the records gives the same answers
    (the randomness comes from the request id, the clock from the pinned `now`)."""
    s, _, records = serve_wasip2_fixture(tmp_path)
    try:
        client = Client(s.port)
        paths = ["/wasi/observe"] * 5 + ["/wasi/print", "/wasi/exit", "/wasi/file", "/wasi/sleep"]
        statuses = [client.check(path)[0] for path in paths]
    finally:
        s.stop()
    assert statuses == [200] * 5 + [200, 403, 403, 200], statuses
    lines = [json.loads(l) for l in records.read_text().splitlines()]
    assert [l["reason"] for l in lines[6:8]] == ["policy_exited", "policy_panicked"], lines[6:8]
    randoms = {dict(l["decision"]["set_headers"])["x-random"] for l in lines[:5]}
    assert len(randoms) == 5, f"each check has its own randomness: {randoms}"
    assert [(g["level"], g["message"]) for g in lines[5]["policy_logs"]] == [("info", "hello from stdout"), ("warn", "hello from stderr")]
    out = replay(records, "--archive", str(tmp_path / "archive"), "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["replayed"] == len(paths) and report["differ"] == 0, out.stdout + out.stderr
