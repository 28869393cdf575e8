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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    data = rss_bytes(synthetic_docs(args.entries, 11))
    # Each round times feedparser and then our ingest, back to back, and the ratio is the
    # median of the rounds' ratios: on a shared machine whose speed moves from one minute to
    # the next, a ratio of two best times taken minutes apart can be off by a fifth (the
    # store step once came out negative, as the difference of two such times).
    feedparser_times, parse_times, store_times, ratios = [], [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        feedparser.parse(data)
        feedparser_times.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            app = App(Settings(database_url=f"sqlite:///{tmp}/bench.db", secret_key="x"))
            app.init()
            with db.transaction(app.sessions) as session:
                feed_id = ingest.add_feed(session, "https://papers.example.org/bench.xml").id
            t0 = time.perf_counter()
            parsed = parse_feed(data)
            t1 = time.perf_counter()
            with db.transaction(app.sessions) as session:
                new = ingest.store_entries(session, feed_id, parsed.entries, datetime.now(UTC))
            t2 = time.perf_counter()
            assert new == args.entries, new
            app.close()
        parse_times.append(t1 - t0)
        store_times.append(t2 - t1)
        ratios.append((t2 - t0) / feedparser_times[-1])
    result = {
        "entries": args.entries,
        "bytes": len(data),
        "feedparser_parse_s": round(min(feedparser_times), 3),
        "parse_normalize_sanitize_s": round(min(parse_times), 3),
        "store_s": round(min(store_times), 3),
        "ingest_ratio_vs_feedparser": round(statistics.median(ratios), 3),
        "ratios_by_round": [round(r, 3) for r in ratios],
    }
    for key, value in result.items():
        print(f"{key:<30} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
