"""A fleet of sidecars on NATS JetStream (Debian's `nats-server`, started here on a loopback
port with a temporary store) and the distribution registry: fleet-wide read-your-writes with
`sandgate fleet … --wait`, roll-outs, revocations, a module that fails, a malformed document,
NATS going away (start from the local cache, staleness, catching up), and local writes
refused."""

import base64
import concurrent.futures
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import ISSUER, POLICIES, RBAC_DATA, SANDGATE, Sandgate, free_port, wait_port, write_config
from test_admin import TOKEN, admin
from test_oci import Registry, push

NATS = shutil.which("nats-server") or "/usr/bin/nats-server"
SECRET = "an-hs256-secret-of-at-least-32-bytes!!"


class Nats:
    """`nats-server -js` on a free loopback port, its store in a temporary directory that
    survives a restart."""

    def __init__(self, directory):
        self.directory = directory
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        self.log = open(self.directory / "nats.log", "a")
        self.proc = subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.directory / "js")], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "nats-server")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def nats(tmp_path):
    n = Nats(tmp_path)
    yield n
    n.stop()


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path / "registry")
    yield r
    r.stop()


def fleet(nats, *args, check=True):
    out = subprocess.run([str(SANDGATE), "fleet", "--url", nats.url, "--name", "prod", *args], capture_output=True, text=True, timeout=90)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def token(jti, sub="alice"):
    import jwt
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "sub": sub, "jti": jti, "iat": now, "exp": now + 600, "roles": ["reader"]}, SECRET, algorithm="HS256", headers={"kid": "k"})


class Fleet:
    """N sidecars in fleet `prod`, each with its own caches and decision log."""

    def __init__(self, tmp_path, nats, n, max_staleness=30, admin=False, capture=None):
        self.tmp_path, self.nats, self.max_staleness, self.admin = tmp_path, nats, max_staleness, admin
        self.capture = capture
        self.sidecars = [self.start(i) for i in range(n)]

    def start(self, i):
        d = self.tmp_path / f"node-{i}"
        d.mkdir(exist_ok=True)
        extra = (
            f'[fleet]\nurl = "{self.nats.url}"\nname = "prod"\nnode_id = "node-{i}"\ncache_dir = "{d / "fleet"}"\n'
            f"max_staleness_secs = {self.max_staleness}\nheartbeat_ms = 200\n"
        ) + (f'[decision_log]\ncapture = "{self.capture}"\n' if self.capture else "")
        config = {
            "issuers": [{"issuer": ISSUER, "algorithms": ["HS256"], "keys": [{"kid": "k", "algorithm": "HS256", "secret": SECRET}]}],
            "policies": [],
            "server": {"proxy": "nginx", "default_policy": "rbac"},
            "routes": [{"path_prefix": "/live", "policy": "live"}],
            "registry": {"cache_dir": str(d / "oci")},
            "extra_toml": extra,
        }
        if self.admin:
            config["admin"] = {"listen": f"127.0.0.1:{free_port()}", "token": TOKEN}
        path = d / "sandgate.toml"
        write_config(path, **config)
        s = Sandgate.__new__(Sandgate)
        # Not ready until the fleet's state is applied: start without waiting for /readyz.
        s.wait_ready = lambda: None
        Sandgate.__init__(s, path, d / f"decisions-{time.time_ns()}.log", proxy="nginx")
        if self.admin:
            s.admin = f"http://{config['admin']['listen']}"
        return s

    def restart(self, i):
        self.sidecars[i].stop()
        self.sidecars[i] = self.start(i)

    def stop(self):
        for s in self.sidecars:
            s.stop()


def answer(sidecar, jti="probe", sub="alice"):
    """The RBAC policy's answer for a reader's token: (status, reason)."""
    status, headers, _ = sidecar.check({"Authorization": f"Bearer {token(jti, sub)}", "X-Original-URI": "/api/x"})
    return status, headers.get("x-sandgate-reason")


def version(sidecar):
    """The `live` policy's answer: (status, version)."""
    status, headers, _ = sidecar.check({"X-Original-URI": "/live/x"})
    return status, headers.get("x-policy-version")


def deploy_rbac(tmp_path, nats, registry):
    push(registry.ref("sandgate/rbac", "v1"), "rbac")
    data = tmp_path / "rbac-data.json"
    data.write_text(json.dumps(RBAC_DATA))
    fleet(nats, "put-data", "rbac", str(data))
    fleet(nats, "put-policy", "rbac", registry.ref("sandgate/rbac", "v1"), "--wait")


def ready(sidecar):
    try:
        with urllib.request.urlopen(sidecar.base + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until(predicate, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_replay_fetches_a_fleets_module_and_every_data_version_from_its_object_store(tmp_path, nats):
    """A module uploaded to the fleet, and two versions of its data document: replay, with an
    empty archive, fetches the module and each data document by the digests the records name
    from the fleet's object store (`put-data` keeps every version there)."""
    data = tmp_path / "rbac-data.json"
    data.write_text(json.dumps(RBAC_DATA))
    fleet(nats, "put-data", "rbac", str(data))
    fleet(nats, "put-policy", "rbac", str(POLICIES / "rbac.wasm"))
    f = Fleet(tmp_path, nats, 1, capture="input")
    try:
        sidecar = f.sidecars[0]
        assert wait_until(lambda: ready(sidecar), 30)
        assert answer(sidecar) == (200, None)
        data.write_text(json.dumps({"roles": {}}))
        out = fleet(nats, "put-data", "rbac", str(data), "--wait")
        assert "uploaded the data document" in out.stderr, out.stderr
        assert answer(sidecar, jti="probe-2") == (403, "forbidden")
        lines = [l for l in sidecar.decision_log() if l.get("input")]
    finally:
        f.stop()
    assert len({l["data_digest"] for l in lines}) == 2 and len(lines) == 2, lines
    records = tmp_path / "records.log"
    records.write_text("".join(json.dumps(l) + "\n" for l in lines))
    empty = tmp_path / "empty-archive"

    def replay(*args):
        out = subprocess.run([str(SANDGATE), "replay", str(records), "--archive", str(empty), "--json", *args],
                             capture_output=True, text=True, timeout=120)
        return out.returncode, json.loads(out.stdout or "{}"), out.stderr

    code, report, err = replay()
    assert code == 3 and report["skipped"] == {"missing_module": 2}, (report, err)
    code, report, err = replay("--fetch", "--fleet-url", nats.url, "--fleet", "prod")
    assert (code, report["replayed"], report["same"]) == (0, 2, 2), (report, err)


def test_writes_with_wait_are_read_your_writes_across_the_fleet(tmp_path, nats, registry):
    v1 = registry.ref("sandgate/live", "v1")
    push(v1, "versioned-v1")
    push(registry.ref("sandgate/live", "v2"), "versioned-v2")
    f = Fleet(tmp_path, nats, 5)
    try:
        assert not any(ready(s) for s in f.sidecars), "ready before the fleet's state was applied"
        deploy_rbac(tmp_path, nats, registry)
        out = fleet(nats, "put-policy", "live", v1, "--wait=30")
        revision = int(out.stdout.strip())
        assert "applied by all 5 live sidecars" in out.stderr, out.stderr
        assert all(version(s) == (200, "1") for s in f.sidecars)
        assert all(answer(s) == (200, None) for s in f.sidecars)
        assert all(ready(s) for s in f.sidecars)
        line = f.sidecars[0].decision_log()[-1]
        assert line["fleet_revision"] == revision, line
        assert line["policy_source"].startswith(f"oci://{registry.host}/sandgate/rbac@sha256:"), line

        # 1,000 revocations at a steady rate, each with --wait, then every sidecar probed with
        # the revoked token: not one allow.
        for i in range(1000):
            out = fleet(nats, "revoke", "--jti", f"jti-{i}", "--wait=30")
            assert "applied by all 5 live sidecars" in out.stderr, out.stderr
            allowed = [s.port for s in f.sidecars if answer(s, jti=f"jti-{i}")[0] == 200]
            assert allowed == [], f"revocation {i} allowed on {allowed}"
        # A subject, with an expiry in the past: no longer in force; un-revoking works.
        fleet(nats, "revoke", "--subject", "mallory", "--wait")
        assert {answer(s, sub="mallory") for s in f.sidecars} == {(401, "token_revoked")}
        fleet(nats, "unrevoke", "--subject", "mallory", "--wait")
        assert {answer(s, sub="mallory")[0] for s in f.sidecars} == {200}
        fleet(nats, "revoke", "--subject", "mallory", f"--until={int(time.time()) - 3600:d}", "--wait")
        assert {answer(s, sub="mallory")[0] for s in f.sidecars} == {200}
        # One in force for two more seconds only.
        fleet(nats, "revoke", "--subject", "mallory", "--until=2s", "--wait")
        assert {answer(s, sub="mallory")[0] for s in f.sidecars} == {401}
        assert wait_until(lambda: {answer(s, sub="mallory")[0] for s in f.sidecars} == {200}, timeout=10)

        # A roll-out under load: no failed request, and after --wait only v2 answers.
        stop = False

        def load(s):
            seen = []
            while not stop:
                seen.append(version(s))
            return seen

        with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
            loads = [pool.submit(load, s) for s in f.sidecars]
            time.sleep(0.3)
            fleet(nats, "put-policy", "live", registry.ref("sandgate/live", "v2"), "--wait")
            after = [version(s) for s in f.sidecars]
            stop = True
            seen = [a for l in loads for a in l.result()]
        assert after == [(200, "2")] * 5
        assert len(seen) > 100 and {a for a in seen} <= {(200, "1"), (200, "2")}, set(seen)

        out = fleet(nats, "status")
        assert out.stdout.count("node-") == 5, out.stdout
    finally:
        f.stop()


def test_a_bad_item_keeps_the_old_version_and_is_reported(tmp_path, nats, registry):
    push(registry.ref("sandgate/live", "v1"), "versioned-v1")
    f = Fleet(tmp_path, nats, 2)
    try:
        deploy_rbac(tmp_path, nats, registry)
        fleet(nats, "put-policy", "live", registry.ref("sandgate/live", "v1"), "--wait")
        # A module that is not in the registry, and one that is not a policy (fails to load).
        bad = registry.push_artifact("sandgate/bad", "v1", b"\0asm\x01\0\0\0", "application/vnd.wasm.config.v0+json", "application/wasm")
        for module, why in [(registry.ref("sandgate/live", "gone"), "is not in the registry"), (registry.ref("sandgate/bad", digest_=bad), "rejected")]:
            out = fleet(nats, "put-policy", "live", module, "--no-verify", "--wait", check=False)
            assert out.returncode == 1 and "2 of 2 live sidecars refused" in out.stderr and why in out.stderr, out.stderr
            assert [version(s) for s in f.sidecars] == [(200, "1")] * 2
        out = fleet(nats, "status")
        assert "policy.live@" in out.stdout and "rejected" in out.stdout, out.stdout
        # `put-policy` without --no-verify checks the module before the fleet sees it.
        out = fleet(nats, "put-policy", "live", registry.ref("sandgate/bad", digest_=bad), check=False)
        assert out.returncode == 2 and "not a loadable policy component" in out.stderr, out.stderr
        # A malformed data document (written past the CLI, which checks JSON): reported, and
        # the policy keeps serving.
        revision = kv_put_raw(nats, "sandgate_prod", "data.rbac", b"{not json")
        assert wait_until(lambda: all(fleet_status(nats, n)["applied_revision"] >= revision for n in ("node-0", "node-1")))
        for n in ("node-0", "node-1"):
            errors = fleet_status(nats, n)["errors"]
            assert any(e["key"] == "data.rbac" and "not JSON" in e["error"] for e in errors), errors
        # RBAC still has its roles: the previous document serves.
        assert [answer(s) for s in f.sidecars] == [(200, None)] * 2
        # A revocation whose value cannot be read still revokes (fail closed), and is reported.
        key = "revoke.jti." + base64.urlsafe_b64encode(b"garbled").decode().rstrip("=")
        revision = kv_put_raw(nats, "sandgate_prod", key, b"not a revocation")
        assert wait_until(lambda: all(fleet_status(nats, n)["applied_revision"] >= revision for n in ("node-0", "node-1")))
        assert [answer(s, jti="garbled") for s in f.sidecars] == [(401, "token_revoked")] * 2
        assert all(any(e["key"] == key for e in fleet_status(nats, n)["errors"]) for n in ("node-0", "node-1"))
    finally:
        f.stop()


def nats_request(nats, subject, body=b""):
    """One request over the NATS protocol (independent of Sandgate's client); the reply's body."""
    import socket
    with socket.create_connection(("127.0.0.1", nats.port), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()  # INFO
        s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nSUB _INBOX.test 1\r\n')
        s.sendall(f"PUB {subject} _INBOX.test {len(body)}\r\n".encode() + body + b"\r\n")
        while True:
            line = f.readline()
            if line.startswith((b"MSG", b"HMSG")):
                parts = line.split()
                data = f.read(int(parts[-1]) + 2)[:-2]
                if line.startswith(b"HMSG"):
                    data = data[int(parts[-2]):]
                return data
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")


def kv_put_raw(nats, bucket, key, value):
    """A KV put as any NATS client makes it: a JetStream publish to `$KV.<bucket>.<key>`."""
    return json.loads(nats_request(nats, f"$KV.{bucket}.{key}", value))["seq"]


def fleet_status(nats, node):
    reply = json.loads(nats_request(nats, "$JS.API.DIRECT.GET.KV_sandgate_prod_status", json.dumps({"last_by_subj": f"$KV.sandgate_prod_status.{node}"}).encode()))
    return reply


def test_nats_down_start_from_cache_go_stale_and_catch_up(tmp_path, nats, registry):
    push(registry.ref("sandgate/live", "v1"), "versioned-v1")
    f = Fleet(tmp_path, nats, 2, max_staleness=2, admin=True)
    try:
        deploy_rbac(tmp_path, nats, registry)
        fleet(nats, "put-policy", "live", registry.ref("sandgate/live", "v1"), "--wait")
        fleet(nats, "revoke", "--jti", "before", "--wait")
        # A sidecar in a fleet refuses local writes of what the fleet owns.
        status, body = admin(f.sidecars[0], "PUT", "/v1/policies/live", (POLICIES / "versioned-v2.wasm").read_bytes())
        assert status == 409 and "owned by the fleet `prod`" in body["error"], body
        status, body = admin(f.sidecars[0], "POST", "/v1/revocations", {"jtis": ["x"]})
        assert status == 409, body

        nats.stop()
        registry.stop()
        # Restarted while NATS and the registry are down: it starts from its caches.
        f.restart(1)
        assert version(f.sidecars[1]) == (200, "1")
        assert answer(f.sidecars[1]) == (200, None)
        assert answer(f.sidecars[1], jti="before") == (401, "token_revoked")
        # Past max_staleness: not ready, and checks are denied (fail closed), 503 stale_state
        # turned into a 403 for the proxy.
        assert wait_until(lambda: not ready(f.sidecars[0]) and not ready(f.sidecars[1]), timeout=10)
        for s in f.sidecars:
            assert answer(s) == (403, "stale_state")
        metrics = urllib.request.urlopen(f.sidecars[0].base + "/metrics", timeout=2).read().decode()
        assert "sandgate_fleet_staleness_seconds" in metrics

        # NATS back: both catch up, including what was written after they lost it.
        nats.start()
        fleet(nats, "revoke", "--jti", "after", "--wait=20")
        for s in f.sidecars:
            assert wait_until(lambda: ready(s), timeout=10)
            assert version(s) == (200, "1")
            assert answer(s, jti="after") == (401, "token_revoked")
            assert answer(s, jti="before") == (401, "token_revoked")
    finally:
        f.stop()


def es256_key(kid):
    """A fresh P-256 key: (private key, its public JWK as a dict)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
    return private, jwk


def fleet_token(private, kid, iss="https://fleet-issuer.test"):
    import jwt
    now = int(time.time())
    claims = {"iss": iss, "aud": "orders-api", "sub": "bob", "jti": f"t-{kid}", "iat": now, "exp": now + 600, "roles": ["reader"]}
    return jwt.encode(claims, private, algorithm="ES256", headers={"kid": kid})


def test_routes_issuers_keys_shadows_and_uploaded_modules_come_from_the_fleet(tmp_path, nats, registry):
    f = Fleet(tmp_path, nats, 2)
    try:
        deploy_rbac(tmp_path, nats, registry)
        # A module file uploaded into the fleet's object store, named by its digest.
        out = fleet(nats, "put-policy", "live", str(POLICIES / "versioned-v1.wasm"), "--wait")
        assert "uploaded" in out.stderr and "fleet:sha256:" in out.stderr, out.stderr
        assert "found" in fleet(nats, "put-policy", "live", str(POLICIES / "versioned-v1.wasm")).stderr
        fleet(nats, "put-policy", "live2", str(POLICIES / "versioned-v2.wasm"), "--wait")
        assert [version(s) for s in f.sidecars] == [(200, "1")] * 2
        assert f.sidecars[0].decision_log()[-1]["policy_source"].startswith("fleet:sha256:")
        # Not a component: refused before the fleet sees it.
        junk = tmp_path / "junk.wasm"
        junk.write_bytes(b"\0asm\x01\0\0\0")
        out = fleet(nats, "put-policy", "live", str(junk), check=False)
        assert out.returncode != 0 and "not a loadable policy component" in out.stderr, out.stderr

        # Routes: the fleet's come before the sidecar's own, the most specific first.
        fleet(nats, "route", "v2", "--path-prefix", "/v2", "--policy", "live2", "--wait")
        assert all(s.check({"X-Original-URI": "/v2/x"})[1].get("x-policy-version") == "2" for s in f.sidecars)
        fleet(nats, "route", "over", "--path-prefix", "/live", "--policy", "live2", "--wait")
        assert [version(s) for s in f.sidecars] == [(200, "2")] * 2
        fleet(nats, "route", "over", "--remove", "--wait")
        assert [version(s) for s in f.sidecars] == [(200, "1")] * 2
        out = fleet(nats, "route", "bad", "--path-prefix", "v2", "--policy", "live2", check=False)
        assert out.returncode != 0 and "must start with `/`" in out.stderr, out.stderr

        # An issuer from the fleet, its keys rotated, then removed.
        key1, jwk1 = es256_key("k1")
        key2, jwk2 = es256_key("k2")
        jwks1, jwks2 = tmp_path / "jwks1.json", tmp_path / "jwks2.json"
        jwks1.write_text(json.dumps({"keys": [jwk1]}))
        jwks2.write_text(json.dumps({"keys": [jwk2]}))

        def fleet_answer(s, private, kid):
            status, headers, _ = s.check({"Authorization": f"Bearer {fleet_token(private, kid)}", "X-Original-URI": "/api/x"})
            return status

        assert {fleet_answer(s, key1, "k1") for s in f.sidecars} == {401}
        fleet(nats, "issuer", "https://fleet-issuer.test", "--audience", "orders-api", "--algorithm", "ES256", "--jwks", str(jwks1), "--wait")
        assert {fleet_answer(s, key1, "k1") for s in f.sidecars} == {200}
        fleet(nats, "keys", "https://fleet-issuer.test", str(jwks2), "--wait")
        assert {fleet_answer(s, key1, "k1") for s in f.sidecars} == {401}
        assert {fleet_answer(s, key2, "k2") for s in f.sidecars} == {200}
        # The configured issuer's keys are not touched by the fleet's; a shared secret is refused.
        assert [answer(s) for s in f.sidecars] == [(200, None)] * 2
        secret = tmp_path / "secret.json"
        secret.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "k", "alg": "HS256", "k": base64.urlsafe_b64encode(b"x" * 32).decode()}]}))
        out = fleet(nats, "keys", ISSUER, str(secret), check=False)
        assert out.returncode != 0 and "shared secret" in out.stderr, out.stderr
        # Keys for an issuer no sidecar knows: written past the CLI, reported, nothing changes.
        revision = kv_put_raw(nats, "sandgate_prod", "keys." + base64.urlsafe_b64encode(b"https://nobody.test").decode().rstrip("="), jwks1.read_bytes())
        assert wait_until(lambda: all(fleet_status(nats, n)["applied_revision"] >= revision for n in ("node-0", "node-1")))
        assert all(any("no issuer `https://nobody.test`" in e["error"] for e in fleet_status(nats, n)["errors"]) for n in ("node-0", "node-1"))
        assert {fleet_answer(s, key2, "k2") for s in f.sidecars} == {200}
        fleet(nats, "issuer", "https://fleet-issuer.test", "--remove", "--wait")
        assert {fleet_answer(s, key2, "k2") for s in f.sidecars} == {401}

        # A shadow candidate from the fleet: evaluated beside `live`, never changing the answer.
        fleet(nats, "shadow", "live", str(POLICIES / "versioned-v2.wasm"), "--wait")
        assert [version(s) for s in f.sidecars] == [(200, "1")] * 2
        assert f.sidecars[0].decision_log()[-1].get("shadow_disagreement"), f.sidecars[0].decision_log()[-1]
        fleet(nats, "shadow", "live", "--remove", "--wait")
        version(f.sidecars[0])
        assert not f.sidecars[0].decision_log()[-1].get("shadow_disagreement")

        # Restarted while NATS is down: the uploaded module comes from the module cache.
        nats.stop()
        f.restart(0)
        assert version(f.sidecars[0]) == (200, "1")
    finally:
        f.stop()


def test_a_watch_whose_consumer_is_lost_is_made_anew(tmp_path, nats, registry):
    """The server drops the sidecar's watch consumer while the client stays connected (as when
    the NATS node holding it dies and the client is on another): the watch goes silent without
    ending. The sidecar sees the bucket move on without it and watches anew from its last
    revision (after 3 s of that); a write after the loss reaches it within 8 s. (Without that
    watchdog, the NATS client's own missed-heartbeat check took over 10 s here.)"""
    f = Fleet(tmp_path, nats, 1, max_staleness=60)
    try:
        deploy_rbac(tmp_path, nats, registry)
        fleet(nats, "revoke", "--jti", "before", "--wait")
        names = json.loads(nats_request(nats, "$JS.API.CONSUMER.NAMES.KV_sandgate_prod"))["consumers"]
        assert names, "the sidecar's watch has a consumer"
        for name in names:
            assert json.loads(nats_request(nats, f"$JS.API.CONSUMER.DELETE.KV_sandgate_prod.{name}")).get("success"), name
        started = time.time()
        fleet(nats, "revoke", "--jti", "after")
        s = f.sidecars[0]
        assert wait_until(lambda: answer(s, jti="after") == (401, "token_revoked"), timeout=8), \
            f"the revocation did not arrive within 8 s; sidecar log: {[l.strip()[-200:] for l in s.stderr_lines if 'watch' in l]}"
        print(f"revocation applied {time.time() - started:.1f} s after the consumer was lost")
        assert answer(s, jti="before") == (401, "token_revoked")
    finally:
        f.stop()


def test_a_module_that_failed_is_tried_again_until_it_loads(tmp_path, nats, registry):
    """A module the registry cannot serve (it is down) is tried again in the background, with
    back-off, and served once the registry is back, without the item being written again:
    written while the sidecar runs, and named by its cached state when the sidecar starts with
    an empty module cache (NATS up, the registry still down). Before, both stayed failed until
    the item was written again. And a tag written while its registry is down is not taken for
    the digest it resolved to before (it may have moved since)."""
    push(registry.ref("sandgate/live", "v1"), "versioned-v1")
    push(registry.ref("sandgate/live", "v2"), "versioned-v2")
    push(registry.ref("sandgate/live", "stable"), "versioned-v2")
    stable = registry.ref("sandgate/live", "stable")
    f = Fleet(tmp_path, nats, 1)
    try:
        s = f.sidecars[0]
        deploy_rbac(tmp_path, nats, registry)
        # Written as a tag (`--no-verify`: the CLI would pin it to its digest), resolved by the
        # sidecar, which remembers what it resolved to.
        fleet(nats, "put-policy", "live", stable, "--no-verify", "--wait")
        assert version(s) == (200, "2")
        fleet(nats, "put-policy", "live", registry.ref("sandgate/live", "v1"), "--wait")
        assert version(s) == (200, "1")
        # `stable` moves to v1, and the registry goes down: the fleet names `stable` again.
        push(stable, "versioned-v1")
        registry.stop()
        out = fleet(nats, "put-policy", "live", stable, "--no-verify", "--wait", check=False)
        assert out.returncode == 1 and "1 of 1 live sidecars refused" in out.stderr, out.stderr
        assert version(s) == (200, "1"), "the tag was taken for what it resolved to before"
        registry.start()
        assert wait_until(lambda: fleet_status(nats, "node-0")["errors"] == [], timeout=15), fleet_status(nats, "node-0")
        assert version(s) == (200, "1")

        registry.stop()
        out = fleet(nats, "put-policy", "live", registry.ref("sandgate/live", "v2"), "--no-verify", "--wait", check=False)
        assert out.returncode == 1 and "1 of 1 live sidecars refused" in out.stderr, out.stderr
        assert version(s) == (200, "1")
        registry.start()
        assert wait_until(lambda: version(s) == (200, "2"), timeout=15), "v2 was not loaded once the registry was back"
        assert wait_until(lambda: fleet_status(nats, "node-0")["errors"] == [], timeout=5), fleet_status(nats, "node-0")

        # Started with its module cache gone and the registry down: nothing to serve, then
        # everything once the registry is back.
        s.stop()
        shutil.rmtree(tmp_path / "node-0" / "oci")
        registry.stop()
        s = f.sidecars[0] = f.start(0)
        assert wait_until(lambda: any(e["key"] == "policy.live" for e in fleet_status(nats, "node-0").get("errors", [])), timeout=10)
        assert version(s)[0] != 200 and answer(s)[0] != 200
        time.sleep(2)
        registry.start()
        assert wait_until(lambda: version(s) == (200, "2") and answer(s) == (200, None), timeout=15), \
            f"not loaded once the registry was back: {fleet_status(nats, 'node-0')}"
    finally:
        f.stop()


def old_bucket_then_deleted(tmp_path, nats, registry, before_delete=lambda: None):
    """The RBAC policy and four revocations (revisions 1–6, every live sidecar waited for),
    then `before_delete()`, then the bucket deleted."""
    deploy_rbac(tmp_path, nats, registry)
    for jti in ["old-0", "old-1", "old-2"]:
        fleet(nats, "revoke", "--jti", jti)
    fleet(nats, "revoke", "--jti", "old-3", "--wait")
    before_delete()
    reply = json.loads(nats_request(nats, "$JS.API.STREAM.DELETE.KV_sandgate_prod"))
    assert reply.get("success"), reply


def test_a_bucket_made_again_is_read_whole_even_past_the_cached_revision(tmp_path, nats, registry):
    """A bucket deleted and made again (lost NATS storage, a rebuild) numbers its revisions
    anew. A sidecar away meanwhile that comes back once the new bucket has passed its cached
    revision used to watch on from that revision: it never read the new bucket's first items,
    a revocation among them, kept the old bucket's, and reported itself in sync. A sidecar
    connected all along gets the same new bucket."""
    f = Fleet(tmp_path, nats, 2)
    try:
        def away():
            assert answer(f.sidecars[0], jti="old-3") == (401, "token_revoked")
            # The second sidecar stays connected throughout.
            f.sidecars[0].stop()

        old_bucket_then_deleted(tmp_path, nats, registry, away)
        # The new bucket: other data at the old data's revision (1), the revocation, then
        # enough writes to pass revision 6.
        data = tmp_path / "rbac-data-2.json"
        data.write_text(json.dumps({"roles": {"reader": [{"methods": ["GET"], "paths": ["/other/**"]}]}}))
        fleet(nats, "put-data", "rbac", str(data))
        fleet(nats, "revoke", "--jti", "mallory")
        fleet(nats, "put-policy", "rbac", registry.ref("sandgate/rbac", "v1"))
        for i in range(5):
            fleet(nats, "revoke", "--jti", f"filler-{i}")

        f.sidecars[0] = f.start(0)
        for s in f.sidecars:
            # Ready at once, from its cached state (or connected all along); then it reads
            # the new bucket.
            assert wait_until(lambda: answer(s, jti="filler-4") == (401, "token_revoked"), timeout=15)
            assert answer(s, jti="mallory") == (401, "token_revoked")
            # What only the old bucket had is gone with it, and the data is the new bucket's,
            # though written at the same revision number as the old one.
            assert answer(s, jti="old-3") == (403, "forbidden")
            status, headers, _ = s.check({"Authorization": f"Bearer {token('probe')}", "X-Original-URI": "/other/x"})
            assert status == 200, headers
    finally:
        f.stop()


def test_a_bucket_made_again_below_the_applied_revision_is_noticed_by_a_connected_sidecar(tmp_path, nats, registry):
    """A bucket made again that stays below the revision a connected sidecar applied: the
    watch's consumer makes itself again on the new stream from the old revision, so nothing
    arrives, and NATS answers that the bucket is not ahead. The sidecar stayed fresh on the old
    bucket's state until the watch failed its heartbeats, allowing a token the new bucket
    revokes."""
    f = Fleet(tmp_path, nats, 1)
    try:
        old_bucket_then_deleted(tmp_path, nats, registry)
        # Three revisions, below the six applied.
        data = tmp_path / "rbac-data.json"
        fleet(nats, "put-data", "rbac", str(data))
        fleet(nats, "put-policy", "rbac", registry.ref("sandgate/rbac", "v1"))
        fleet(nats, "revoke", "--jti", "mallory")
        # Asked every 500 ms; the old code noticed only when its watch failed its heartbeats
        # (over 10 s here), allowing `mallory` meanwhile.
        s = f.sidecars[0]
        assert wait_until(lambda: answer(s, jti="mallory") == (401, "token_revoked"), timeout=5)
        assert answer(s, jti="old-3") == (200, None)
    finally:
        f.stop()
