"""A fleet on a 3-node NATS cluster (Debian's `nats-server`, three processes on loopback ports,
JetStream replicated on all three): a node killed under writes, a sidecar paused with SIGSTOP
(a partition) and resumed, a sidecar restarted mid-stream. After every `--wait` that returns,
no sidecar that reported the revision allows what it revoked; a sidecar that fell behind
answers nothing but denials until it has caught up."""

import signal
import subprocess
import threading
import time

from conftest import free_port, wait_port
from test_fleet import NATS, Fleet, answer, deploy_rbac, fleet, fleet_status, ready, wait_until
from test_oci import Registry

import pytest


class NatsCluster:
    """Three `nats-server -js` nodes routed to each other on loopback. `url` lists all three;
    `port` is a node that stays up (for the raw protocol helpers)."""

    def __init__(self, directory, n=3):
        self.directory = directory
        self.ports = [free_port() for _ in range(n)]
        self.cluster_ports = [free_port() for _ in range(n)]
        self.url = ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)
        self.port = self.ports[-1]
        self.procs = [None] * n
        self.logs = [open(directory / f"nats-{i}.log", "a") for i in range(n)]
        for i in range(n):
            self.start(i)
        for i in range(n):
            wait_port(self.ports[i], self.procs[i], f"nats-server {i}")

    def start(self, i):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
        self.procs[i] = subprocess.Popen(
            [NATS, "-a", "127.0.0.1", "-p", str(self.ports[i]), "-n", f"n{i}", "-js", "-sd", str(self.directory / f"js-{i}"),
             "--cluster_name", "sandgate-test", "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}", "--routes", routes],
            stdout=self.logs[i], stderr=subprocess.STDOUT,
        )

    def kill(self, i):
        self.procs[i].kill()
        self.procs[i].wait(timeout=10)

    def stop(self):
        for p in self.procs:
            if p and p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        for log in self.logs:
            log.close()


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path / "registry")
    yield r
    r.stop()


def retry(action, timeout=30):
    """`action()` until it returns a true value (a cluster electing leaders refuses writes
    for a moment)."""
    deadline = time.time() + timeout
    while True:
        result = action()
        if result or time.time() > deadline:
            return result
        time.sleep(0.5)


def revoke(cluster, jti, wait="--wait=30"):
    return fleet(cluster, "--replicas", "3", "revoke", "--jti", jti, wait, check=False)


# A cluster that lost a node places some new consumers on it and never answers their creation:
# each try at creating a watch (the sidecars', and `--wait`'s) is bounded (docs/FLEET.md,
# Failure modes), where waiting out the NATS client's 5 s request timeout every time kept
# sidecars and `--wait` behind for tens of seconds.
def test_a_cluster_node_killed_a_sidecar_paused_and_one_restarted(tmp_path, cluster, registry):
    # The cluster elects its JetStream leaders: the first write succeeds once it has.
    assert retry(lambda: fleet(cluster, "--replicas", "3", "status", check=False).returncode == 0)
    assert retry(lambda: revoke(cluster, "first", wait="--wait=1").stdout.strip().isdigit())
    f = Fleet(tmp_path, cluster, 3, max_staleness=3)
    try:
        deploy_rbac(tmp_path, cluster, registry)
        assert revoke(cluster, "r-0").returncode == 0
        assert {answer(s, jti="r-0") for s in f.sidecars} == {(401, "token_revoked")}

        # One node of three killed: its clients move to the others, the replicated buckets
        # keep every write, and writes go on (after a leader election at most).
        cluster.kill(0)
        for i in range(1, 21):
            if i == 1:
                # The first write may meet an election in progress, and `--wait` the sidecars
                # that were on the killed node while they reconnect. Their heartbeats go to a
                # bucket of their own, whose leader may be elected after the one written to:
                # until it is, they are not live and `--wait` goes on without them. Retried
                # until the write lands and all three, live again, have applied it.
                attempts = []
                landed = lambda: attempts.append(revoke(cluster, "r-1")) or (
                    attempts[-1].returncode == 0 and "applied by all 3 live sidecars" in attempts[-1].stderr)
                assert retry(landed, timeout=120), [(a.returncode, a.stderr[-500:]) for a in attempts]
                continue
            out = revoke(cluster, f"r-{i}")
            assert "applied by all 3 live sidecars" in out.stderr, out.stderr
            assert {answer(s, jti=f"r-{i}") for s in f.sidecars} == {(401, "token_revoked")}
        assert all(ready(s) for s in f.sidecars)

        # A partition: sidecar 2 stopped (SIGSTOP) for longer than max_staleness. --wait goes
        # on without it once its heartbeat has lapsed (it is no longer live) ...
        paused = f.sidecars[2]
        paused.proc.send_signal(signal.SIGSTOP)
        try:
            out = revoke(cluster, "during-pause")
            assert out.returncode == 0 and "applied by all 2 live sidecars" in out.stderr, out.stderr
            assert {answer(s, jti="during-pause") for s in f.sidecars[:2]} == {(401, "token_revoked")}
            out = fleet(cluster, "status")
            assert "(not live)" in out.stdout, out.stdout
            time.sleep(3.5)
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        # ... and when it resumes it allows nothing it missed: it is stale (403 stale_state)
        # until it has caught up, then the token is revoked (401).
        seen = set()
        deadline = time.time() + 15
        while time.time() < deadline:
            result = answer(paused, jti="during-pause")
            seen.add(result)
            if result == (401, "token_revoked"):
                break
        assert seen <= {(403, "stale_state"), (401, "token_revoked")} and (401, "token_revoked") in seen, seen
        assert wait_until(lambda: ready(paused), timeout=10)

        # A sidecar restarted while revocations stream in: it resumes from its cache and
        # catches up without skipping one.
        written = []

        def stream():
            for i in range(30):
                o = revoke(cluster, f"m-{i}", wait="--wait=30")
                written.append((i, o.returncode, o.stderr.strip()[-300:]))

        writer = threading.Thread(target=stream)
        writer.start()
        time.sleep(0.5)
        f.restart(1)
        writer.join(timeout=300)
        assert [w[1] for w in written] == [0] * 30, [w for w in written if w[1]]
        assert wait_until(lambda: ready(f.sidecars[1]), timeout=15)
        out = revoke(cluster, "last")
        assert "applied by all 3 live sidecars" in out.stderr, out.stderr
        for s in f.sidecars:
            allowed = [i for i in range(30) if answer(s, jti=f"m-{i}")[0] == 200]
            allowed += [i for i in range(21) if answer(s, jti=f"r-{i}")[0] == 200]
            assert allowed == [], f"sidecar {s.port} allowed revoked tokens {allowed}"
    finally:
        f.stop()
