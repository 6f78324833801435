"""Envoy ext_authz over gRPC, tested with a client generated from Envoy's own protos (the
`xds-protos` package): allow with identity headers, deny with status and body, malformed
requests, and gRPC health checking."""

import time

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

OK, INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED = 0, 3, 7, 16


@pytest.fixture
def sandgate(start_sandgate, static_issuer, rbac_policy):
    return start_sandgate(grpc=True, issuers=[static_issuer], policies=[rbac_policy],
                          server={"default_policy": "rbac", "identity_headers": {"x-auth-subject": "sub", "x-auth-tenant": "tenant"}})


@pytest.fixture
def stub(sandgate):
    channel = grpc.insecure_channel(sandgate.grpc)
    yield external_auth_pb2_grpc.AuthorizationStub(channel)
    channel.close()


def check_request(method="GET", path="/api/orders/7", headers=None, host="shop.test", body=""):
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, host=host, scheme="https", headers={":path": path, ":method": method, **(headers or {})}, body=body)
    source = attribute_context_pb2.AttributeContext.Peer(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.1.2.3", port_value=5555)))
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(source=source, request=attribute_context_pb2.AttributeContext.Request(http=http)))


def headers_of(options):
    return {o.header.key: o.header.value for o in options}


def test_allow_carries_identity_headers_to_set(stub, keys):
    token = keys.token(roles=["reader"])
    response = stub.Check(check_request(headers={"authorization": f"Bearer {token}", "x-user": "forged"}))
    assert response.status.code == OK
    assert response.HasField("ok_response")
    headers = headers_of(response.ok_response.headers)
    assert headers["x-user"] == "alice" and headers["x-auth-subject"] == "alice"
    overwrite = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    assert all(o.append_action == overwrite for o in response.ok_response.headers), "identity must overwrite what the client sent"
    # The token has no tenant claim: Envoy is told to remove any x-auth-tenant the client sent.
    assert "x-auth-tenant" in response.ok_response.headers_to_remove


def test_deny_carries_the_policy_status_and_body(stub, keys):
    token = keys.token(roles=["reader"])
    response = stub.Check(check_request(method="DELETE", headers={"authorization": f"Bearer {token}"}))
    assert response.status.code == PERMISSION_DENIED
    denied = response.denied_response
    assert denied.status.code == 403
    assert "no role permits DELETE /api/orders/7" in denied.body
    assert headers_of(denied.headers)["x-sandgate-reason"] == "forbidden"


def test_no_token_is_unauthenticated_with_a_challenge(stub):
    response = stub.Check(check_request())
    assert response.status.code == UNAUTHENTICATED
    assert response.denied_response.status.code == 401
    headers = headers_of(response.denied_response.headers)
    assert headers["www-authenticate"] == "Bearer" and headers["x-sandgate-reason"] == "missing_credential"


def test_path_with_query_is_split(stub, sandgate, keys):
    token = keys.token(roles=["reader"])
    stub.Check(check_request(path="/api/search?q=x&page=2", headers={"authorization": f"Bearer {token}", "x-request-id": "grpc-q"}))
    line = next(l for l in sandgate.decision_log() if l["client_request_id"] == "grpc-q")
    assert line["path"] == "/api/search" and line["outcome"] == "allow"


def test_malformed_requests_are_denied_and_recorded(stub, keys, sandgate):
    refused = []
    for request in (external_auth_pb2.CheckRequest(), external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext())):
        response = stub.Check(request)
        assert response.status.code == INVALID_ARGUMENT
        assert response.denied_response.status.code == 400
        refused.append(response)
    token = keys.token(roles=["reader"])
    huge = stub.Check(check_request(headers={"authorization": f"Bearer {token}", "x-padding": "x" * 100_000}))
    assert huge.status.code == INVALID_ARGUMENT and huge.denied_response.status.code == 431
    refused.append(huge)
    # Each refusal is a decision like any other: its reason code and request id in the answer,
    # and a decision-log line under that id.
    answered = [headers_of(r.denied_response.headers) for r in refused]
    assert [h["x-sandgate-reason"] for h in answered] == ["malformed_check_request"] * 2 + ["headers_too_large"]
    ids = [h["x-sandgate-request-id"] for h in answered]
    deadline = time.time() + 5
    while True:
        lines = {l["request_id"]: l for l in sandgate.decision_log()}
        if all(i in lines for i in ids) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert [(lines[i]["outcome"], lines[i]["status"], lines[i]["reason"]) for i in ids if i in lines] == [
        ("deny", 400, "malformed_check_request"), ("deny", 400, "malformed_check_request"), ("deny", 431, "headers_too_large")]


def test_a_check_message_over_one_mib_is_refused_before_it_is_read(stub, keys):
    # Each such message used to be buffered up to tonic's 4 MiB default, for every stream of
    # a connection still sending one.
    token = keys.token(roles=["reader"])
    with pytest.raises(grpc.RpcError) as refused:
        stub.Check(check_request(headers={"authorization": f"Bearer {token}"}, body="x" * (1 << 20)))
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    # A body well under the cap is still checked.
    response = stub.Check(check_request(headers={"authorization": f"Bearer {token}"}, body="x" * (512 << 10)))
    assert response.status.code == OK


def test_health(sandgate):
    with grpc.insecure_channel(sandgate.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
