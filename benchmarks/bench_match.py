"""Match: P profiles × E entries on every core, and the ratio to a naive matcher.

The index is built once in the parent and the profiles are split across forked worker
processes (copy-on-write: no pickling of the index). The naive matcher (substring tests of every
keyword of every profile against every entry's lower-cased text) is measured on a sample of
profiles and extrapolated linearly: its cost per profile does not depend on the others.

    .venv/bin/python benchmarks/bench_match.py [--profiles 100000] [--entries 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import (
    keyword_pool,
    naive_scanner,
    profiles,
    synthetic_docs,
)
from newsletter.matching import MatchIndex, Profile

_INDEX: MatchIndex | None = None
_PROFILES: list[Profile] = []


def _work(bounds: tuple[int, int]) -> int:
    assert _INDEX is not None
    start, stop = bounds
    return sum(len(_INDEX.match(p)) for p in _PROFILES[start:stop])


def main() -> None:
    global _INDEX, _PROFILES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--naive-sample", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    docs = synthetic_docs(args.entries, 7)
    _PROFILES = profiles(keyword_pool(docs, 3000, 7), args.profiles, 7)

    t0 = time.perf_counter()
    _INDEX = MatchIndex(docs)
    build_s = time.perf_counter() - t0
    step = -(-len(_PROFILES) // args.processes)
    chunks = [(i, min(i + step, len(_PROFILES))) for i in range(0, len(_PROFILES), step)]
    t1 = time.perf_counter()
    with mp.get_context("fork").Pool(args.processes) as pool:
        picks = sum(pool.map(_work, chunks))
    match_s = time.perf_counter() - t1
    total_s = time.perf_counter() - t0

    scan = naive_scanner(docs)
    sample = _PROFILES[: args.naive_sample]
    t2 = time.perf_counter()
    for p in sample:
        scan(p)
    naive_per_profile = (time.perf_counter() - t2) / len(sample)
    naive_total = naive_per_profile * len(_PROFILES) / args.processes  # same cores, same split

    result = {
        "profiles": len(_PROFILES),
        "entries": len(docs),
        "processes": args.processes,
        "index_build_s": round(build_s, 3),
        "match_s": round(match_s, 3),
        "total_s": round(total_s, 3),
        "picks_per_profile": round(picks / len(_PROFILES), 2),
        "naive_extrapolated_s": round(naive_total, 1),
        "speedup_vs_naive": round(naive_total / total_s, 1),
    }
    for key, value in result.items():
        print(f"{key:<22} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
