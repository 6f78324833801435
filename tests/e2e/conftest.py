"""Fixtures for Sandgate's end-to-end tests: keys and tokens minted with PyJWT (independently
of Sandgate's own code), a controllable JWKS server, a backend that echoes identity headers,
and a running `sandgate serve` on a free loopback port."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ROOT = Path(__file__).resolve().parents[2]
SANDGATE = Path(os.environ.get("SANDGATE_BINARY", ROOT / "target" / "release" / "sandgate"))  # another build: SANDGATE_BINARY=PATH
POLICIES = ROOT / "target" / "policies"
ISSUER = "https://issuer.test"
AUDIENCE = "orders-api"
HS_SECRET = "an-hs256-secret-of-at-least-32-bytes!!"


def wait_port(port, proc, what):
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


_HANDED_OUT = set()
_EPHEMERAL_LOW = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])


def free_port():
    """A port on 127.0.0.1 free now, for a listener a test starts later. Taken below the kernel's
    ephemeral range (where `bind(0)` and every outgoing connection take theirs, and could take
    this one before its listener binds it), at random, and never one handed out before in this
    run."""
    low = _EPHEMERAL_LOW
    while True:
        port = random.randrange(1024, low) if low <= 13024 else random.randrange(low - 12000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


class Keys:
    """One key per algorithm family, and helpers to mint tokens."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwk(self, private_key, kid, alg):
        public = private_key.public_key()
        algo = {"RS256": jwt.algorithms.RSAAlgorithm, "ES256": jwt.algorithms.ECAlgorithm, "EdDSA": jwt.algorithms.OKPAlgorithm}[alg]
        key = json.loads(algo.to_jwk(public))
        key.update({"kid": kid, "alg": alg, "use": "sig"})
        return key

    def jwks(self):
        return {"keys": [self.jwk(self.rsa, "rsa-1", "RS256"), self.jwk(self.ec, "ec-1", "ES256"), self.jwk(self.ed, "ed-1", "EdDSA")]}

    def private(self, alg):
        return {"RS256": (self.rsa, "rsa-1"), "ES256": (self.ec, "ec-1"), "EdDSA": (self.ed, "ed-1"), "HS256": (HS_SECRET, "hs-1")}[alg]

    def token(self, alg="RS256", kid=None, key=None, **claims):
        private, default_kid = self.private(alg)
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key if key is not None else private, algorithm=alg, headers={"kid": kid or default_kid})

    def rsa_public_pem(self):
        return self.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="session")
def keys():
    return Keys()


class JwksServer:
    """Serves a JWKS that tests can change, counts fetches, and can fail on demand."""

    def __init__(self):
        self.lock = threading.Lock()
        self.document = {"keys": []}
        self.fetches = 0
        self.served = []  # the kids of each successful answer, in order
        self.fail_next = 0
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(server.delay)
                with server.lock:
                    server.fetches += 1
                    if server.fail_next > 0:
                        server.fail_next -= 1
                        self.send_response(500)
                        self.end_headers()
                        return
                    body = json.dumps(server.document).encode()
                    server.served.append(sorted(k["kid"] for k in server.document["keys"]))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def set_keys(self, keys):
        with self.lock:
            self.document = {"keys": keys}

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture
def jwks_server():
    server = JwksServer()
    yield server
    server.stop()


class Sandgate:
    """A running `sandgate serve`."""

    def __init__(self, config_path, log_path, grpc=False, proxy=None):
        self.proxy = proxy
        self.log_file = open(log_path, "w")
        self.log_path = log_path
        self.grpc = None
        extra = ["--grpc-listen", "127.0.0.1:0"] if grpc else []
        self.proc = subprocess.Popen(
            [str(SANDGATE), "serve", "--config", str(config_path), "--listen", "127.0.0.1:0", *extra],
            stdout=self.log_file,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        self.stderr_lines = []
        address = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            g = re.search(r"ext_authz gRPC on ([0-9.:]+)", line)
            if g:
                self.grpc = g.group(1)
            m = re.search(r"listening on (http://[0-9.:]+)", line)
            if m:
                address = m.group(1)
                break
        if address is None:
            self.proc.kill()
            raise RuntimeError("sandgate did not start:\n" + "".join(self.stderr_lines) + self.proc.stderr.read())
        threading.Thread(target=self._drain, daemon=True).start()
        self.base = address
        self.port = int(address.rsplit(":", 1)[1])
        self.wait_ready()

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_ready(self):
        deadline = time.time() + 10
        ops = next((re.search(r"(http://[0-9.:]+)", l).group(1) for l in self.stderr_lines if "/healthz, /readyz and /metrics on" in l), self.base)
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(ops + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sandgate never became ready")

    def check(self, headers=None, path="/auth", method="GET", raw=False):
        """Send one forward-auth check; return (status, headers, body). Unless `raw`, a sidecar
        behind nginx gets the headers nginx always sets (method GET, URI /, host, scheme) for
        those the test does not give."""
        headers = dict(headers or {})
        if self.proxy == "nginx" and not raw:
            given = {k.lower() for k in headers}
            defaults = {"X-Original-Method": "GET", "X-Original-URI": "/", "X-Forwarded-Host": "app.test", "X-Forwarded-Proto": "http"}
            headers.update({k: v for k, v in defaults.items() if k.lower() not in given})
        request = urllib.request.Request(self.base + path, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, dict((k.lower(), v) for k, v in r.headers.items()), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict((k.lower(), v) for k, v in e.headers.items()), e.read().decode()

    def decision_log(self):
        # The sidecar's log writer writes what is queued every 10 ms: give it a few turns.
        time.sleep(0.1)
        self.log_file.flush()
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def toml_value(value):
    return json.dumps(value)  # JSON strings, numbers, arrays and booleans are valid TOML


def write_config(path, *, issuers, policies, routes=(), server=None, revocations=None, runtime=None, admin=None, registry=None, extra_toml=""):
    lines = []
    for section, values in (("server", server), ("runtime", runtime), ("revocations", revocations), ("admin", admin), ("registry", registry)):
        if values:
            lines.append(f"[{section}]")
            for k, v in values.items():
                if isinstance(v, dict):
                    continue
                lines.append(f"{k} = {toml_value(v)}")
            for k, v in values.items():
                if isinstance(v, dict):
                    lines.append(f"[{section}.{k}]")
                    lines.extend(f"{toml_value(hk)} = {toml_value(hv)}" for hk, hv in v.items())
    for issuer in issuers:
        lines.append("[[issuers]]")
        for k, v in issuer.items():
            if k != "keys":
                lines.append(f"{k} = {toml_value(v)}")
        for key in issuer.get("keys", []):
            lines.append("[[issuers.keys]]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in key.items())
    for policy in policies:
        lines.append("[[policies]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in policy.items())
    for route in routes:
        lines.append("[[routes]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in route.items())
    path.write_text("\n".join(lines) + "\n" + extra_toml)


RBAC_DATA = {
    "roles": {
        "reader": [{"methods": ["GET", "HEAD"], "paths": ["/api/**"]}],
        "writer": [{"methods": ["GET", "POST"], "paths": ["/api/**"]}],
    }
}


@pytest.fixture
def start_sandgate(tmp_path):
    """Start Sandgate with a config; every started process is stopped after the test."""
    started = []

    def start(grpc=False, **config):
        n = len(started)
        config_path = tmp_path / f"sandgate-{n}.toml"
        server = config.setdefault("server", {})
        server.setdefault("proxy", "nginx")
        write_config(config_path, **config)
        sandgate = Sandgate(config_path, tmp_path / f"decisions-{n}.log", grpc=grpc, proxy=server["proxy"])
        started.append(sandgate)
        return sandgate

    yield start
    for sandgate in started:
        sandgate.stop()


@pytest.fixture
def static_issuer(tmp_path, keys):
    """An issuer with static keys of every kind: a JWKS file, a PEM key, an HMAC secret."""
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(keys.jwks()))
    return {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256", "ES256", "EdDSA", "HS256"],
        "leeway_secs": 0,
        "keys": [{"jwks_file": str(jwks_file)}, {"kid": "hs-1", "algorithm": "HS256", "secret": HS_SECRET}],
    }


@pytest.fixture
def rbac_policy(tmp_path):
    data = tmp_path / "rbac-data.json"
    data.write_text(json.dumps(RBAC_DATA))
    return {"id": "rbac", "module": str(POLICIES / "rbac.wasm"), "data": str(data)}
