#!/usr/bin/env python3
"""This build of `sandgate` against another, under load: the RBAC example (HS256, wrk -t2
-c64) with `capture = "none"` and with `capture = "input"` to a file and to NATS JetStream
(nats-server on 127.0.0.1, the sink's defaults, a fresh spool each run), reporting requests per
second and the sidecar's CPU per check; and on an idle system (one connection, one request at
a time), reporting the p50 latency. Rounds alternate which build goes first; the median of the
per-round ratios (this / baseline) is reported with its range.

    ./scripts/build-policies.sh
    BASELINE_SANDGATE=/path/to/other/sandgate .venv/bin/python scripts/bench_builds.py   # ROUNDS (6), DURATION (3 s)

BASELINE_POLICIES=DIR gives the baseline build its own policies (e.g. built against an older
contract); by default both builds serve `target/policies`.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records as records  # noqa: E402
from bench_load import wrk  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "6"))
DURATION = int(os.environ.get("DURATION", "3"))


def main():
    baseline = Path(os.environ.get("BASELINE_SANDGATE") or sys.exit("set BASELINE_SANDGATE to the other build"))
    builds = {"this build": records.SANDGATE, "baseline": baseline}
    policies = {"this build": records.POLICIES, "baseline": Path(os.environ.get("BASELINE_POLICIES") or records.POLICIES)}
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-bench-builds-"))
    nats_port = records.free_port()
    nats = records.nats_server(nats_port, tmp / "js")
    time.sleep(1)
    cases = {
        "capture none": 'capture = "none"',
        "capture input → file": records.input_to_file(tmp),
        "capture input → NATS": records.input_to_nats(tmp, nats_port),
    }
    headers = records.reader_headers()
    runs = {}  # (case, build) -> [(req/s, CPU µs per check)]
    idle = {}  # build -> [p50 µs with one connection]
    for n in range(ROUNDS):
        order = list(builds.items()) if n % 2 == 0 else list(reversed(builds.items()))
        for case, config in cases.items():
            for build, binary in order:
                records.SANDGATE, records.POLICIES = binary, policies[build]
                spool = tmp / f"spool-{n}-{build.replace(' ', '-')}"
                proc, port = records.serve(records.config(tmp, "builds", config.replace("{spool}", str(spool))),
                                           tmp / "sidecar.log")
                try:
                    wrk(port, headers, 2)
                    before = records.cpu_seconds(proc.pid)
                    rps = wrk(port, headers, DURATION)[0]
                    cpu = records.cpu_seconds(proc.pid) - before
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                runs.setdefault((case, build), []).append((rps, 1e6 * cpu / (rps * DURATION)))
        for build, binary in order:
            records.SANDGATE, records.POLICIES = binary, policies[build]
            proc, port = records.serve(records.config(tmp, "builds", cases["capture none"]), tmp / "sidecar.log")
            try:
                wrk(port, headers, 1, connections=1)
                idle.setdefault(build, []).append(wrk(port, headers, DURATION, connections=1)[1])
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    nats.terminate()
    print(f"| case | this build req/s | baseline req/s | req/s ratio (median of {ROUNDS}, range) | CPU µs/check this / baseline | CPU ratio (range) |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        this, base = runs[(case, "this build")], runs[(case, "baseline")]
        rps = sorted(t[0] / b[0] for t, b in zip(this, base))
        cpu = sorted(t[1] / b[1] for t, b in zip(this, base))
        print(f"| {case} | {statistics.median(t[0] for t in this):,.0f} | {statistics.median(b[0] for b in base):,.0f} | "
              f"**{statistics.median(rps):.3f}** ({rps[0]:.2f}–{rps[-1]:.2f}) | "
              f"{statistics.median(t[1] for t in this):.1f} / {statistics.median(b[1] for b in base):.1f} | "
              f"**{statistics.median(cpu):.3f}** ({cpu[0]:.2f}–{cpu[-1]:.2f}) |")
    this, base = idle["this build"], idle["baseline"]
    ratios = sorted(t / b for t, b in zip(this, base))
    print(f"\nOne connection, capture none: p50 {statistics.median(this):.0f} µs this build, {statistics.median(base):.0f} µs baseline, "
          f"ratio **{statistics.median(ratios):.3f}** ({ratios[0]:.2f}–{ratios[-1]:.2f}), median of {ROUNDS}")


if __name__ == "__main__":
    main()
