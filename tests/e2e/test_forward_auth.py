"""Forward-auth over real sockets with tokens minted by PyJWT: every kind of bad token is a
clear deny with its own reason, never a 5xx."""

import re
import signal
import subprocess
import time

import jwt
import pytest

from conftest import AUDIENCE, ISSUER, POLICIES, free_port, wait_port


@pytest.fixture
def sandgate(start_sandgate, static_issuer, rbac_policy):
    return start_sandgate(
        issuers=[static_issuer],
        policies=[rbac_policy],
        server={"default_policy": "rbac", "identity_headers": {"x-auth-subject": "sub"}},
        revocations={"jtis": ["revoked-jti"], "subjects": ["banned-user"]},
    )


def bearer(token):
    return {"Authorization": f"Bearer {token}", "X-Original-URI": "/api/orders/7"}


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_allow_with_every_algorithm(sandgate, keys, alg):
    status, headers, _ = sandgate.check(bearer(keys.token(alg, roles=["reader"])))
    assert status == 200
    assert headers["x-user"] == "alice"
    assert headers["x-auth-subject"] == "alice"


def test_deny_by_policy_is_403_with_reason(sandgate, keys):
    status, headers, body = sandgate.check({**bearer(keys.token(roles=["reader"])), "X-Original-Method": "POST"})
    assert (status, headers["x-sandgate-reason"]) == (403, "forbidden")
    assert "no role permits POST /api/orders/7" in body


def rejected(sandgate, headers, reason):
    status, response_headers, _ = sandgate.check(headers)
    assert status == 401, (status, response_headers)
    assert response_headers["x-sandgate-reason"] == reason
    assert response_headers["www-authenticate"].startswith("Bearer")


def test_no_token(sandgate):
    rejected(sandgate, {"X-Original-URI": "/api/x"}, "missing_credential")


def test_expired(sandgate, keys):
    rejected(sandgate, bearer(keys.token(exp=int(time.time()) - 60, roles=["reader"])), "token_expired")


def test_not_yet_valid(sandgate, keys):
    rejected(sandgate, bearer(keys.token(nbf=int(time.time()) + 600, roles=["reader"])), "token_not_yet_valid")


def test_wrong_issuer(sandgate, keys):
    rejected(sandgate, bearer(keys.token(iss="https://evil.test", roles=["reader"])), "unknown_issuer")


def test_wrong_audience(sandgate, keys):
    rejected(sandgate, bearer(keys.token(aud="another-api", roles=["reader"])), "wrong_audience")


def test_missing_exp(sandgate, keys):
    rejected(sandgate, bearer(keys.token(exp=None, roles=["reader"])), "missing_claim")


def test_alg_none(sandgate):
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 600, "roles": ["reader"]}, None, algorithm="none")
    rejected(sandgate, bearer(token), "malformed_token")


def test_algorithm_confusion_hs256_signed_with_the_rsa_public_key(sandgate, keys):
    # The classic attack: an HS256 token whose HMAC secret is the RSA public key's PEM, with
    # the RSA key's kid. PyJWT refuses to do this, so sign by hand.
    import base64, hashlib, hmac, json

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    claims = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": int(time.time()) + 600, "roles": ["writer"]}).encode())
    signature = b64(hmac.new(keys.rsa_public_pem(), f"{header}.{claims}".encode(), hashlib.sha256).digest())
    rejected(sandgate, bearer(f"{header}.{claims}.{signature}"), "algorithm_mismatch")


def test_bad_signature(sandgate, keys):
    token = keys.token(roles=["reader"])
    head, body, sig = token.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}AAAA"
    rejected(sandgate, bearer(tampered), "bad_signature")


def test_unknown_kid_on_a_static_issuer(sandgate, keys):
    rejected(sandgate, bearer(keys.token(kid="nobody-knows", roles=["reader"])), "unknown_kid")


def test_revoked_jti_and_subject(sandgate, keys):
    rejected(sandgate, bearer(keys.token(jti="revoked-jti", roles=["reader"])), "token_revoked")
    rejected(sandgate, bearer(keys.token(sub="banned-user", roles=["reader"])), "token_revoked")
    status, _, _ = sandgate.check(bearer(keys.token(jti="fine-jti", roles=["reader"])))
    assert status == 200


@pytest.mark.parametrize("value", ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer not-a-jwt", "Bearer a.b.c", "Bearer ....", "Bearer " + "x" * 4000])
def test_malformed_authorization(sandgate, value):
    status, headers, _ = sandgate.check({"Authorization": value, "X-Original-URI": "/api/x"})
    assert status == 401
    assert headers["x-sandgate-reason"] in ("malformed_authorization", "malformed_token")


def test_oversized_headers_are_refused_not_a_5xx(sandgate, keys):
    status, _, _ = sandgate.check({**bearer(keys.token(roles=["reader"])), "X-Padding": "x" * 200_000})
    assert status == 431
    # and the server is still fine
    assert sandgate.check(bearer(keys.token(roles=["reader"])))[0] == 200


def test_original_request_from_every_proxy_convention(start_sandgate, static_issuer, rbac_policy, keys):
    auth = {"Authorization": f"Bearer {keys.token(roles=['reader'])}"}
    start = lambda proxy: start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"proxy": proxy, "default_policy": "rbac"})
    # Traefik / Caddy
    forwarded = start("forwarded")
    via = lambda method, uri: {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, "X-Forwarded-Host": "shop.test", "X-Forwarded-Proto": "https"}
    assert forwarded.check({**auth, **via("GET", "/api/a?x=1")})[0] == 200
    assert forwarded.check({**auth, **via("POST", "/api/a")})[0] == 403
    # nginx
    nginx = start("nginx")
    assert nginx.check({**auth, "X-Original-Method": "GET", "X-Original-URI": "/api/a"})[0] == 200
    assert nginx.check({**auth, "X-Original-Method": "DELETE", "X-Original-URI": "/api/a"})[0] == 403
    # Envoy HTTP ext_authz: the original path follows the prefix, the method is the request's
    envoy = start("envoy")
    assert envoy.check(auth, path="/auth/api/a")[0] == 200
    assert envoy.check(auth, path="/auth/api/a", method="POST")[0] == 403
    assert envoy.check(auth, path="/auth/other")[0] == 403


def test_a_missing_or_repeated_convention_header_is_a_400_never_a_default(sandgate, keys):
    auth = {"Authorization": f"Bearer {keys.token(roles=['reader'])}"}
    # nginx mode without X-Original-URI: the old behaviour checked `/` instead.
    status, headers, _ = sandgate.check({**auth, "X-Original-Method": "GET", "X-Forwarded-Host": "a", "X-Forwarded-Proto": "http"}, raw=True)
    assert (status, headers["x-sandgate-reason"]) == (400, "missing_forwarding")
    # Two Authorization headers: which one would the upstream use?
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", sandgate.port, timeout=10)
    connection.putrequest("GET", "/auth")
    for name, value in [("X-Original-Method", "GET"), ("X-Original-URI", "/api/x"), ("X-Forwarded-Host", "a"), ("X-Forwarded-Proto", "http"),
                        ("Authorization", auth["Authorization"]), ("Authorization", "Bearer other")]:
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, response.getheader("x-sandgate-reason")) == (400, "ambiguous_authorization")
    connection.close()


def test_decision_log_names_the_pinned_versions(sandgate, keys):
    sandgate.check({**bearer(keys.token(roles=["reader"])), "X-Request-Id": "req-42"})
    line = next(l for l in sandgate.decision_log() if l["client_request_id"] == "req-42")
    assert line["outcome"] == "allow" and line["policy"] == "rbac" and line["subject"] == "alice"
    assert len(line["policy_digest"]) == 64
    assert {"snapshot", "key_set", "revocations", "data", "latency_us", "reason"} <= line.keys()


def test_metrics_health_and_readiness(sandgate, keys):
    sandgate.check(bearer(keys.token(roles=["reader"])))
    sandgate.check({"X-Original-URI": "/api/x"})
    import urllib.request

    with urllib.request.urlopen(sandgate.base + "/metrics") as r:
        text = r.read().decode()
    assert 'sandgate_decisions_total{outcome="allow",reason="allow"}' in text
    assert 'sandgate_decisions_total{outcome="deny",reason="missing_credential"}' in text
    assert "sandgate_check_latency_seconds_bucket" in text
    assert "sandgate_pool_instances_in_use" in text
    with urllib.request.urlopen(sandgate.base + "/healthz") as r:
        assert r.status == 200


def test_checks_move_to_the_policy_prepared_for_its_data_and_decide_the_same(sandgate, keys):
    """The RBAC example exports `prepare`: the first check on its data starts as built and
    queues the preparation; once that is done, checks start prepared, with the same answers,
    and their records say so."""
    import time
    import urllib.request

    token = bearer(keys.token(roles=["reader"]))
    deadline = time.time() + 60
    seen = set()
    while True:
        status, headers, _ = sandgate.check({**token, "X-Request-Id": f"prep-{len(seen)}"})
        assert status == 200
        lines = [l for l in sandgate.decision_log() if l.get("client_request_id", "").startswith("prep-")]
        seen = {l.get("prepared", False) for l in lines}
        if True in seen:
            break
        assert time.time() < deadline, "checks never started from the prepared policy"
        time.sleep(0.05)
    assert all(l["outcome"] == "allow" for l in lines)
    with urllib.request.urlopen(sandgate.base + "/metrics") as r:
        text = r.read().decode()
    assert re.search(r'sandgate_policy_preparations_total\{outcome="prepared"\} [1-9]', text), text


def test_routing_by_host_and_prefix_and_unknown_is_denied(start_sandgate, static_issuer, rbac_policy, keys):
    tenant = {"id": "tenant", "module": str(POLICIES / "tenant.wasm")}
    sandgate = start_sandgate(
        issuers=[static_issuer],
        policies=[rbac_policy, tenant],
        routes=[{"host": "tenants.test", "path_prefix": "/tenants", "policy": "tenant"}, {"path_prefix": "/api", "policy": "rbac"}],
        server={"proxy": "forwarded"},
    )
    token = keys.token(tenant="acme", roles=["reader"])
    auth = {"Authorization": f"Bearer {token}", "X-Forwarded-Method": "GET", "X-Forwarded-Host": "app.test", "X-Forwarded-Proto": "https"}
    status, headers, _ = sandgate.check({**auth, "X-Forwarded-Host": "tenants.test", "X-Forwarded-Uri": "/tenants/acme/x"})
    assert (status, headers.get("x-tenant")) == (200, "acme")
    assert sandgate.check({**auth, "X-Forwarded-Host": "tenants.test", "X-Forwarded-Uri": "/tenants/globex/x"})[0] == 403
    assert sandgate.check({**auth, "X-Forwarded-Uri": "/api/x"})[0] == 200
    status, headers, _ = sandgate.check({**auth, "X-Forwarded-Uri": "/elsewhere"})
    assert (status, headers["x-sandgate-reason"]) == (403, "no_route")


def test_sigterm_finishes_in_flight_checks_and_exits(start_sandgate, static_issuer, keys, tmp_path):
    import threading

    hostile = {"id": "slow", "module": str(POLICIES / "hostile.wasm")}
    sandgate = start_sandgate(issuers=[static_issuer], policies=[hostile], server={"default_policy": "slow"}, runtime={"timeout_ms": 1500})
    results = []
    # /loop runs until its 1.5 s deadline: SIGTERM arrives while it is in flight.
    thread = threading.Thread(target=lambda: results.append(sandgate.check({"X-Original-URI": "/loop"})))
    thread.start()
    time.sleep(0.3)
    sandgate.proc.send_signal(signal.SIGTERM)
    thread.join(10)
    assert results and results[0][0] == 403 and results[0][1]["x-sandgate-reason"] == "policy_timeout"
    assert sandgate.proc.wait(timeout=10) == 0


def test_the_documented_example_config_parses_and_its_policies_load(tmp_path):
    """examples/sandgate.toml is read by the real binary (its JWKS URL is unreachable here, so
    serve it with the URL pointed at nothing and check it starts and answers)."""
    import subprocess, re
    from conftest import ROOT, SANDGATE, free_port

    text = (ROOT / "examples" / "sandgate.toml").read_text()
    text = re.sub(r'jwks_url = "[^"]+"', 'jwks_url = "http://127.0.0.1:9/jwks.json"', text)
    config = ROOT / "examples" / ".test-sandgate.toml"
    config.write_text(text)
    try:
        port = free_port()
        proc = subprocess.Popen([str(SANDGATE), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            line = ""
            while "listening" not in line:
                line = proc.stderr.readline()
                assert line, "sandgate exited on the example config"
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        config.unlink()


@pytest.mark.parametrize("path", ["/api/../admin/x", "/api//x", "/api/%2e%2e/admin", "/api/%2E%2E/admin", "/api%2fx", "/api%5Cx", "/./api/x",
                                  "/public/..;/admin", "/api;x=1/users", "/%252e%252e/admin", "/api/x%00.json",
                                  "/api/%C0%AE%C0%AE/admin", "/api%EF%BC%8Fadmin", "/%C4%B0nternal"])
def test_ambiguous_paths_are_denied_not_routed(sandgate, keys, path):
    status, headers, _ = sandgate.check({"Authorization": f"Bearer {keys.token(roles=['reader'])}", "X-Original-URI": path})
    assert (status, headers["x-sandgate-reason"]) == (400, "ambiguous_path")


def test_a_header_overriding_the_method_is_denied_not_judged_as_the_request_method(sandgate, keys):
    auth = {"Authorization": f"Bearer {keys.token(roles=['reader'])}", "X-Original-URI": "/api/orders/7"}
    # A reader may GET; an upstream honouring the override would run a DELETE.
    for name in ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"):
        status, headers, _ = sandgate.check({**auth, name: "DELETE"})
        assert (status, headers["x-sandgate-reason"]) == (400, "method_override"), name
    # Naming the request's own method changes nothing.
    assert sandgate.check({**auth, "X-HTTP-Method-Override": "get"})[0] == 200


def test_the_proxy_setting_decides_which_headers_are_read(start_sandgate, static_issuer, rbac_policy, keys):
    auth = {"Authorization": f"Bearer {keys.token(roles=['reader'])}"}
    nginx = start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"proxy": "nginx", "default_policy": "rbac"})
    # nginx sets X-Original-*; an X-Forwarded-Method/-Uri a client added is not read.
    assert nginx.check({**auth, "X-Original-Method": "POST", "X-Original-URI": "/api/x", "X-Forwarded-Method": "GET"})[0] == 403
    forwarded = start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"proxy": "forwarded", "default_policy": "rbac"})
    assert forwarded.check({**auth, "X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/x", "X-Forwarded-Host": "a", "X-Forwarded-Proto": "http",
                            "X-Original-Method": "GET"})[0] == 403


def test_a_log_reader_that_stops_reading_never_stalls_checks(tmp_path, static_issuer, rbac_policy, keys):
    """stdout is a pipe nobody reads: once the pipe and the log's queue are full, lines are
    dropped and counted, and every check and health probe is still answered."""
    import http.client

    from conftest import SANDGATE, write_config

    config = tmp_path / "c.toml"
    write_config(config, issuers=[static_issuer], policies=[rbac_policy], server={"proxy": "nginx", "default_policy": "rbac"})
    port = free_port()
    proc = subprocess.Popen([str(SANDGATE), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "sandgate")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        # ~2.5 KB a decision-log line (the logged path is cut at 2 KiB): 3,000 checks write more
        # than the pipe (64 KiB) and the log's queue (4 MiB) hold.
        headers = {"Authorization": f"Bearer {keys.token(roles=['reader'])}", "X-Original-Method": "GET",
                   "X-Original-URI": "/api/" + "a" * 4000, "X-Forwarded-Host": "app.test", "X-Forwarded-Proto": "http"}
        for _ in range(3000):
            connection.request("GET", "/auth", headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b"ok\n"
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        dropped = re.search(r"^sandgate_decision_log_dropped_total (\d+)", metrics, re.M)
        assert dropped and int(dropped.group(1)) > 0, metrics
    finally:
        proc.kill()
        proc.wait()


def test_health_and_metrics_can_have_a_listener_of_their_own(start_sandgate, static_issuer, rbac_policy):
    """With `ops_listen`, a check whose path is `/healthz` (an Envoy HTTP config without a
    `path_prefix`) is never answered 200 by the health endpoint."""
    import urllib.request

    ops_port = free_port()
    sandgate = start_sandgate(issuers=[static_issuer], policies=[rbac_policy],
                              server={"proxy": "envoy", "default_policy": "rbac", "ops_listen": f"127.0.0.1:{ops_port}"})
    for path in ["/healthz", "/readyz", "/metrics"]:
        assert sandgate.check(path=path)[0] == 404, path
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}{path}", timeout=5) as r:
            assert r.status == 200, path
