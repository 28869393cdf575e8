"""Ingest: parse + normalize + sanitize + store N entries, as a ratio to feedparser's parse
time alone on the same bytes.

    .venv/bin/python benchmarks/bench_ingest.py [--entries 10000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import feedparser

from benchmarks.datagen import rss_bytes, synthetic_docs
from newsletter import db, ingest
from newsletter.app import App
from newsletter.config import Settings
from newsletter.parse import parse_feed


def best_of(n: int, fn: object) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    data = rss_bytes(synthetic_docs(args.entries, 11))
    feedparser_s = best_of(args.repeat, lambda: feedparser.parse(data))
    parse_s = best_of(args.repeat, lambda: parse_feed(data))

    store_times = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            app = App(Settings(database_url=f"sqlite:///{tmp}/bench.db", secret_key="x"))
            app.init()
            with db.transaction(app.sessions) as session:
                feed_id = ingest.add_feed(session, "https://papers.example.org/bench.xml").id
            t0 = time.perf_counter()
            parsed = parse_feed(data)
            with db.transaction(app.sessions) as session:
                new = ingest.store_entries(session, feed_id, parsed.entries, datetime.now(UTC))
            store_times.append(time.perf_counter() - t0)
            assert new == args.entries, new
            app.close()
    ingest_s = min(store_times)
    result = {
        "entries": args.entries,
        "bytes": len(data),
        "feedparser_parse_s": round(feedparser_s, 3),
        "parse_normalize_sanitize_s": round(parse_s, 3),
        "ingest_total_s": round(ingest_s, 3),
        "ingest_ratio_vs_feedparser": round(ingest_s / feedparser_s, 3),
        "store_ms_per_1000": round((ingest_s - parse_s) / args.entries * 1e6, 1),
        "median_ingest_s": round(statistics.median(store_times), 3),
    }
    for key, value in result.items():
        print(f"{key:<30} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
