"""The long-running roles and their commands: `serve` (everything in one process), and
`scheduler` and `worker` to run apart.

Each role runs in a thread of its own; the main thread only waits for a signal. On SIGTERM or
SIGINT every role is asked to stop at once: the worker stops claiming and hands back what it
has not sent, the scheduler lets its running job stop at the next batch or feed and gives up
the lock, the web server finishes its requests. Whatever has not stopped when
`shutdown_grace_seconds` is up is abandoned and the process exits 0 anyway: the ledger says
what was in hand, and the next start (or another worker) resumes it. A second signal exits at
once.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from types import FrameType

import click
import uvicorn
from rich.console import Console
from rich.table import Table
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from newsletter import db, logs
from newsletter.app import App
from newsletter.cli import fail, ready_app
from newsletter.leader import AlreadyRunning, hold_sqlite, lock_holder, sqlite_holder
from newsletter.ops import ops_routes, snapshot
from newsletter.scheduler import Scheduler
from newsletter.worker import Worker

log = logging.getLogger(__name__)
console = Console(highlight=False)

WEB_START_TIMEOUT = 30.0


class Role:
    """One role in a thread. A role that ends on its own (it crashed) stops the service."""

    def __init__(
        self,
        name: str,
        run: Callable[[], None],
        stop: Callable[[], None],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self.stop = stop
        self.ready = ready  # waits until the role serves; False if it could not start
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # SystemExit too: uvicorn exits when it cannot bind
            self.error = exc
            log.exception("the %s stopped unexpectedly", self.name)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


class WebServer:
    """uvicorn in a thread of its own, so that the main thread keeps the signals (uvicorn
    only installs its handlers on the main thread)."""

    def __init__(self, asgi: Starlette, host: str, port: int, grace: float) -> None:
        config = uvicorn.Config(
            asgi,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(int(grace) - 1, 1),
        )
        self.server = uvicorn.Server(config)
        self.where = f"http://{host}:{port}"

    def role(self, name: str = "web server") -> Role:
        role = Role(name, self.server.run, self.stop)

        def ready() -> bool:
            deadline = time.monotonic() + WEB_START_TIMEOUT
            while time.monotonic() < deadline and role.alive and not self.server.started:
                time.sleep(0.05)
            if self.server.started:
                log.info("web server listening on %s", self.where)
            return bool(self.server.started)

        role.ready = ready
        return role

    def stop(self) -> None:
        self.server.should_exit = True


def web_app(app: App, routes: Sequence[BaseRoute]) -> Starlette:
    """The full web app with the ops routes added, or, in a build without it, the ops
    routes alone."""
    try:
        module = importlib.import_module("newsletter.web")
        create_app: Callable[..., Starlette] | None = getattr(module, "create_app", None)
    except ImportError as exc:
        if exc.name and not "newsletter.web".startswith(exc.name):
            raise  # newsletter.web is there but something it imports is not: a real error
        create_app = None
    if create_app is None:
        log.info("the web app is not part of this build: serving /healthz and /metrics only")
        return Starlette(routes=list(routes))
    return create_app(app, extra_routes=list(routes))


def run_roles(app: App, roles: Sequence[Role]) -> int:
    """Start the roles, wait for a signal (or a role that dies), stop them all within the
    grace period. Returns the exit code."""
    grace = app.settings.shutdown_grace_seconds
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        log.info("%s received: stopping (at most %gs)", signal.Signals(signum).name, grace)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for role in roles:
            role.start()
            if role.ready is not None and not role.ready():
                log.error("the %s could not start (see above)", role.name)
                code = 1
                stopping.set()
                break
        while not stopping.wait(0.5):
            dead = [r for r in roles if not r.alive]
            if dead:
                log.error("stopping everything: the %s ended", dead[0].name)
                code = 1
                break
        deadline = time.monotonic() + grace
        started = [r for r in roles if r.thread.ident is not None]
        for role in started:
            role.stop()
        for role in started:
            role.thread.join(max(deadline - time.monotonic(), 0))
        left = [r.name for r in started if r.alive]
        if left:
            log.warning(
                "%s did not stop within %gs; exiting anyway (rows still claimed are taken "
                "over by the next start or another worker)",
                ", ".join(left),
                grace,
            )
            logging.shutdown()
            os._exit(code)
        log.info("stopped cleanly")
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare(ctx: click.Context) -> App:
    """A ready app (schema current, secret key present) with service logging; on SQLite,
    the only service process on its database."""
    with ready_app(ctx) as app:
        _ = app.secret_key  # fail now, not at the first send
        try:
            lock = hold_sqlite(app.engine)
        except AlreadyRunning as exc:
            fail(str(exc))
    if lock is not None:
        ctx.call_on_close(lock.close)
    logs.configure(app.settings)
    return app


def _web(app: App, host: str | None, port: int | None, asgi: Starlette) -> WebServer:
    settings = app.settings
    return WebServer(
        asgi,
        host or settings.web_host,
        settings.web_port if port is None else port,
        settings.shutdown_grace_seconds,
    )


_host_option = click.option("--host", help="Address to listen on (default: web_host setting).")
_port_option = click.option(
    "--port", type=int, help="Port to listen on (default: web_port setting, 8000)."
)


@click.command("serve")
@_host_option
@_port_option
@click.pass_context
def serve_command(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run everything in one process: the scheduler (fetch feeds, plan digests), a worker
    that sends them, and the web app with /healthz and /metrics.

    On PostgreSQL you can start several: one runs the scheduler, the others stand by, and
    all of them send."""
    app = _prepare(ctx)
    worker = Worker(app)
    scheduler = Scheduler(app, on_planned=worker.wake)
    routes = ops_routes(app, leader=lambda: scheduler.leading)
    server = _web(app, host, port, web_app(app, routes))
    roles = [
        server.role(),
        Role("scheduler", scheduler.run, scheduler.stop),
        Role("worker", worker.run, worker.stop),
    ]
    sys.exit(run_roles(app, roles))


def _ops_server(app: App, port: int | None, leader: Callable[[], bool] | None) -> list[Role]:
    if port is None:
        return []
    server = _web(app, None, port, Starlette(routes=ops_routes(app, leader=leader)))
    return [server.role()]


_ops_port_option = click.option(
    "--port",
    type=int,
    help="Serve /healthz and /metrics on this port (on web_host); default: not at all.",
)


@click.command("scheduler")
@_ops_port_option
@click.pass_context
def scheduler_command(ctx: click.Context, port: int | None) -> None:
    """Run only the scheduler: fetch feeds and plan digests, sending nothing.

    Start it on as many machines as you like (PostgreSQL): one leads, the others stand by
    and take over within seconds if it dies."""
    app = _prepare(ctx)
    scheduler = Scheduler(app)
    roles = _ops_server(app, port, lambda: scheduler.leading)
    roles.append(Role("scheduler", scheduler.run, scheduler.stop))
    sys.exit(run_roles(app, roles))


@click.command("worker")
@_ops_port_option
@click.option(
    "--host-id",
    help="Name this machine in the worker's claims (default: the hostname). Claims of a dead "
    "process with the same host id are taken over at once, so each machine needs its own.",
)
@click.pass_context
def worker_command(ctx: click.Context, port: int | None, host_id: str | None) -> None:
    """Run only a worker: send the digests the scheduler planned.

    Start as many as you like on PostgreSQL: they share the queue and never send the same
    digest twice."""
    app = _prepare(ctx)
    worker = Worker(app, host=host_id)
    roles = _ops_server(app, port, None)
    roles.append(Role("worker", worker.run, worker.stop))
    sys.exit(run_roles(app, roles))


@click.command("status")
@click.pass_context
def status_command(ctx: click.Context) -> None:
    """Show at a glance: the queue, the last run of each job, failing feeds, and which
    process runs the scheduler."""
    with ready_app(ctx) as app, app.session() as session:
        snap = snapshot(session)
    d = snap.deliveries
    console.print(
        f"[bold]Queue[/]  pending {d['pending']}  sending {d['sending']}  sent {d['sent']}  "
        f"failed {d['failed']}  (retries {snap.retries})"
    )
    jobs = Table(
        "job", "last run", "duration", "result", "last success", "runs", "failed", box=None
    )
    for job in snap.jobs:
        result = "ok" if job.last_error is None else f"[red]{job.last_error}[/]"
        jobs.add_row(
            job.name,
            _when(job.last_started_at),
            "" if job.last_duration_seconds is None else f"{job.last_duration_seconds:.2f}s",
            result,
            _when(job.last_success_at),
            str(job.runs),
            str(job.failures),
        )
    console.print(jobs if jobs.rows else "[bold]Jobs[/]  none has run yet")
    if snap.failing_feeds:
        feeds = Table("failing feed", "failures", "last error", "next try", box=None)
        for feed in snap.failing_feeds:
            feeds.add_row(feed.url, str(feed.failures), feed.error, _when(feed.next_fetch_at))
        console.print(feeds)
    else:
        console.print("[bold]Feeds[/]  none failing")
    console.print(f"[bold]Scheduler[/]  {_scheduler_line(app)}")


def _scheduler_line(app: App) -> str:
    if db.is_sqlite(app.engine):
        owner = sqlite_holder(app.engine)
        if owner is None:
            return "SQLite: no service process is running"
        return f"SQLite: {owner} runs everything (one process does it all)"
    holder = lock_holder(app.engine)
    if holder is None:
        return "nobody holds the scheduler lock: no scheduler is running"
    where = f" from {holder.client}" if holder.client else ""
    return f"{holder.application or 'a session'} (backend pid {holder.pid}{where})"


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"
