"""Figures for the reliability campaign: each test records what it measured with
``figures.add(name, value, note=...)``; the run ends with one table of all of them, also written
to tests/artifacts/reliability.json for CI to keep.

This folder has an ``__init__.py`` on purpose: without it this file would be imported as the
top-level module ``conftest`` and shadow tests/conftest.py for every ``from conftest import ...``.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

ARTIFACT = Path(__file__).resolve().parent.parent / "artifacts" / "reliability.json"


@dataclass(frozen=True)
class Figure:
    test: str
    name: str
    value: Any
    note: str


class Figures:
    """Collects figures across the whole session, in the order they were recorded."""

    def __init__(self) -> None:
        self._items: list[Figure] = []
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def add(self, test: str, name: str, value: Any, note: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 3)
        with self._lock:
            self._items.append(Figure(test, name, value, note))

    @property
    def items(self) -> list[Figure]:
        with self._lock:
            return list(self._items)


class FigureRecorder:
    """The per-test view handed to tests: figures.add(name, value, note="")."""

    def __init__(self, store: Figures, test: str) -> None:
        self._store = store
        self.test = test

    def add(self, name: str, value: Any, note: str = "") -> None:
        self._store.add(self.test, name, value, note)


_STORE_KEY = pytest.StashKey[Figures]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STORE_KEY] = Figures()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> FigureRecorder:
    store = request.config.stash[_STORE_KEY]
    # "test_crash.py::test_sigkill_storm[sqlite]" reads better as "crash[sqlite]"
    name = request.node.name.removeprefix("test_")
    return FigureRecorder(store, f"{Path(str(request.node.fspath)).stem}::{name}")


def _table(items: list[Figure]) -> list[str]:
    rows = [("test", "figure", "value", "note")]
    rows += [(f.test, f.name, str(f.value), f.note) for f in items]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row[:3])) + "  " + row[3]
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ----")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    store = config.stash.get(_STORE_KEY, None)
    if store is None or not store.items:
        return
    items = store.items
    terminalreporter.write_sep("=", "reliability figures")
    for line in _table(items):
        terminalreporter.write_line(line)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "session_seconds": round(time.monotonic() - store.started, 1),
        "exit_status": int(exitstatus),
        "figures": [asdict(f) for f in items],
    }
    tmp = ARTIFACT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(ARTIFACT)
    terminalreporter.write_line(f"(written to {ARTIFACT})")
