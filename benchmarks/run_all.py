"""Run every benchmark, print one table, and write it all as JSON.

    ./dev bench                      # the full suite (sizes from issue #6)
    ./dev bench --quick              # smaller sizes, for a quick look
    ./dev bench --show FILE.json     # the table of an earlier run

Each benchmark runs in its own process (so one's memory or caches do not colour another's) and
writes its figures as JSON; this script gathers them with the machine and versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
PACKAGES = [
    "newsletter",
    "sqlalchemy",
    "jinja2",
    "feedparser",
    "aiosmtpd",
    "PyStemmer",
    "psycopg",
    "nh3",
    "httpx",
]


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


_PROBE_WORDS = [f"w{i % 997}" for i in range(100_000)]


def _probe_round() -> int:
    """A fixed piece of interpreter work (dict counting, string joins and splits, a regex,
    JSON), independent of the product's code, so that it times the machine only."""
    counts: dict[str, int] = {}
    for word in _PROBE_WORDS:
        counts[word] = counts.get(word, 0) + 1
    text = " ".join(_PROBE_WORDS)
    return sum(map(len, re.split(r"\s+", text))) + len(json.dumps(counts))


def speed_probe(rounds: int = 7) -> dict[str, object]:
    """CPU milliseconds of `_probe_round`, best and median of `rounds`. This shared machine's
    speed moves by half within an hour and by twice between days, with the same code: the
    probe, taken at the start and the end of a run, says which kind of hour a run had, so that
    runs of different days (and the changes between them) are compared with that in mind."""
    times = []
    gc.disable()  # the collector's passes cost with whatever else the process holds
    try:
        for _ in range(rounds):
            t0 = time.process_time()
            _probe_round()
            times.append((time.process_time() - t0) * 1000)
    finally:
        gc.enable()
    return {"best_ms": round(min(times), 2), "median_ms": round(statistics.median(times), 2)}


def run(script: str, *args: str) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(HERE / script), *args, "--json", out.name]
        print(f"==> {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        return dict(json.loads(Path(out.name).read_text()))


def cpu(run_: dict[str, object]) -> str:
    """CPU seconds of `send` (all its processes), and PostgreSQL's server beside it: the two
    share this machine's cores, so together they say where the time goes."""
    text = f"{run_['send_cpu_s']} s"
    if run_.get("db_server_cpu_s") is not None:
        text += f" + db {run_['db_server_cpu_s']} s"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument(
        "--out", type=Path, default=HERE / "results" / "latest.json", help="where the JSON goes"
    )
    parser.add_argument(
        "--show", type=Path, metavar="JSON", help="print the table of an earlier run's file"
    )
    args = parser.parse_args()
    if args.show:
        try:
            print_table(json.loads(args.show.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"cannot show {args.show}: {exc!r} (a file `run_all.py` wrote?)")
        return
    q = args.quick
    results: dict[str, dict[str, object]] = {
        "machine": machine(),
        "speed_at_start": speed_probe(),
        "ingest": run("bench_ingest.py", "--entries", "2000" if q else "10000"),
        "match": run("bench_match.py", "--profiles", "10000" if q else "100000"),
        "render": run("bench_render.py", "--messages", "1000" if q else "5000"),
        "matching_quality": run("matching_eval.py"),
        "send": run("bench_send.py", "--subscribers", "2000" if q else "10000,100000"),
    }
    results["speed_at_end"] = speed_probe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten to {args.out}")


def by_round(section: dict[str, object], key: str, unit: str = "") -> str:
    """' (median; rounds: a, b, c)' when `section` has its rounds under `key` (files written
    before the benchmarks took rounds do not)."""
    values = section.get(key)
    if not isinstance(values, list):
        return ""
    return f" (median; rounds: {', '.join(f'{v:,}' for v in values)}{unit})"


def print_table(results: dict[str, dict[str, object]]) -> None:
    m = results["machine"]
    render = results["render"]
    print(f"\n{m['cpu']} · {m['cores']} cores · Python {m['python']} · {m['platform']}")
    versions = cast("dict[str, str | None]", m.get("versions", {}))
    print(" · ".join(f"{name} {version or 'not installed'}" for name, version in versions.items()))
    if "speed_at_start" in results:  # files from before the probe
        start, end = results["speed_at_start"], results["speed_at_end"]
        print(
            f"speed probe (fixed Python work, lower is faster; best / median of 7): "
            f"{start['best_ms']} / {start['median_ms']} ms at the start, "
            f"{end['best_ms']} / {end['median_ms']} ms at the end"
        )
    rows = [
        (
            f"ingest {results['ingest']['entries']:,} entries vs feedparser alone",
            f"{results['ingest']['ingest_ratio_vs_feedparser']}×",
            "≤ 1.3×",
        ),
        (
            "match profiles × 2,000 entries",
            f"{results['match']['total_s']} s for {results['match']['profiles']}"
            + by_round(results["match"], "total_s_by_round", " s"),
            "< 2 s at 100k",
        ),
        ("match vs naive scan", f"{results['match']['speedup_vs_naive']}×", "≥ 100×"),
        (
            "render, one core",
            f"{render['messages_per_s_one_core']} msg/s"
            + by_round(render, "messages_per_s_by_round"),
            "≥ 5,000/s",
        ),
    ]
    if "messages_per_s_skeletons_ahead" in render:  # files from before it was
        rows.append(
            (
                "render, papers' skeletons made ahead",
                f"{render['messages_per_s_skeletons_ahead']} msg/s"
                + by_round(render, "skeletons_ahead_by_round")
                + f" ({render['papers']} skeletons: {render['skeletons_cpu_s']} s)",
                "",
            )
        )
    if "ratio_vs_stdlib_route" in render:  # files from before it was measured
        rows.append(
            (
                "render vs EmailMessage route, same run",
                f"{render['ratio_vs_stdlib_route']}× "
                f"({render['stdlib_route_messages_per_s']} msg/s)",
                "",
            )
        )
    send = results["send"]
    runs = send["runs"]
    assert isinstance(runs, list)
    top = send["smtp_source_ceiling_msgs_per_s"]
    for run_ in runs:
        rate = f"{run_['digests_per_s']} digests/s"
        if run_["sink"] == "smtp-sink" and isinstance(top, float):
            rate += f" ({run_['digests_per_s'] / top:.0%} of the ceiling)"
        rows.append(
            (
                f"send {run_['subscribers']} → {run_['sink']} ({run_['db']})",
                f"{rate}, {run_['peak_rss_mb']} MB, cpu {cpu(run_)}",
                "≥ 1,500/s, < 250 MB" if run_["sink"] == "smtp-sink" else "",
            )
        )
    rows.append(
        ("ceiling: smtp-source → smtp-sink", f"{send['smtp_source_ceiling_msgs_per_s']} msg/s", "")
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'figure':<52} target")
    for name, figure, target in rows:
        print(f"{name:<{width}}  {figure:<52} {target}")


if __name__ == "__main__":
    main()
