"""Precision and recall of newsletter.matching against hand labels, next to a substring matcher.

The labels (benchmarks/data/matching_labels.toml) pair realistic reader profiles with the fixture
papers a human judged relevant to each profile's intent. The baseline is what most keyword
alerting does: a case-insensitive substring test of each keyword (and each excluded word)
against title + abstract.

Micro figures pool every (profile, paper) decision; macro figures average per-profile precision
over the profiles for which the matcher returned anything, and recall over all profiles.

    .venv/bin/python benchmarks/matching_eval.py [--labels PATH] [--json PATH] [--details]
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newsletter.matching import Doc, MatchIndex, Profile  # noqa: E402

LABELS = ROOT / "benchmarks" / "data" / "matching_labels.toml"

Matcher = Callable[[Profile], set[str]]


@dataclass
class Score:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float | None:
        returned = self.tp + self.fp
        return self.tp / returned if returned else None

    @property
    def recall(self) -> float | None:
        relevant = self.tp + self.fn
        return self.tp / relevant if relevant else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if not p or not r:
            return 0.0 if p is not None and r is not None else None
        return 2 * p * r / (p + r)


def load(labels: Path) -> tuple[list[Doc], list[dict[str, object]]]:
    data = tomllib.loads(labels.read_text(encoding="utf-8"))
    papers = json.loads((ROOT / data["fixture"]).read_text(encoding="utf-8"))
    docs = [Doc(i, p["title"], p["abstract"], None) for i, p in enumerate(papers)]
    known = {d.title for d in docs}
    for profile in data["profile"]:
        unknown = set(profile["relevant"]) - known
        if unknown:
            raise SystemExit(f"{labels}: {profile['name']}: not fixture titles: {sorted(unknown)}")
    return docs, data["profile"]


def ours(docs: list[Doc]) -> Matcher:
    index = MatchIndex(docs)
    titles = {d.id: d.title for d in docs}

    def run(profile: Profile) -> set[str]:
        return {titles[p.doc_id] for p in index.match(profile)}

    return run


def substring(docs: list[Doc]) -> Matcher:
    texts = [(d.title, f"{d.title}\n{d.summary}".casefold()) for d in docs]

    def run(profile: Profile) -> set[str]:
        keywords = [k.casefold() for k in profile.keywords]
        exclude = [k.casefold() for k in profile.exclude]
        return {
            title
            for title, text in texts
            if any(k in text for k in keywords) and not any(k in text for k in exclude)
        }

    return run


def fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--json", type=Path, help="also write the table to this file")
    parser.add_argument("--details", action="store_true", help="list each miss and false hit")
    args = parser.parse_args()

    docs, profiles = load(args.labels)
    matchers = {"ours": ours(docs), "substring": substring(docs)}
    rows: list[dict[str, object]] = []
    totals = {name: Score(0, 0, 0) for name in matchers}
    per_profile: dict[str, list[Score]] = {name: [] for name in matchers}

    header = f"{'profile':<24} {'rel':>3}  " + "  ".join(
        f"{name + ' P':>11} {'R':>5} {'F1':>5}" for name in matchers
    )
    print(header)
    print("-" * len(header))
    for spec in profiles:
        profile = Profile(
            tuple(spec["keywords"]),  # type: ignore[arg-type]
            tuple(spec["exclude"]),  # type: ignore[arg-type]
            max_items=len(docs),
        )
        relevant = set(spec["relevant"])  # type: ignore[call-overload]
        row: dict[str, object] = {"profile": spec["name"], "relevant": len(relevant)}
        cells = []
        for name, run in matchers.items():
            got = run(profile)
            score = Score(len(got & relevant), len(got - relevant), len(relevant - got))
            totals[name].tp += score.tp
            totals[name].fp += score.fp
            totals[name].fn += score.fn
            per_profile[name].append(score)
            row[name] = {
                "tp": score.tp,
                "fp": score.fp,
                "fn": score.fn,
                "precision": score.precision,
                "recall": score.recall,
                "f1": score.f1,
                "false_hits": sorted(got - relevant),
                "misses": sorted(relevant - got),
            }
            cells.append(f"{fmt(score.precision):>11} {fmt(score.recall):>5} {fmt(score.f1):>5}")
        rows.append(row)
        print(f"{spec['name']:<24} {len(relevant):>3}  " + "  ".join(cells))
        if args.details:
            for name in matchers:
                detail = row[name]
                assert isinstance(detail, dict)
                for title in detail["false_hits"]:
                    print(f"      {name:>9} false hit: {title[:70]}")
                for title in detail["misses"]:
                    print(f"      {name:>9} miss:      {title[:70]}")

    print("-" * len(header))
    summary: dict[str, dict[str, float | int | None]] = {}
    for label in ("micro", "macro"):
        cells = []
        for name in matchers:
            if label == "micro":
                s = totals[name]
                p, r, f = s.precision, s.recall, s.f1
                summary[name] = {"tp": s.tp, "fp": s.fp, "fn": s.fn}
            else:
                p = mean([s.precision for s in per_profile[name]])
                r = mean([s.recall for s in per_profile[name]])
                f = mean([s.f1 for s in per_profile[name]])
            summary[name].update({f"{label}_precision": p, f"{label}_recall": r, f"{label}_f1": f})
            cells.append(f"{fmt(p):>11} {fmt(r):>5} {fmt(f):>5}")
        print(f"{label:<24} {'':>3}  " + "  ".join(cells))
    for name, s in totals.items():
        print(f"{name}: {s.tp} true hits, {s.fp} false hits, {s.fn} misses")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"profiles": rows, "summary": summary}, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
