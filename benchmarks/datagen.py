"""Realistic data at scale, made from the fixture papers, shared by every benchmark.

Entries recombine the fixture abstracts' sentences and title words, so word frequencies (and so
how many entries a keyword hits) look like a real day; profiles draw 2-8 keywords from a pool of
real words, phrases and acronyms with a Zipf-like skew, as popular interests are shared among
real readers; about one profile in five has an excluded word.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from xml.sax.saxutils import escape

from sqlalchemy import insert

from newsletter.app import App
from newsletter.db import transaction
from newsletter.matching import Doc, Profile
from newsletter.models import Entry, Feed, Subscriber, SubscriberStatus

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "daily-papers.json"

CURATED = [
    "diffusion models",
    "Schrödinger bridge",
    "equivariant",
    "E(3)",
    "quantum computing",
    "qubit",
    "LLM",
    "language models",
    "fine-tuning",
    "RL",
    "reinforcement learning",
    "GNN",
    "graph neural networks",
    "message passing",
    "Gaussian process",
    "GP",
    "active learning",
    "SGD",
    "stochastic gradient descent",
    "convergence rate",
    "zeroth-order",
    "PDE",
    "physics-informed",
    "fluid dynamics",
    "pruning",
    "quantization",
    "model compression",
    "LoRA",
    "SSL",
    "self-supervised",
    "contrastive learning",
    "spin glass",
    "crystal",
    "DFT",
    "molecular",
    "interatomic potential",
    "inverse problems",
    "MRI",
    "tomography",
    "optimal transport",
    "bilevel optimization",
    "score-based",
    "Bayesian",
    "transformer",
    "sampling",
    "neural networks",
    "optimization",
    "uncertainty quantification",
]


def synthetic_docs(n: int, seed: int) -> list[Doc]:
    papers = json.loads(FIXTURE.read_text())
    sentences = [
        s for p in papers for s in re.split(r"(?<=[.!?])\s+", p["abstract"]) if len(s) > 20
    ]
    titles = [p["title"] for p in papers]
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    docs = []
    for i in range(n):
        title_words = rng.choice(titles).split()
        rng.shuffle(title_words)
        summary = " ".join(rng.sample(sentences, rng.randint(5, 9)))
        docs.append(Doc(i, " ".join(title_words), summary, start + timedelta(minutes=i)))
    return docs


def keyword_pool(docs: list[Doc], size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = sorted({w.lower() for d in docs[:200] for w in re.findall(r"[A-Za-z]{4,}", d.summary)})
    bigrams = sorted(
        {
            f"{a} {b}".lower()
            for d in docs[:100]
            for a, b in zip(d.summary.split(), d.summary.split()[1:], strict=False)
            if a.isalpha() and b.isalpha() and len(a) > 3 and len(b) > 3
        }
    )
    pool = list(CURATED)
    pool += rng.sample(words, min(len(words), size // 2))
    pool += rng.sample(bigrams, min(len(bigrams), size - len(pool)))
    return pool


def profiles(pool: list[str], n: int, seed: int) -> list[Profile]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(pool))]  # Zipf: popular keywords are shared
    out = []
    for _ in range(n):
        keywords = tuple(dict.fromkeys(rng.choices(pool, weights, k=rng.randint(2, 8))))
        exclude = tuple(rng.choices(pool, weights, k=1)) if rng.random() < 0.2 else ()
        if set(exclude) & set(keywords):
            exclude = ()
        out.append(Profile(keywords, exclude, max_items=10))
    return out


def naive_scanner(docs: list[Doc]) -> Callable[[Profile], list[int]]:
    """The cheapest scan there is: substring tests on texts lower-cased once, up front."""
    texts = [(d.id, f"{d.title}\n{d.summary}".lower()) for d in docs]

    def scan(profile: Profile) -> list[int]:
        kws = [k.lower() for k in profile.keywords]
        exc = [k.lower() for k in profile.exclude]
        return [
            i
            for i, text in texts
            if any(k in text for k in kws) and not any(k in text for k in exc)
        ][: profile.max_items]

    return scan


def rss_bytes(docs: Sequence[Doc], *, html_every: int = 3) -> bytes:
    """An arXiv-style RSS document: preamble in each description, some HTML markup."""
    items = []
    for d in docs:
        summary = d.summary
        if html_every and d.id % html_every == 0:
            summary = f"<p>{escape(summary)}</p><p><em>Code:</em> <a href='https://x.example/{d.id}'>repo</a></p>"
        else:
            summary = escape(summary)
        published = format_datetime(d.published or datetime(2025, 1, 1, tzinfo=UTC))
        items.append(
            f"<item><title>{escape(d.title)}</title>"
            f"<link>https://papers.example.org/{d.id}</link>"
            f"<description>arXiv:2501.{d.id:05d}v1 Announce Type: new\nAbstract: "
            f"{escape(summary)}</description>"
            f"<guid isPermaLink='false'>urn:paper:{d.id}</guid><pubDate>{published}</pubDate>"
            f"<dc:creator>A. Author, B. Author</dc:creator><category>cs.LG</category></item>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><channel><title>Bench</title>'
        "<link>https://papers.example.org</link><description>bench</description>"
        + "".join(items)
        + "</channel></rss>"
    ).encode()


def populate(app: App, *, entries: int, subscribers: int, seed: int = 7) -> None:
    """Bulk-load a day's entries and a subscriber list straight into the database: the
    benchmarks measure sending, not the importer."""
    docs = synthetic_docs(entries, seed)
    pool = keyword_pool(docs, 3000, seed)
    profs = profiles(pool, subscribers, seed)
    now = datetime.now(UTC)
    with transaction(app.sessions) as session:
        feed = Feed(url="https://papers.example.org/bench.xml", title="Bench papers")
        session.add(feed)
        session.flush()
        feed_id = feed.id
        session.execute(
            insert(Entry),
            [
                {
                    "feed_id": feed_id,
                    "guid": f"urn:paper:{d.id}",
                    "title": d.title,
                    "summary_html": f"<p>{escape(d.summary)}</p>",
                    "summary_text": d.summary,
                    "link": f"https://papers.example.org/{d.id}",
                    "authors": ["A. Author", "B. Author"],
                    "categories": ["cs.LG"],
                    "published": d.published,
                    "fetched_at": now,
                }
                for d in docs
            ],
        )
    timezones = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney"]
    for start in range(0, len(profs), 10_000):
        with transaction(app.sessions) as session:
            session.execute(
                insert(Subscriber),
                [
                    {
                        "email": f"reader{i:07d}@example.org",
                        "status": SubscriberStatus.ACTIVE,
                        "keywords": list(p.keywords),
                        "exclude": list(p.exclude),
                        "max_items": p.max_items,
                        "timezone": timezones[i % len(timezones)],
                        "send_hour": 7,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i, p in enumerate(profs[start : start + 10_000], start)
                ],
            )
