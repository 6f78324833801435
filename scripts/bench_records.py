#!/usr/bin/env python3
"""What decision records cost under load: the RBAC example (HS256, wrk -t2 -c64) with
`capture = "none"` against `capture = "input"` with its records sent to a NATS JetStream stream
(nats-server on 127.0.0.1, the spool on disk: the defaults, i.e. LZ4-compressed messages, a
50 ms linger for fuller messages and the spool synced every second; without the linger;
uncompressed; syncing every batch; and to a server whose `max_payload` of 64 KiB keeps messages
at ~63 KiB of lines instead of ~1 MiB), against `capture = "input"` to a file, and to stdout
(the default sink), which the script sends to /dev/null: the record made and handed to the log
thread, without any sink's cost. The traffic varies as real traffic does, since what compression
gains depends on it: 1,000 readers' tokens (distinct subjects and `jti`s), paths and user agents,
chosen at random by a wrk script.
Rounds alternate the configurations back to back; the median ratio of each to `none` is
reported. Prints Markdown tables for docs/BENCHMARKS.md: throughput and CPU, and the sidecar's
CPU by thread (the tokio workers, the policy threads, the log writer, the NATS publisher).

    ./scripts/build-policies.sh
    .venv/bin/python scripts/bench_records.py          # ROUNDS (5) and DURATION (5 s) from the environment
    CASES=NATS,64 .venv/bin/python scripts/bench_records.py   # only `none` and the cases named so
    # The sidecar on CPU 1 alone, wrk and nats-server on the others: what a record costs the
    # sidecar when nothing else runs on its cores.
    SIDECAR_CPUS=1 .venv/bin/python scripts/bench_records.py
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import free_port, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SANDGATE = ROOT / "target" / "release" / "sandgate"
POLICIES = ROOT / "target" / "policies"
DURATION = int(os.environ.get("DURATION", "5"))
# CPUs the sidecar runs on, alone (e.g. "1"); wrk and nats-server run on the others.
SIDECAR_CPUS = {int(cpu) for cpu in os.environ["SIDECAR_CPUS"].split(",")} if os.environ.get("SIDECAR_CPUS") else None
ROUNDS = int(os.environ.get("ROUNDS", "5"))
ISSUER, AUDIENCE, SECRET = "https://issuer.bench", "bench", "a-benchmark-hs256-secret-of-32-bytes!"
RBAC = {"roles": {"reader": [{"methods": ["GET", "HEAD"], "paths": ["/api/**"]}]}}


def serve(config_path, log_path):
    """`sandgate serve` on a free port, its stderr (warnings) in `log_path`."""
    port = free_port()
    proc = subprocess.Popen([str(SANDGATE), "serve", "--config", str(config_path), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env={**os.environ, "RUST_LOG": "warn"})
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            if SIDECAR_CPUS:
                # Every thread it has started; those it starts later inherit the affinity.
                for task in Path(f"/proc/{proc.pid}/task").iterdir():
                    os.sched_setaffinity(int(task.name), SIDECAR_CPUS)
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"sandgate did not start: {log_path.read_text()}")


def stat_cpu(stat):
    """User and system CPU time, in seconds, of a `/proc/…/stat` line."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User and system CPU time of process `pid` so far, in seconds."""
    return stat_cpu(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu(pid):
    """CPU seconds so far of process `pid`'s threads, summed by thread name: the tokio
    workers (`tokio-rt-worker`), the policy threads (`sandgate-eval-N`), the log writer
    (`sandgate-log`) and the NATS publisher (`sandgate-nats`)."""
    by_name = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        name = "sandgate-eval" if name.startswith("sandgate-eval") else name
        by_name[name] = by_name.get(name, 0) + stat_cpu(stat)
    return by_name


THREADS = ["tokio-rt-worker", "sandgate-eval", "sandgate-log", "sandgate-nats"]


def config(tmp, name, records):
    data = tmp / "rbac.json"
    data.write_text(json.dumps(RBAC))
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[server]
proxy = "nginx"
default_policy = "rbac"
[[issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["HS256"]
[[issuers.keys]]
kid = "k"
algorithm = "HS256"
secret = "{SECRET}"
[[policies]]
id = "rbac"
module = "{POLICIES / 'rbac.wasm'}"
data = "{data}"
[decision_log]
{records}
""")
    return path


def reader_headers():
    """What nginx sends for a reader's `GET /api/orders` with a valid HS256 token (allowed)."""
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3600, "roles": ["reader"]},
                       SECRET, algorithm="HS256", headers={"kid": "k"})
    return {"Authorization": f"Bearer {token}", "X-Original-URI": "/api/orders", "X-Original-Method": "GET",
            "X-Forwarded-Host": "api.test", "X-Forwarded-Proto": "https"}


def varied_traffic(tmp, users=1000):
    """A wrk script sending allowed checks from `users` readers (each its own HS256 token) to
    random order paths with random user agents, as nginx would."""
    now = int(time.time())
    tokens = []
    for n in range(users):
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{n}@example.com", "iat": now, "exp": now + 3600,
                  "jti": f"{n:08x}-{now:x}", "roles": ["reader"] if n % 3 else ["reader", "auditor"]}
        tokens.append(jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k"}))
    agents = ["Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", "curl/8.5.0", "okhttp/4.12.0",
              "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Safari/604.1"]
    lua = ("local tokens = {" + ",".join(f'"{t}"' for t in tokens) + "}\n"
           "local agents = {" + ",".join(f'"{a}"' for a in agents) + "}\n"
           "local paths = {'/api/orders/', '/api/users/', '/api/cart/', '/api/search/'}\n"
           "math.randomseed(7)\n"
           "request = function()\n"
           "  local path = paths[math.random(#paths)] .. math.random(1000000)\n"
           "  return wrk.format('GET', '/auth', {['Authorization'] = 'Bearer ' .. tokens[math.random(#tokens)],\n"
           "    ['X-Original-URI'] = path, ['X-Original-Method'] = 'GET', ['X-Forwarded-Host'] = 'api.test',\n"
           "    ['X-Forwarded-Proto'] = 'https', ['User-Agent'] = agents[math.random(#agents)]})\n"
           "end\n")
    path = tmp / "varied.lua"
    path.write_text(lua)
    return str(path)


# `capture = "input"` to the default sink, stdout (which the scripts send to /dev/null): the
# record made and handed to the log thread, without any sink's cost.
INPUT_TO_STDOUT = 'capture = "input"\nqueue_mib = 32'


def input_to_file(tmp):
    """`[decision_log]` lines for `capture = "input"` to a size-rotated file in `tmp`."""
    return (f'capture = "input"\nqueue_mib = 32\narchive_dir = "{tmp / "archive"}"\nsink = "file"\n'
            f'path = "{tmp / "records.log"}"\nmax_file_mib = 256\nmax_files = 1')


def input_to_nats(tmp, port, setting=""):
    """`[decision_log]` lines for `capture = "input"` to the NATS sink at `port`, with `setting`
    added; `{spool}` stands for the spool directory."""
    return (f'capture = "input"\nqueue_mib = 32\narchive_dir = "{tmp / "archive"}"\nsink = "nats"\n[decision_log.nats]\n'
            f'url = "nats://127.0.0.1:{port}"\nspool_max_mib = 8192\n{setting}spool_dir = "{{spool}}"')


def nats_server(port, store, *args):
    """A JetStream nats-server on 127.0.0.1:`port` storing in `store`."""
    return subprocess.Popen([shutil.which("nats-server") or "/usr/sbin/nats-server", *args, "-a", "127.0.0.1",
                             "-p", str(port), "-js", "-sd", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    if SIDECAR_CPUS:
        others = os.sched_getaffinity(0) - SIDECAR_CPUS
        if not others or not SIDECAR_CPUS <= os.sched_getaffinity(0):
            sys.exit(f"SIDECAR_CPUS={sorted(SIDECAR_CPUS)} must name some, not all, of CPUs {sorted(os.sched_getaffinity(0))}")
        os.sched_setaffinity(0, others)  # this script and what it starts: nats-server, wrk
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-bench-records-"))
    nats_port, small_port, monitor_port = free_port(), free_port(), free_port()
    nats = nats_server(nats_port, tmp / "js", "-m", str(monitor_port))
    # A second server accepting messages of at most 64 KiB: the sidecar sends it messages of
    # ~63 KiB of lines instead of ~1 MiB (its own store directory; not counted in stored bytes).
    (tmp / "small.conf").write_text("max_payload: 65536\n")
    small = nats_server(small_port, tmp / "js-small", "-c", str(tmp / "small.conf"))
    time.sleep(1)

    def to_nats(setting, port=nats_port):
        return input_to_nats(tmp, port, setting)

    cases = {
        "none": 'capture = "none"',
        "input → NATS": to_nats(""),
        "input → NATS, sent at once (`linger_ms = 0`)": to_nats("linger_ms = 0\n"),
        "input → NATS, uncompressed": to_nats('compression = "none"\n'),
        "input → NATS, spool synced every batch": to_nats("spool_sync_ms = 0\n"),
        "input → NATS, 64 KiB messages": to_nats("", small_port),
        "input → file": input_to_file(tmp),
        "input → stdout": INPUT_TO_STDOUT,
    }
    if os.environ.get("CASES"):
        # `none` and the cases these comma-separated words name: the sink (`NATS`, `file`,
        # `stdout`: its defaults) or a word of a variant (`linger`, `uncompressed`, `64`).
        def named(name, word):
            sink, _, variant = name.partition(" → ")[2].partition(", ")
            return word == sink if not variant else word in variant
        words = os.environ["CASES"].split(",")
        cases = {name: c for name, c in cases.items() if name == "none" or any(named(name, w) for w in words)}
    script = varied_traffic(tmp)
    results = {name: [] for name in cases}
    dropped = {name: 0 for name in cases}
    cpu = {name: [] for name in cases}  # (sidecar, nats-server) CPU µs per check
    threads = {name: [] for name in cases}  # the sidecar's CPU µs per check by thread name
    backlog = []  # (records answered, bytes still in the spool) after each NATS run
    stored = {name: [] for name in cases if "NATS" in name and "64 KiB" not in name}  # bytes JetStream stored a record

    per_message = {name: [] for name in stored}  # records a JetStream message

    def stream_bytes():
        return sum(f.stat().st_size for f in (tmp / "js").rglob("*.blk"))

    def stream_messages():
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/jsz", timeout=5))["messages"]
    for n in range(ROUNDS):
        for name, records in cases.items():
            # A fresh spool each run: what one run leaves must not fill the next one's.
            records = records.replace("{spool}", str(tmp / f"spool-{n}"))
            stream_before, messages_before = stream_bytes(), stream_messages()
            proc, port = serve(config(tmp, name.split()[0], records), tmp / f"sidecar-{n}-{name.split()[-1]}.log")
            wrk(port, {}, 2, script)
            server = small if "64 KiB" in name else nats
            before = (cpu_seconds(proc.pid), cpu_seconds(server.pid), thread_cpu(proc.pid))
            results[name].append(wrk(port, {}, DURATION, script))
            after = (cpu_seconds(proc.pid), cpu_seconds(server.pid), thread_cpu(proc.pid))
            checks = results[name][-1][0] * DURATION
            cpu[name].append((1e6 * (after[0] - before[0]) / checks, 1e6 * (after[1] - before[1]) / checks))
            threads[name].append({t: 1e6 * (after[2].get(t, 0) - before[2].get(t, 0)) / checks for t in THREADS})
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            dropped[name] += int(float(re.search(r"^sandgate_decision_log_dropped_total (\S+)", metrics, re.M).group(1)))
            if "NATS" in name:
                spooled = int(re.search(r"^sandgate_decision_spool_bytes (\S+)", metrics, re.M).group(1))
                answered = int(results[name][-1][0] * DURATION)
                # How long the backlog takes to drain once the load stops (at most 60 s).
                drained_at = time.time()
                while time.time() - drained_at < 60:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                    if int(re.search(r"^sandgate_decision_spool_bytes (\S+)", text, re.M).group(1)) == 0:
                        break
                    time.sleep(0.2)
                backlog.append((answered, spooled, time.time() - drained_at))
                checks_in_all = int(float(re.search(r"^sandgate_decisions_total\{[^}]*\} (\S+)", text, re.M).group(1)))
                if server is nats:
                    stored[name].append((stream_bytes() - stream_before) / checks_in_all)
                    per_message[name].append(checks_in_all / max(1, stream_messages() - messages_before))
            proc.terminate()
            proc.wait(timeout=30)
    nats.terminate()
    small.terminate()
    base = results["none"]
    print("| records | req/s (median) | p50 µs | p99 µs | ratio to `none` (median of rounds, min–max) | sidecar CPU µs/check | nats-server CPU µs/check | records dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rounds in results.items():
        ratios = [r[0] / b[0] for r, b in zip(rounds, base)]
        print(f"| `{name}` | {statistics.median(r[0] for r in rounds):,.0f} | {statistics.median(r[1] for r in rounds):.0f} | "
              f"{statistics.median(r[2] for r in rounds):.0f} | {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | "
              f"{statistics.median(c[0] for c in cpu[name]):.1f} | {statistics.median(c[1] for c in cpu[name]):.1f} | {dropped[name]} |")
    print()
    print(f"| records | sidecar CPU µs/check by thread (median of rounds): {' / '.join(f'`{t}`' for t in THREADS)} |")
    print("|---|---|")
    for name, rounds in threads.items():
        print(f"| `{name}` | {' / '.join(f'{statistics.median(r[t] for r in rounds):.1f}' for t in THREADS)} |")
    print("req/s of each round, in order:")
    for name, rounds in results.items():
        print(f"  `{name}`: {', '.join(f'{r[0]:,.0f}' for r in rounds)}")
    for log in sorted(tmp.glob("sidecar-*.log")):
        warnings = [l for l in log.read_text().splitlines() if "WARN" in l or "ERROR" in l]
        if warnings:
            print(f"{log.name}: {warnings[:3]}")
    for name, sizes in stored.items():
        print(f"`{name}`: JetStream stored {statistics.median(sizes):,.0f} bytes a record, "
              f"{statistics.median(per_message[name]):,.0f} records a message (medians of rounds)")
    for answered, spooled, drain in backlog:
        print(f"NATS run: ~{answered:,} checks in {DURATION} s; {spooled / 2**20:,.0f} MiB of records still spooled when wrk stopped, "
              f"sent within {drain:.1f} s after")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
