"""How long matching takes per profile once a day's entries are indexed.

The corpus is synthetic but shaped like a real day: 2,000 entries whose titles and abstracts are
recombined from the sentences of the fixture papers, so word frequencies (and therefore how many
entries a keyword hits) are realistic. Profiles draw 2-8 keywords from a pool of real words,
phrases and acronyms, with a Zipf-like skew so that popular keywords are shared, as they are
among real readers.

Reports the one-off index build, the cold pass (every keyword compiled for the first time), the
warm per-profile cost, and a naive scan (case-insensitive substring test of every keyword against
every entry) for scale.

    .venv/bin/python benchmarks/matching_speed.py [--docs 2000] [--profiles 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.datagen import keyword_pool, naive_scanner, profiles, synthetic_docs  # noqa: E402
from newsletter.matching import MatchIndex  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--profiles", type=int, default=20000)
    parser.add_argument("--pool", type=int, default=3000, help="distinct keywords to draw from")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    docs = synthetic_docs(args.docs, args.seed)
    pool = keyword_pool(docs, args.pool, args.seed)
    profs = profiles(pool, args.profiles, args.seed)

    t0 = time.perf_counter()
    index = MatchIndex(docs)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    picked = sum(len(index.match(p)) for p in profs)
    cold_s = time.perf_counter() - t0

    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for p in profs:
            index.match(p)
        runs.append(time.perf_counter() - t0)
    warm_s = statistics.median(runs)

    sample = profs[: max(1, min(200, len(profs)))]
    naive_scan = naive_scanner(docs)
    t0 = time.perf_counter()
    for p in sample:
        naive_scan(p)
    naive_us = (time.perf_counter() - t0) / len(sample) * 1e6

    distinct = len({k for p in profs for k in (*p.keywords, *p.exclude)})
    result = {
        "docs": len(docs),
        "profiles": len(profs),
        "distinct_keywords": distinct,
        "mean_keywords_per_profile": statistics.mean(len(p.keywords) for p in profs),
        "mean_picks_per_profile": picked / len(profs),
        "index_build_s": round(build_s, 3),
        "cold_total_s": round(cold_s, 3),
        "cold_us_per_profile": round(cold_s / len(profs) * 1e6, 1),
        "warm_total_s": round(warm_s, 3),
        "warm_us_per_profile": round(warm_s / len(profs) * 1e6, 1),
        "naive_substring_scan_us_per_profile": round(naive_us, 1),
        "speedup_vs_naive_warm": round(naive_us / (warm_s / len(profs) * 1e6), 1),
        "speedup_vs_naive_cold": round(naive_us / (cold_s / len(profs) * 1e6), 1),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
