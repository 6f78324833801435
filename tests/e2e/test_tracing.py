"""OpenTelemetry: Sandgate continues its caller's trace and exports its spans over OTLP/gRPC to a
test collector (grpcio + opentelemetry-proto). Behind a real Envoy 1.40 with its OpenTelemetry
tracer pointed at the same collector, Sandgate's `sandgate.check` span is in Envoy's trace, a
child of Envoy's ext_authz span; from forward-auth headers, W3C `traceparent` and B3 parents are
followed; with tracing off nothing is sent."""

import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import POLICIES, free_port
from test_envoy import EXAMPLES, backend, start_envoy  # noqa: F401  (fixture)
from test_proxies import get


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span as a dict."""

    def __init__(self):
        self.spans = []
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "")
            # xds-protos ships an older copy of these protos in the same package: field 2 is
            # `instrumentation_library_spans` there, the same wire layout as `scope_spans`.
            scopes = resource_spans.scope_spans if hasattr(resource_spans, "scope_spans") else resource_spans.instrumentation_library_spans
            for scope in scopes:
                for span in scope.spans:
                    self.spans.append({
                        "service": service,
                        "name": span.name,
                        "trace": span.trace_id.hex(),
                        "id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "attributes": {a.key: a.value for a in span.attributes},
                    })
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self.spans):
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        self.server.stop(0)


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def tracing_toml(collector):
    return f'[tracing]\notlp_endpoint = "http://127.0.0.1:{collector.port}"\n'


def check_spans(spans, trace):
    """The sandgate.check span of `trace` and its children by name."""
    root = next(s for s in spans if s["name"] == "sandgate.check" and s["trace"] == trace)
    children = {s["name"]: s for s in spans if s["parent"] == root["id"]}
    return root, children


def test_sandgate_spans_are_children_of_envoys_ext_authz_span(tmp_path, collector, start_sandgate, static_issuer, rbac_policy, backend, keys):  # noqa: F811
    sandgate = start_sandgate(grpc=True, issuers=[static_issuer], policies=[rbac_policy],
                              server={"proxy": "envoy", "default_policy": "rbac"}, extra_toml=tracing_toml(collector))
    ports = {8000: free_port(), 8080: backend.port, 8183: int(sandgate.grpc.rsplit(":", 1)[1]), 4317: collector.port}
    envoy = start_envoy(tmp_path, EXAMPLES / "envoy-grpc-tracing.yaml", ports)
    try:
        status, _ = get(f"http://127.0.0.1:{ports[8000]}/api/orders", {"Authorization": f"Bearer {keys.token(roles=['reader'])}"})
        assert status == 200
        sandgate.stop()  # flushes Sandgate's spans
        assert collector.wait_for(lambda spans: any(s["service"] == "envoy" for s in spans) and any(s["name"] == "sandgate.check" for s in spans)), collector.spans
        check = next(s for s in collector.spans if s["name"] == "sandgate.check")
        envoy_spans = {s["id"]: s for s in collector.spans if s["service"] == "envoy" and s["trace"] == check["trace"]}
        assert check["parent"] in envoy_spans, (check, collector.spans)
        parent = envoy_spans[check["parent"]]
        assert "ext_authz" in parent["name"] or "Authorization" in parent["name"] or parent["name"].startswith("async"), parent
        _, children = check_spans(collector.spans, check["trace"])
        assert set(children) == {"sandgate.authenticate", "sandgate.instantiate", "sandgate.evaluate", "sandgate.answer"}, children
        assert check["attributes"]["sandgate.outcome"].string_value == "allow"
        assert children["sandgate.authenticate"]["attributes"]["sandgate.token_cache"].string_value in ("hit", "miss")
    finally:
        envoy.terminate()
        envoy.wait(10)


def test_w3c_and_b3_parents_from_forward_auth_headers_and_nothing_when_off(collector, start_sandgate, static_issuer, rbac_policy, keys):
    sandgate = start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"default_policy": "rbac"}, extra_toml=tracing_toml(collector))
    token = keys.token(roles=["reader"])
    w3c_trace, b3_trace = "4bf92f3577b34da6a3ce929d0e0e4736", "80f198ee56343ba864fe8b2a57d3eff7"
    sandgate.check({"Authorization": f"Bearer {token}", "X-Original-URI": "/api/x", "traceparent": f"00-{w3c_trace}-00f067aa0ba902b7-01"})
    sandgate.check({"Authorization": "Bearer nope", "X-Original-URI": "/api/x", "b3": f"{b3_trace}-e457b5a2e4d86bd1-1"})
    # Not sampled by the caller: not exported.
    sandgate.check({"X-Original-URI": "/api/x", "traceparent": "00-11111111111111111111111111111111-00f067aa0ba902b7-00"})
    sandgate.stop()
    assert collector.wait_for(lambda spans: sum(s["name"] == "sandgate.check" for s in spans) >= 2)
    root, children = check_spans(collector.spans, w3c_trace)
    assert root["parent"] == "00f067aa0ba902b7" and set(children) >= {"sandgate.authenticate", "sandgate.evaluate"}
    root, _ = check_spans(collector.spans, b3_trace)
    assert root["parent"] == "e457b5a2e4d86bd1" and root["attributes"]["sandgate.outcome"].string_value == "deny"
    assert not any(s["trace"] == "1" * 32 for s in collector.spans)

    # Tracing off: nothing reaches the collector.
    collector.spans.clear()
    plain = start_sandgate(issuers=[static_issuer], policies=[rbac_policy], server={"default_policy": "rbac"})
    plain.check({"Authorization": f"Bearer {token}", "X-Original-URI": "/api/x", "traceparent": f"00-{w3c_trace}-00f067aa0ba902b7-01"})
    plain.stop()
    time.sleep(1)
    assert collector.spans == []
