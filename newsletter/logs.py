"""Logging for the long-running roles: every line written during a job run carries the job
and its run id, so one run's story can be picked out of months of output, and with
``log_json`` each line is one JSON object for a log collector.

The run is carried in a context variable rather than passed around, so code that knows
nothing about runs (ingest, sending) still logs with the run's id.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from newsletter.config import Settings

_RUN: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "newsletter_run", default=None
)

TEXT_FORMAT = "%(run)s%(message)s"  # on a terminal: Rich adds time and level
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(run)s%(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Libraries whose per-event lines would bury ours: APScheduler says "Running job" every minute,
# uvicorn logs every health check request.
QUIET = {"apscheduler": logging.WARNING, "uvicorn.access": logging.WARNING}


class RunFilter(logging.Filter):
    """Adds ``job`` and ``run_id`` (None outside a run) to each record, or for text output
    ``run``, a ``[job run_id]`` prefix."""

    def __init__(self, *, prefix: bool) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        current = _RUN.get()
        if self.prefix:
            record.run = f"[{current[0]} {current[1]}] " if current else ""
        else:
            record.job, record.run_id = current if current else (None, None)
        return True


@contextmanager
def run_context(job: str, run_id: str) -> Iterator[None]:
    token = _RUN.set((job, run_id))
    try:
        yield
    finally:
        _RUN.reset(token)


def _json_formatter() -> logging.Formatter:
    try:  # python-json-logger 3 and later
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # pragma: no cover - 2.x
        from pythonjsonlogger.jsonlogger import (  # type: ignore[attr-defined,no-redef,unused-ignore]
            JsonFormatter,
        )
    return JsonFormatter(
        JSON_FIELDS,
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"service": "newsletter"},
    )


def configure(settings: Settings) -> None:
    """Set up logging for a service role: run ids on every line, INFO from our own loggers
    (what each run did is the point of these logs), JSON if the operator asked for it. On a
    terminal the command line's Rich handler stays; elsewhere (a container, a journal) lines
    are plain, one per event, never wrapped."""
    root = logging.getLogger()
    keep = not settings.log_json and sys.stderr.isatty() and bool(root.handlers)
    if not keep:
        handler = logging.StreamHandler(sys.stderr)
        if settings.log_json:
            handler.setFormatter(_json_formatter())
        else:
            handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
    for existing in root.handlers:
        if not any(isinstance(f, RunFilter) for f in existing.filters):
            existing.addFilter(RunFilter(prefix=not settings.log_json))
        if keep:
            existing.setFormatter(logging.Formatter(TEXT_FORMAT))
    ours = logging.getLogger("newsletter")
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
