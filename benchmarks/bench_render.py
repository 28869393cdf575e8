"""Render: complete MIME messages (HTML + text + headers) per second on one core.

Digests are made the way `send` makes them (compose.Composer: signed links, highlighted
keywords, one item object per paper and matched keywords) from synthetic papers and 2-8 keyword
profiles, 10 items each. The timed part is what `send` does per message: render_bytes.
Items highlight their keywords lazily (from the planner's index, as in `send`); that is
composing, so it is done before the clock starts. In `send`, where a paper and keyword pair
recurs across thousands of readers, it is found once and counted in the end-to-end figures;
in this sample of 5,000 readers nearly every pair is new, and timing it here would halve
the figure.

A second figure renders a fresh set of the same digests with every paper's template skeleton
made before the clock (see `skeletons_ahead`): the cost per message once a run is past its
first emails of each paper.

Both figures are taken in rounds (`--rounds`, 3 by default), alternating, each on a fresh
renderer and fresh digests with the module's caches emptied, as in a new process; the medians
are the figures, and each round's is printed beside them. One round of each moved by a
fifth from one run to the next on this shared machine.

The standard library's route (an `EmailMessage` with the same headers and bodies, encodings
of its own choosing, `as_bytes`) is timed on a sample of the same digests in the same run, its
bodies rendered before its clock starts. The ratio of the two moves less than either figure
when the shared machine is slow or busy. (It is not the issue's 700/s: that route spends most
of its time quoted-printable encoding in Python, and these digests are 25 KB.)

    .venv/bin/python benchmarks/bench_render.py [--messages N] [--rounds N] [--stdlib-sample N]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.datagen import keyword_pool, profiles, synthetic_docs
from newsletter import render
from newsletter.compose import Composer, Paper
from newsletter.config import Settings
from newsletter.drain import collector_for_sending
from newsletter.matching import MatchIndex
from newsletter.render import Digest, Renderer
from newsletter.tokens import Signer


def build_digests(n: int, renderer: Renderer) -> list[Digest]:
    docs = synthetic_docs(2000, 3)
    papers = {
        d.id: Paper(
            id=d.id,
            title=d.title,
            summary=d.summary,
            link=f"https://papers.example.org/{d.id}",
            authors=("A. Author", "B. Author"),
            published=d.published,
            source="Bench papers",
        )
        for d in docs
    }
    index = MatchIndex(docs, highlights=True)  # the planner's index, as `send` builds it
    composer = Composer(renderer, Signer("bench-secret"))
    composer.use_index(index)  # as `send` does: highlights come from the planner's index
    rng = random.Random(3)
    digests = []
    for i, profile in enumerate(profiles(keyword_pool(docs, 3000, 3), n, 3)):
        picks = index.match(profile)
        if not picks:
            continue
        # Through Composer.item, exactly as `send` builds them: one item object per (paper,
        # matched keywords), which is what lets the renderer reuse its encoded fragment.
        items = [composer.item(papers[p.doc_id], p.hits) for p in picks]
        for item in items:  # highlighting is composing, not rendering: done before the clock
            item.title_parts, item.summary_parts  # noqa: B018
        digests.append(
            composer.digest(
                subscriber_id=i,
                email=f"reader{i:07d}@example.org",
                period="2026-11-22",
                day=date(2026, 11, 22),
                message_id=f"<digest.2026-11-22.{i}.{rng.getrandbits(32):x}@example.org>",
                items=items,
            )
        )
    return digests


def prepared(messages: int, now: datetime) -> tuple[Renderer, list[Digest]]:
    """The renderer and the digests as the benchmark renders them: made, then one rendered to
    load the templates and warm the caches, as a long run would have them. The module-level
    caches are emptied first, so that every round starts as a fresh `send` process would."""
    render._hit_facts.cache_clear()
    render._broken.cache_clear()
    renderer = Renderer(Settings(from_addr="Paper Digest <digest@example.org>"))
    digests = build_digests(messages, renderer)
    renderer.render_bytes(digests[0], now=now)
    return renderer, digests


def stdlib_route(renderer: Renderer, digests: list[Digest], now: datetime) -> float:
    """Messages per second through the standard library's `EmailMessage`, for the same
    digests with the same headers (read back from our own message, so the two cannot drift
    apart); the bodies (Jinja, not MIME) and headers are made beforehand and not timed, so
    the figure flatters this route rather than ours."""
    prepared = [
        (
            [
                (name, str(value))
                for name, value in renderer.message(d, now=now).items()
                if not name.lower().startswith(("content-", "mime-"))  # set_content's own
            ],
            *renderer.bodies(d),
        )
        for d in digests
    ]
    t0 = time.process_time()
    for headers, text, html in prepared:
        msg = EmailMessage()
        for name, value in headers:
            msg[name] = value
        msg.set_content(text)  # the encodings it picks itself, as most code leaves it
        msg.add_alternative(html, subtype="html")
        msg.as_bytes(policy=SMTP)
    return len(prepared) / (time.process_time() - t0)


def rate(renderer: Renderer, digests: list[Digest], now: datetime) -> tuple[float, int]:
    """Messages per second of CPU rendering `digests`, and the bytes rendered; timed as `send`
    renders (see drain.collector_for_sending)."""
    with collector_for_sending():
        t0 = time.process_time()
        total_bytes = 0
        for digest in digests:
            total_bytes += len(renderer.render_bytes(digest, now=now))
        cpu_s = time.process_time() - t0
    return len(digests) / cpu_s, total_bytes


def skeletons_ahead(messages: int, now: datetime) -> tuple[float, int, float]:
    """Messages per second once every paper's template skeleton is made (the first email to
    show a paper makes it: 0.1-0.2 ms, once per paper and process), with the number of
    papers and the CPU seconds their skeletons took, made beforehand. The main figure counts
    them into its 5,000 messages, where ~1,850 papers' skeletons are a fifth of the time; in
    a run they are made once for tens of thousands of messages (and `send`'s helper makes
    them while it waits for the index). Fresh digests and renderer, so nothing else is warm."""
    renderer, digests = prepared(messages, now)
    papers = {id(item.paper): item for digest in digests for item in digest.items}
    with collector_for_sending():
        t0 = time.process_time()
        for item in papers.values():
            renderer.prepare(item)
        skeletons_s = time.process_time() - t0
    per_s, _ = rate(renderer, digests, now)
    return per_s, len(papers), skeletons_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of each figure, alternating, each on fresh digests; medians are reported",
    )
    parser.add_argument(
        "--stdlib-sample", type=int, default=500, help="messages for the EmailMessage route"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    now = datetime.now(UTC)
    ours: list[float] = []
    ahead: list[float] = []
    stdlib: list[float] = []
    for _ in range(max(args.rounds, 1)):
        # The headline: every paper's skeleton made by the first email that shows it, as in
        # `send`; then the standard library's route on the same digests, back to back.
        renderer, digests = prepared(args.messages, now)
        per_s, total_bytes = rate(renderer, digests, now)
        ours.append(per_s)
        with collector_for_sending():
            stdlib.append(stdlib_route(renderer, digests[: args.stdlib_sample], now))
        ahead_per_s, papers, skeletons_s = skeletons_ahead(args.messages, now)
        ahead.append(ahead_per_s)
    ours_per_s = statistics.median(ours)
    result = {
        "messages": len(digests),
        "rounds": len(ours),
        "items_per_message": round(sum(len(d.items) for d in digests) / len(digests), 2),
        "mean_message_kib": round(total_bytes / len(digests) / 1024, 1),
        "messages_per_s_one_core": round(ours_per_s),
        "messages_per_s_by_round": [round(x) for x in ours],
        "stdlib_route_messages_per_s": round(statistics.median(stdlib)),
        # Each round's own ratio (the two timed back to back), then their median: the ratio
        # of two medians could pair a fast hour's figure with a slow hour's.
        "ratio_vs_stdlib_route": round(
            statistics.median(o / s for o, s in zip(ours, stdlib, strict=True)), 2
        ),
        "messages_per_s_skeletons_ahead": round(statistics.median(ahead)),
        "skeletons_ahead_by_round": [round(x) for x in ahead],
        "papers": papers,
        "skeletons_cpu_s": round(skeletons_s, 3),
    }
    for key, value in result.items():
        print(f"{key:<30} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
