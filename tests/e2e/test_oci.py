"""Policies as OCI artifacts, against the real CNCF distribution registry (Debian's
`docker-registry`), started here on loopback ports with temporary storage: push → serve from
`oci://` → move the tag and hot-load through the admin API → the new digest in the decision
log; restart with the registry down → start from the module cache; and every fault (unknown
tag, wrong media type, a corrupted blob, an oversized layer, the registry down, wrong
credentials) refused with a clear error while the previous version keeps serving."""

import base64
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import bcrypt
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ISSUER, POLICIES, SANDGATE, Sandgate, free_port, wait_port, write_config
from test_admin import TOKEN, admin

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
USER, PASSWORD = "sandgate", "registry-password-for-tests"


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Tls:
    """A CA made for the test, and a server certificate it signed for 127.0.0.1 and localhost."""

    def __init__(self, directory):
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandgate test CA")])
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name).public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))
        self.cert_file = directory / "server.pem"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = directory / "server-key.pem"
        self.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


class Registry:
    """`docker-registry serve` on a free loopback port; anonymous, or with htpasswd behind TLS,
    or with the bearer-token flow (`auth: token`)."""

    def __init__(self, directory, tls=None, htpasswd=False, token_auth=None):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        config = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {directory / 'storage'}",
            "http:",
            f"  addr: {self.host}",
        ]
        if tls:
            config += ["  tls:", f"    certificate: {tls.cert_file}", f"    key: {tls.key_file}"]
        if htpasswd:
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
            (directory / "htpasswd").write_text(f"{USER}:{hashed}\n")
            config += ["auth:", "  htpasswd:", "    realm: sandgate-test", f"    path: {directory / 'htpasswd'}"]
        if token_auth:
            config += [
                "auth:",
                "  token:",
                f"    realm: {token_auth.url}",
                "    service: sandgate-test-registry",
                f"    issuer: {token_auth.issuer}",
                f"    rootcertbundle: {token_auth.bundle}",
            ]
        self.config = directory / "config.yml"
        self.config.write_text("\n".join(config) + "\n")
        self.proc = None
        self.start()

    def start(self):
        self.log = open(self.directory / "registry.log", "a")
        self.proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "docker-registry")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()

    def ref(self, repository, tag=None, digest_=None):
        return f"oci://{self.host}/{repository}" + (f":{tag}" if tag else "") + (f"@{digest_}" if digest_ else "")

    # Raw pushes, to make artifacts `sandgate push` never would (other media types, big layers).
    def _request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, timeout=30)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), data

    def push_blob(self, repository, data):
        status, headers, body = self._request("POST", f"/v2/{repository}/blobs/uploads/")
        assert status == 202, body
        location = headers["Location"]
        location = location.split(self.host, 1)[-1]
        separator = "&" if "?" in location else "?"
        status, _, body = self._request("PUT", f"{location}{separator}digest={digest(data)}", data, {"Content-Type": "application/octet-stream"})
        assert status == 201, body
        return {"digest": digest(data), "size": len(data)}

    def push_artifact(self, repository, tag, layer, config_type, layer_type, config=None, annotations=None):
        config = config or json.dumps({"architecture": "wasm", "os": "wasip1"}).encode()
        layer_descriptor = {"mediaType": layer_type, **self.push_blob(repository, layer)}
        if annotations:
            layer_descriptor["annotations"] = annotations
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": config_type, **self.push_blob(repository, config)},
            "layers": [layer_descriptor],
        }).encode()
        status, _, body = self._request("PUT", f"/v2/{repository}/manifests/{tag}", manifest, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert status == 201, body
        return digest(manifest)


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path / "registry")
    yield r
    r.stop()


def push(reference, policy, *extra, password=None):
    """`sandgate push`; returns the manifest digest it prints."""
    out = subprocess.run([str(SANDGATE), "push", str(POLICIES / f"{policy}.wasm"), reference, *extra], input=password, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def sidecar_config(tmp_path, module, *, cache_dir, registry=None, admin_port=None, extra_toml="", allowed=None):
    config = {
        "issuers": [{"issuer": ISSUER, "algorithms": ["HS256"], "keys": [{"kid": "k", "algorithm": "HS256", "secret": "an-hs256-secret-of-at-least-32-bytes!!"}]}],
        "policies": [{"id": "live", "module": module}],
        "server": {"proxy": "nginx", "default_policy": "live"},
        "registry": {"cache_dir": str(cache_dir), **(registry or {})},
        "extra_toml": extra_toml,
    }
    if admin_port:
        config["admin"] = {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN, **({"allowed_digests": allowed} if allowed else {})}
    return config


def start(tmp_path, name, config):
    path = tmp_path / f"{name}.toml"
    write_config(path, **config)
    s = Sandgate(path, tmp_path / f"{name}-decisions.log", proxy="nginx")
    if "admin" in config:
        s.admin = f"http://{config['admin']['listen']}"
    return s


def version(sandgate):
    status, headers, _ = sandgate.check({"X-Original-URI": "/x"})
    return status, headers.get("x-policy-version")


def snapshot_policy(sandgate):
    status, body = admin(sandgate, "GET", "/v1/snapshot")
    assert status == 200
    return next(p for p in body["policies"] if p["id"] == "live")


def test_push_serve_move_the_tag_hot_load_and_restart_from_cache(tmp_path, registry):
    cache = tmp_path / "cache"
    v1 = push(registry.ref("sandgate/live", "stable"), "versioned-v1")
    assert v1.startswith("sha256:") and len(v1) == 71
    # Pushing the same module again gives the same manifest: the digest names the module.
    assert push(registry.ref("sandgate/live", "again"), "versioned-v1") == v1

    port = free_port()
    config = sidecar_config(tmp_path, registry.ref("sandgate/live", "stable"), cache_dir=cache, admin_port=port)
    s = start(tmp_path, "first", config)
    try:
        assert version(s) == (200, "1")
        policy = snapshot_policy(s)
        assert policy["source"] == registry.ref("sandgate/live", digest_=v1)
        assert policy["requested"] == registry.ref("sandgate/live", "stable")
        assert policy["digest"] == digest((POLICIES / "versioned-v1.wasm").read_bytes())[7:]
        line = s.decision_log()[-1]
        assert line["policy_source"] == registry.ref("sandgate/live", digest_=v1)

        # Move the tag; nothing changes until an operator asks for it.
        v2 = push(registry.ref("sandgate/live", "stable"), "versioned-v2")
        assert v2 != v1
        assert version(s) == (200, "1")
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "stable")})
        assert status == 200, body
        assert version(s) == (200, "2")
        assert snapshot_policy(s)["source"] == registry.ref("sandgate/live", digest_=v2)
        assert s.decision_log()[-1]["policy_source"] == registry.ref("sandgate/live", digest_=v2)

        # Pinned by digest: back to v1 (a rollback needs no tag).
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", digest_=v1)})
        assert status == 200, body
        assert version(s) == (200, "1")
    finally:
        s.stop()

    # The registry goes away; a restart starts from the cache: the tag by the digest it last
    # resolved to (v2), a digest reference without asking anyone.
    registry.stop()
    s = start(tmp_path, "cached-tag", config)
    try:
        assert version(s) == (200, "2")
        assert snapshot_policy(s)["source"] == registry.ref("sandgate/live", digest_=v2)
        assert any("last resolved to" in line for line in s.stderr_lines), "".join(s.stderr_lines)
    finally:
        s.stop()
    pinned = sidecar_config(tmp_path, registry.ref("sandgate/live", digest_=v1), cache_dir=cache)
    s = start(tmp_path, "cached-digest", pinned)
    try:
        assert version(s) == (200, "1")
    finally:
        s.stop()

    # A module that never was cached cannot start a sidecar while the registry is down.
    with pytest.raises(RuntimeError, match="unreachable"):
        start(tmp_path, "never-pulled", sidecar_config(tmp_path, registry.ref("sandgate/other", "v1"), cache_dir=cache))


def test_offline_uses_only_the_cache(tmp_path, registry):
    cache = tmp_path / "cache"
    d = push(registry.ref("sandgate/live", "v1"), "versioned-v2")
    # Seed the cache with `sandgate pull --cache-dir`, as an init container would.
    out = subprocess.run([str(SANDGATE), "pull", registry.ref("sandgate/live", "v1"), "--out", str(tmp_path / "p.wasm"), "--cache-dir", str(cache)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == d, out.stderr
    assert (tmp_path / "p.wasm").read_bytes() == (POLICIES / "versioned-v2.wasm").read_bytes()
    # Offline: the registry is up, and the tag has moved there since; the sidecar never asks
    # and serves the digest the cache holds for the tag.
    push(registry.ref("sandgate/live", "v1"), "versioned-v1")
    config = sidecar_config(tmp_path, registry.ref("sandgate/live", "v1"), cache_dir=cache, registry={"offline": True})
    s = start(tmp_path, "offline", config)
    try:
        assert version(s) == (200, "2")
    finally:
        s.stop()
    config = sidecar_config(tmp_path, registry.ref("sandgate/live", "v9"), cache_dir=cache, registry={"offline": True})
    with pytest.raises(RuntimeError, match="is not in the cache"):
        start(tmp_path, "offline-miss", config)


class CorruptingProxy:
    """Forwards to the registry, flipping one byte of every blob it passes on."""

    def __init__(self, upstream):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                conn = http.client.HTTPConnection(upstream, timeout=30)
                conn.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                response = conn.getresponse()
                body = response.read()
                if "/blobs/" in self.path and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def test_every_fault_is_a_clear_error_and_the_old_version_keeps_serving(tmp_path, registry):
    good = push(registry.ref("sandgate/live", "good"), "versioned-v1")
    push(registry.ref("sandgate/live", "next"), "versioned-v2")
    # Kubewarden's older layout (config v1, layer vnd.wasm.content.layer.v1+wasm) is accepted…
    legacy = registry.push_artifact("sandgate/legacy", "v1", (POLICIES / "versioned-v2.wasm").read_bytes(), "application/vnd.wasm.config.v1+json", "application/vnd.wasm.content.layer.v1+wasm")
    # …a container image is not, nor a Wasm layer bigger than the limit (1 MiB here).
    registry.push_artifact("sandgate/image", "v1", b"\x1f\x8b not a module", "application/vnd.oci.image.config.v1+json", "application/vnd.oci.image.layer.v1.tar+gzip")
    registry.push_artifact("sandgate/big", "v1", b"\0asm" + os.urandom(1_100_000), "application/vnd.wasm.config.v0+json", "application/wasm")
    proxy = CorruptingProxy(registry.host)
    port = free_port()
    config = sidecar_config(tmp_path, registry.ref("sandgate/live", "good"), cache_dir=tmp_path / "cache", admin_port=port, registry={"max_module_mib": 1, "plain_http": [proxy.host]})
    s = start(tmp_path, "faults", config)
    try:
        assert version(s) == (200, "1")
        before = snapshot_policy(s)
        faults = [
            (registry.ref("sandgate/live", "missing"), 404, "is not in the registry"),
            (registry.ref("sandgate/image", "v1"), 422, "not a Wasm policy artifact: its config media type is `application/vnd.oci.image.config.v1+json`"),
            (registry.ref("sandgate/big", "v1"), 422, "over the 1048576-byte limit"),
            (f"oci://{proxy.host}/sandgate/live:next", 502, "module layer does not match its digest"),
            (f"oci://127.0.0.1:{free_port()}/sandgate/live:next", 502, "is unreachable"),
            ("oci://127.0.0.1/sandgate/live", 400, "no tag or digest"),
            ("/etc/passwd", 400, "does not read files"),
        ]
        for reference, status, message in faults:
            got, body = admin(s, "PUT", "/v1/policies/live", {"module": reference})
            assert (got, message in body.get("error", "")) == (status, True), (reference, got, body)
            assert snapshot_policy(s) == before, reference
            assert version(s) == (200, "1"), reference
        # Nothing the corrupting proxy served entered the cache.
        for blob in (tmp_path / "cache" / "blobs" / "sha256").iterdir():
            assert digest(blob.read_bytes()) == "sha256:" + blob.name
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/legacy", digest_=legacy)})
        assert status == 200, body
        assert version(s) == (200, "2")
        # The registry down: refused, still serving.
        registry.stop()
        got, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "next")})
        assert got == 502 and "is unreachable" in body["error"], body
        assert version(s) == (200, "2")
        # A digest the cache holds needs no registry.
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", digest_=good)})
        assert status == 200, body
        assert version(s) == (200, "1")
    finally:
        s.stop()
        proxy.stop()


def test_the_allow_list_takes_oci_digests(tmp_path, registry):
    allowed = push(registry.ref("sandgate/live", "v1"), "versioned-v1")
    other = push(registry.ref("sandgate/live", "v2"), "versioned-v2")
    port = free_port()
    config = sidecar_config(tmp_path, str(POLICIES / "versioned-v1.wasm"), cache_dir=tmp_path / "cache", admin_port=port, allowed=[allowed])
    s = start(tmp_path, "allow-list", config)
    try:
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "v1")})
        assert status == 200, body
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "v2")})
        assert status == 422 and f"`{other}` is not in the allowed_digests list" in body["error"], body
        assert snapshot_policy(s)["source"] == registry.ref("sandgate/live", digest_=allowed)
    finally:
        s.stop()
    # A tag in the configuration is held to the list too: it may have moved since.
    config = sidecar_config(tmp_path, registry.ref("sandgate/live", "v2"), cache_dir=tmp_path / "cache", admin_port=free_port(), allowed=[allowed])
    with pytest.raises(RuntimeError, match="is not in the allowed_digests list"):
        start(tmp_path, "allow-list-start", config)


def test_modules_come_only_from_allowed_registries(tmp_path, registry):
    push(registry.ref("sandgate/live", "v1"), "versioned-v2")
    port = free_port()
    config = sidecar_config(tmp_path, str(POLICIES / "versioned-v1.wasm"), cache_dir=tmp_path / "cache", admin_port=port, registry={"allowed_registries": ["registry.example"]})
    s = start(tmp_path, "allowed-registries", config)
    try:
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "v1")})
        assert status == 409 and "not in [registry] allowed_registries" in body["error"], body
        assert version(s) == (200, "1")
    finally:
        s.stop()


def test_htpasswd_behind_tls_with_a_private_ca(tmp_path):
    tls = Tls(tmp_path)
    registry = Registry(tmp_path / "registry", tls=tls, htpasswd=True)
    try:
        reference = registry.ref("sandgate/live", "v1")
        tls_flags = ["--tls", "--ca-file", str(tls.ca_file)]
        pushed = push(reference, "versioned-v2", *tls_flags, "--username", USER, "--password-stdin", password=PASSWORD + "\n")
        # Without the CA the registry's certificate is not trusted; without credentials, refused.
        out = subprocess.run([str(SANDGATE), "pull", reference, "--out", str(tmp_path / "x.wasm"), "--tls"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "certificate" in out.stderr.lower(), out.stderr
        out = subprocess.run([str(SANDGATE), "pull", reference, "--out", str(tmp_path / "x.wasm"), *tls_flags], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "refused access" in out.stderr, out.stderr

        password_file = tmp_path / "registry-password"
        password_file.write_text(PASSWORD + "\n")
        credentials = f'[[registry.credentials]]\nregistry = "{registry.host}"\nusername = "{USER}"\npassword_file = "{password_file}"\n'
        settings = {"tls": [registry.host], "ca_file": str(tls.ca_file)}
        s = start(tmp_path, "tls", sidecar_config(tmp_path, reference, cache_dir=tmp_path / "cache", registry=settings, extra_toml=credentials))
        try:
            assert version(s) == (200, "2")
            assert s.decision_log()[-1]["policy_source"] == registry.ref("sandgate/live", digest_=pushed)
        finally:
            s.stop()
        wrong = credentials.replace(str(password_file), str(tmp_path / "wrong"))
        (tmp_path / "wrong").write_text("not-the-password\n")
        with pytest.raises(RuntimeError, match="refused access"):
            start(tmp_path, "tls-wrong", sidecar_config(tmp_path, reference, cache_dir=tmp_path / "cache2", registry=settings, extra_toml=wrong))
    finally:
        registry.stop()


class TokenService:
    """The registry's bearer-token flow: a token endpoint that takes basic credentials and
    answers a JWT granting the scopes asked for, signed by a key whose certificate the registry
    trusts (`rootcertbundle`)."""

    def __init__(self, directory):
        self.issuer = "sandgate-test-token-service"
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = directory / "token-signer.pem"
        directory.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                from urllib.parse import parse_qs, urlparse
                query = parse_qs(urlparse(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                service.requests.append(query.get("scope", []))
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                now = int(time.time())
                x5c = base64.b64encode(service.cert.public_bytes(serialization.Encoding.DER)).decode()
                token = jwt.encode(
                    {"iss": service.issuer, "sub": USER, "aud": query["service"][0], "iat": now, "nbf": now - 5, "exp": now + 300, "jti": os.urandom(8).hex(), "access": access},
                    service.key, algorithm="ES256", headers={"x5c": [x5c]},
                )
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def test_the_bearer_token_flow(tmp_path):
    service = TokenService(tmp_path / "token")
    registry = Registry(tmp_path / "registry", token_auth=service)
    try:
        reference = registry.ref("sandgate/live", "v1")
        pushed = push(reference, "versioned-v2", "--username", USER, "--password-stdin", password=PASSWORD + "\n")
        assert any("repository:sandgate/live:pull,push" in s for scopes in service.requests for s in scopes), service.requests
        credentials = f'[[registry.credentials]]\nregistry = "{registry.host}"\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
        s = start(tmp_path, "bearer", sidecar_config(tmp_path, reference, cache_dir=tmp_path / "cache", extra_toml=credentials))
        try:
            assert version(s) == (200, "2")
            assert s.decision_log()[-1]["policy_source"] == registry.ref("sandgate/live", digest_=pushed)
        finally:
            s.stop()
        with pytest.raises(RuntimeError, match="refused access"):
            start(tmp_path, "bearer-anonymous", sidecar_config(tmp_path, reference, cache_dir=tmp_path / "cache2"))
    finally:
        registry.stop()
        service.stop()


def cosign_sign(registry, repository, signed_digest, key, attach_to=None, identity=None):
    """A signature in cosign's `.sig` tag layout (what `cosign sign --key` pushes): a simple
    signing payload naming `signed_digest`, its ECDSA P-256 signature in the layer's
    `dev.cosignproject.cosign/signature` annotation, at tag `sha256-<hex>.sig` of `attach_to`
    (default: the signed digest itself)."""
    payload = json.dumps({
        "critical": {
            "identity": {"docker-reference": identity or f"{registry.host}/{repository}"},
            "image": {"docker-manifest-digest": signed_digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }).encode()
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    config = json.dumps({"architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z", "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "", "rootfs": {"type": "layers", "diff_ids": [digest(payload)]}}).encode()
    tag = (attach_to or signed_digest).replace("sha256:", "sha256-") + ".sig"
    registry.push_artifact(repository, tag, payload, "application/vnd.oci.image.config.v1+json", "application/vnd.dev.cosign.simplesigning.v1+json", config=config, annotations={"dev.cosignproject.cosign/signature": signature})


def public_pem(path, key):
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_cosign_signatures_by_a_configured_key(tmp_path, registry):
    trusted, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    trusted_pem = public_pem(tmp_path / "cosign.pub", trusted)
    signed = push(registry.ref("sandgate/live", "signed"), "versioned-v1")
    cosign_sign(registry, "sandgate/live", signed, trusted)
    by_other = push(registry.ref("sandgate/live", "other"), "tenant")
    cosign_sign(registry, "sandgate/live", by_other, other)
    unsigned = push(registry.ref("sandgate/live", "unsigned"), "allow-all")
    # A replay: the trusted key's signature of `signed` hung on the unsigned artifact.
    cosign_sign(registry, "sandgate/live", signed, trusted, attach_to=unsigned)

    cache = tmp_path / "cache"
    port = free_port()
    config = sidecar_config(tmp_path, registry.ref("sandgate/live", "signed"), cache_dir=cache, admin_port=port, registry={"cosign_public_keys": [str(trusted_pem)]})
    s = start(tmp_path, "cosign", config)
    try:
        assert version(s) == (200, "1")
        for tag, message in [("other", "none by a configured key"), ("unsigned", "no signature of this manifest digest")]:
            status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", tag)})
            assert status == 422 and "has no valid cosign signature" in body["error"] and message in body["error"], (tag, body)
            assert version(s) == (200, "1")
        fresh = push(registry.ref("sandgate/live", "fresh"), "versioned-v2")
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "fresh")})
        assert status == 422 and "no signature of this manifest digest" in body["error"], body
        # Signed by the trusted key, but for another repository: not a signature of this one.
        cosign_sign(registry, "sandgate/live", fresh, trusted, identity=f"{registry.host}/elsewhere/module")
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "fresh")})
        assert status == 422 and "no signature of this manifest digest in this repository" in body["error"], body
        cosign_sign(registry, "sandgate/live", fresh, trusted)
        status, body = admin(s, "PUT", "/v1/policies/live", {"module": registry.ref("sandgate/live", "fresh")})
        assert status == 200, body
        assert version(s) == (200, "2")
    finally:
        s.stop()

    # `sandgate pull --cosign-key` checks the same way.
    out = subprocess.run([str(SANDGATE), "pull", registry.ref("sandgate/live", "other"), "--out", str(tmp_path / "o.wasm"), "--cosign-key", str(trusted_pem)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "none by a configured key" in out.stderr, out.stderr
    # Seed a second cache without checking signatures, then stop the registry: a sidecar that
    # requires signatures does not trust what it cannot tell was signed; the first cache,
    # filled by a sidecar that checked, still starts one.
    unchecked = tmp_path / "unchecked-cache"
    out = subprocess.run([str(SANDGATE), "pull", registry.ref("sandgate/live", "unsigned"), "--out", str(tmp_path / "u.wasm"), "--cache-dir", str(unchecked)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    registry.stop()
    with pytest.raises(RuntimeError, match="unreachable"):
        start(tmp_path, "cosign-unchecked", sidecar_config(tmp_path, registry.ref("sandgate/live", digest_=unsigned), cache_dir=unchecked, registry={"cosign_public_keys": [str(trusted_pem)]}))
    s = start(tmp_path, "cosign-cached", sidecar_config(tmp_path, registry.ref("sandgate/live", digest_=signed), cache_dir=cache, registry={"cosign_public_keys": [str(trusted_pem)]}))
    try:
        assert version(s) == (200, "1")
    finally:
        s.stop()
