#!/usr/bin/env python3
"""Where this build of `sandgate` and another spend their CPU on one records case, symbol by
symbol: the RBAC example under the varied traffic of `bench_records.py` (wrk -t2 -c64),
`perf record` of the sidecar (999 Hz) while wrk runs, the two builds alternated. Prints the
sidecar's CPU per check (µs) for each round and, for the symbols whose share differs most,
the µs per check each build spends in them (mean of rounds).

Throughput ratios on a shared two-core machine move by ±15% from round to round; a symbol's
CPU per check, measured in the same rounds, shows a change of a few tenths of a µs that no
throughput figure can.

    ./scripts/build-policies.sh
    BASELINE_SANDGATE=/path/to/other/sandgate .venv/bin/python scripts/profile_builds.py
    # CASE: none, stdout (the default: `capture = "input"`, the record made and handed off),
    # file or nats; ROUNDS (3), DURATION (8 s), TOP (15) from the environment. Needs `perf`.
    # BASELINE_CASE runs the baseline on another case: with this build as its own baseline,
    # what one case costs against another, symbol by symbol:
    BASELINE_SANDGATE=target/release/sandgate BASELINE_CASE=none CASE=nats .venv/bin/python scripts/profile_builds.py
"""

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_records as records  # noqa: E402
from bench_load import free_port, wrk  # noqa: E402

CASE = os.environ.get("CASE", "stdout")
BASELINE_CASE = os.environ.get("BASELINE_CASE", CASE)
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "8"))
TOP = int(os.environ.get("TOP", "15"))
HZ = 999


def symbols(data):
    """Samples by symbol in the `perf.data` file `data`."""
    report = subprocess.run(["perf", "report", "-i", data, "--sort", "sym", "--stdio", "-n", "--percent-limit", "0"],
                            capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in report.splitlines():
        fields = line.split(None, 3)
        if line.startswith("#") or len(fields) < 4 or not fields[1].isdigit():
            continue
        counts[fields[3].strip()] += int(fields[1])
    return counts


def main():
    baseline = Path(os.environ.get("BASELINE_SANDGATE") or sys.exit("set BASELINE_SANDGATE to the other build"))
    for name, case in (("CASE", CASE), ("BASELINE_CASE", BASELINE_CASE)):
        if case not in ("none", "stdout", "file", "nats"):
            sys.exit(f"{name} must be none, stdout, file or nats, not {case!r}")
    builds = {"this build": records.SANDGATE, "baseline": baseline}
    case_of = {"this build": CASE, "baseline": BASELINE_CASE}
    tmp = Path(tempfile.mkdtemp(prefix="sandgate-profile-builds-"))
    script = records.varied_traffic(tmp)
    nats_port = free_port()
    nats = records.nats_server(nats_port, tmp / "js") if "nats" in case_of.values() else None
    time.sleep(1)
    cases = {
        "none": 'capture = "none"',
        "stdout": records.INPUT_TO_STDOUT,
        "file": records.input_to_file(tmp),
        "nats": records.input_to_nats(tmp, nats_port),
    }
    per_check = {name: [] for name in builds}  # µs per check by symbol, each round
    for n in range(ROUNDS):
        # Alternate which build goes first.
        for name in (list(builds) if n % 2 == 0 else list(builds)[::-1]):
            records.SANDGATE = builds[name]
            case = case_of[name]
            config = cases[case].replace("{spool}", str(tmp / f"spool-{n}-{name.split()[0]}"))
            proc, port = records.serve(records.config(tmp, case, config), tmp / "sidecar.log")
            wrk(port, {}, 2, script)
            data = str(tmp / "perf.data")
            perf = subprocess.Popen(["perf", "record", "-F", str(HZ), "-p", str(proc.pid), "-o", data, "--", "sleep",
                                     str(DURATION)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rate = wrk(port, {}, DURATION, script)[0]
            perf.wait()
            proc.terminate()
            proc.wait(timeout=30)
            checks = rate * DURATION
            per_check[name].append({sym: 1e6 / HZ * count / checks for sym, count in symbols(data).items()})
            print(f"round {n + 1}, {name}: {rate:,.0f} req/s, {sum(per_check[name][-1].values()):.1f} µs of sidecar CPU a check")
    if nats:
        nats.terminate()
    mean = {name: collections.Counter() for name in builds}
    for name, rounds in per_check.items():
        for round_ in rounds:
            for sym, us in round_.items():
                mean[name][sym] += us / len(rounds)
    this, base = mean["this build"], mean["baseline"]
    cases_run = f"case `{CASE}`" if CASE == BASELINE_CASE else f"case `{CASE}` against `{BASELINE_CASE}`"
    print(f"\n{cases_run}, {ROUNDS} rounds: {sum(this.values()):.2f} µs a check this build, {sum(base.values()):.2f} baseline")
    print("| symbol | baseline µs/check | this build µs/check | difference |")
    print("|---|---|---|---|")
    for sym in sorted(set(this) | set(base), key=lambda s: -abs(this[s] - base[s]))[:TOP]:
        print(f"| `{sym[:90]}` | {base[sym]:.2f} | {this[sym]:.2f} | {this[sym] - base[sym]:+.2f} |")


if __name__ == "__main__":
    main()
