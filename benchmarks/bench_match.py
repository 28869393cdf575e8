"""Match: P profiles × E entries on every core, and the ratio to a naive matcher.

The index is built once in the parent and the profiles are split across forked worker
processes (copy-on-write: no pickling of the index). The naive matcher (substring tests of every
keyword of every profile against every entry's lower-cased text) is measured on a sample of
profiles and extrapolated linearly: its cost per profile does not depend on the others. It runs
right after ours, split the same way over the same worker processes (already started: their
start-up is counted against ours, not against it), so both see the same machine: on a shared
machine whose second core is sometimes someone else's, a single-process sample divided by the
number of processes flattered or hurt the ratio by whatever the other core was doing.

Each figure is the median of `--rounds` measurements (3), each in a process forked for it
from one that only made the data: one measurement moved by a fifth between runs here.

    .venv/bin/python benchmarks/bench_match.py [--profiles 100000] [--entries 2000] [--rounds 3]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import (
    keyword_pool,
    naive_scanner,
    profiles,
    synthetic_docs,
)
from newsletter.matching import Doc, MatchIndex, Profile

_INDEX: MatchIndex | None = None
_PROFILES: list[Profile] = []
_SCAN: Callable[[Profile], list[int]] | None = None


def _work(bounds: tuple[int, int]) -> int:
    assert _INDEX is not None
    start, stop = bounds
    return sum(len(_INDEX.match(p)) for p in _PROFILES[start:stop])


def _naive(bounds: tuple[int, int]) -> int:
    assert _SCAN is not None
    start, stop = bounds
    return sum(len(_SCAN(p)) for p in _PROFILES[start:stop])


def split(count: int, parts: int) -> list[tuple[int, int]]:
    step = -(-count // parts)
    return [(i, min(i + step, count)) for i in range(0, count, step)]


class Round(NamedTuple):
    build_s: float
    match_s: float
    total_s: float  # build and match
    picks: int
    naive_s: float  # the naive matcher's sample, extrapolated to every profile


def one_round(processes: int, sample: int, docs: list[Doc], out: Connection) -> None:
    """One measurement, in a process forked for it from one that has only made the data, so
    every round starts with the matcher's module-level memos as cold as `send` finds them."""
    global _INDEX
    t0 = time.perf_counter()
    _INDEX = MatchIndex(docs)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with mp.get_context("fork").Pool(processes) as pool:
        picks = sum(pool.map(_work, split(len(_PROFILES), processes)))
        match_s = time.perf_counter() - t1
        total_s = time.perf_counter() - t0
        t2 = time.perf_counter()
        pool.map(_naive, split(sample, processes))
        naive_sample_s = time.perf_counter() - t2
    out.send(Round(build_s, match_s, total_s, picks, naive_sample_s * len(_PROFILES) / sample))
    out.close()


def main() -> None:
    global _PROFILES, _SCAN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--naive-sample", type=int, default=400)
    parser.add_argument(
        "--rounds", type=int, default=3, help="measurements, each in a fresh process; medians"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    docs = synthetic_docs(args.entries, 7)
    _PROFILES = profiles(keyword_pool(docs, 3000, 7), args.profiles, 7)
    _SCAN = naive_scanner(docs)  # before the workers fork, so they have it
    sample = min(args.naive_sample, len(_PROFILES))
    fork = mp.get_context("fork")
    rounds: list[Round] = []
    for _ in range(max(args.rounds, 1)):
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(target=one_round, args=(args.processes, sample, docs, send))
        child.start()
        send.close()
        rounds.append(receive.recv())
        child.join()
    build_s, match_s, total_s, picks, naive_total = map(
        statistics.median, zip(*rounds, strict=True)
    )
    result = {
        "profiles": len(_PROFILES),
        "entries": len(docs),
        "processes": args.processes,
        "rounds": len(rounds),
        "index_build_s": round(build_s, 3),
        "match_s": round(match_s, 3),
        "total_s": round(total_s, 3),
        "total_s_by_round": [round(r.total_s, 3) for r in rounds],
        "picks_per_profile": round(picks / len(_PROFILES), 2),
        "naive_extrapolated_s": round(naive_total, 1),
        # Each round's ratio (the two timed back to back on the same workers), then the
        # median: the machine's speed moves between rounds, not within one.
        "speedup_vs_naive": round(statistics.median(r.naive_s / r.total_s for r in rounds), 1),
    }
    for key, value in result.items():
        print(f"{key:<22} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
