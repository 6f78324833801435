"""Role-based access from a data document: the RBAC example policy, in Python.

The same rules as `guest-policies/rbac` (Rust), and the same fixtures pass through
`sandgate test`. Built with componentize-py against the SDK's WIT:

    componentize-py -d guest-policies/sdk/wit -w authorizer componentize app \
        -p guest-policies/rbac-python --stub-wasi -o target/policies/rbac-python.wasm

(`--stub-wasi`: CPython imports `wasi:sockets`, which Sandgate refuses; stubbed, the component
imports only the contract.)

The token's `roles` claim names roles; the data document says what each role may do:
`{"roles": {"reader": [{"methods": ["GET"], "paths": ["/api/**"]}]}}`. A request is allowed
when any rule of any of the caller's roles matches its method and path.
"""

import json

from wit_world import exports
from wit_world.imports import host, request
from wit_world.imports.types import (
    AllowResponse,
    Credential_Rejected,
    Credential_Verified,
    Decision_Allow,
    Decision_Deny,
    DenyResponse,
    Header,
)


def deny(status, reason, message, headers=()):
    return Decision_Deny(DenyResponse(status, reason, message, list(headers)))


def match_path(pattern, path):
    """`/api/**` matches any rest, `*` and `{name}` one non-empty segment; `**` before the end
    matches nothing (as the Rust SDK's `match_path`)."""
    if not pattern.startswith("/") or not path.startswith("/"):
        return False
    segments = path[1:].split("/")
    parts = pattern[1:].split("/")
    for i, part in enumerate(parts):
        if part == "**":
            return i == len(parts) - 1
        if i >= len(segments):
            return False
        segment = segments[i]
        if part == "*" or (part.startswith("{") and part.endswith("}")):
            if not segment:
                return False
        elif part != segment:
            return False
    return len(segments) == len(parts)


def role_pointer(role):
    """The JSON pointer (RFC 6901) of a role's rules: `/roles/<role>`, the role escaped."""
    return "/roles/" + role.replace("~", "~0").replace("/", "~1")


def permits(rule, method, path):
    methods = rule.get("methods", [])
    return any(m == "*" or m.upper() == method.upper() for m in methods) and any(
        match_path(p, path) for p in rule.get("paths", [])
    )


class Policy(exports.Policy):
    def check(self):
        # The request is read from the host part by part: only what this policy needs.
        credential = request.credential()
        if isinstance(credential, Credential_Rejected):
            error = credential.value
            return deny(401, error.reason, error.message, [Header("www-authenticate", "Bearer")])
        if not isinstance(credential, Credential_Verified):
            return deny(401, "missing_credential", "a bearer token is required", [Header("www-authenticate", "Bearer")])
        claims = credential.value.claims
        method, path = request.method(), request.path()
        for role in claims.roles:
            text = host.data_get(role_pointer(role))
            if text is None:
                continue
            try:
                rules = json.loads(text)
            except ValueError:
                continue
            if any(isinstance(rule, dict) and permits(rule, method, path) for rule in rules):
                return Decision_Allow(
                    AllowResponse([Header("x-user", claims.subject), Header("x-roles", ",".join(claims.roles))], [])
                )
        return deny(403, "forbidden", f"no role permits {method} {path}")
