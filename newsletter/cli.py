"""The `newsletter` command line.

Every command reads the same settings (environment, optional TOML file) and says what it did in
one or two lines; errors say what to do next and exit non-zero.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

# `ingest` (httpx, feedparser, nh3) and `subscribers` (email-validator) are imported in the
# commands that use them: `send`, run daily for the whole list and in every helper process,
# needs neither, and they were a quarter of its imports (90 ms).
from newsletter import db, digests
from newsletter.app import App, SecretKeyMissing
from newsletter.compose import Composer, digest_from_picks
from newsletter.config import ConfigError, Settings, load_settings
from newsletter.exiting import exit_quickly
from newsletter.models import Delivery, DeliveryStatus, Feed, Subscriber, SubscriberStatus, utcnow
from newsletter.render import Renderer
from newsletter.tokens import Signer

console = Console(stderr=False, highlight=False)
err = Console(stderr=True, highlight=False)
log = logging.getLogger("newsletter")

F = TypeVar("F", bound=Callable[..., Any])
REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FEED = Path(__file__).resolve().parent / "samples" / "daily-papers.rss.xml"


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    sys.exit(code)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    handler = RichHandler(console=err, show_path=False, rich_tracebacks=verbose > 1)
    logging.basicConfig(level=max(level, logging.DEBUG), handlers=[handler], format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def get_app(ctx: click.Context) -> App:
    app = ctx.obj
    assert isinstance(app, App)
    return app


@contextmanager
def ready_app(ctx: click.Context) -> Iterator[App]:
    """The app with a current schema, or a message that says which command fixes it."""
    app = get_app(ctx)
    try:
        app.check_ready()
        yield app
    except db.DatabaseNotReady as exc:
        fail(str(exc))
    except SecretKeyMissing as exc:
        fail(str(exc))


class Group(click.Group):
    """Lists commands in the order they are declared: the order a newcomer needs them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


# Commands that live beside their feature ("module:attribute"), imported only when used so
# that `newsletter --help` and the plain pipeline commands start fast.
FEATURE_COMMANDS = {
    "web": "newsletter.web.cli:web",
    "serve": "newsletter.service:serve_command",
    "scheduler": "newsletter.service:scheduler_command",
    "worker": "newsletter.service:worker_command",
    "status": "newsletter.service:status_command",
    "bounces": "newsletter.bounces:bounces_command",
    "dkim": "newsletter.dkim:dkim_group",
}


class MainGroup(Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.commands, *(n for n in FEATURE_COMMANDS if self._load(n) is not None)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands.get(cmd_name) or self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        import importlib

        target = FEATURE_COMMANDS.get(name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return None  # the feature is not part of this build
            raise
        command = getattr(module, attribute, None)
        return command if isinstance(command, click.Command) else None


def run() -> NoReturn:
    """The `newsletter` program (its console script and `python -m newsletter`): `main`,
    then `exiting.exit_quickly` rather than the interpreter's slow teardown."""
    try:
        main()
    except SystemExit as exc:
        exit_quickly(exc.code)
    exit_quickly(0)


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="NEWSLETTER_CONFIG",
    help="TOML settings file (default: ./newsletter.toml when present).",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="newsletter")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, verbose: int) -> None:
    """Daily digests of new research papers, matched to each reader's interests.

    \b
    Typical first run:
      newsletter init
      newsletter feeds add https://export.arxiv.org/rss/cs.LG
      newsletter subscribers import subscribers/
      newsletter fetch
      newsletter send

    Settings come from NEWSLETTER_* environment variables and an optional TOML file;
    `newsletter config` shows what is in effect. `newsletter demo` runs it all on samples.
    """
    _setup_logging(verbose)
    try:
        settings = load_settings(config_file=config_file)
    except ConfigError as exc:
        fail(f"configuration: {exc}")
    ctx.obj = App(settings)
    ctx.call_on_close(ctx.obj.close)


# -- setup ---------------------------------------------------------------------------------


@main.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create or upgrade the database and make a secret key for signed links. Safe to repeat."""
    app = get_app(ctx)
    created = app.init()
    where = app.engine.url.render_as_string(hide_password=True)
    console.print(f"Database ready at {where} (schema {db.current_revision(app.engine)}).")
    if created:
        console.print("Created a secret key for signed links and stored it in the database.")


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Show the settings in effect (secrets hidden)."""
    table = Table("setting", "value", "environment variable", box=None)
    for key, value in get_app(ctx).settings.redacted().items():
        table.add_row(key, str(value), f"NEWSLETTER_{key.upper()}")
    console.print(table)


@main.group(cls=Group, name="db")
def db_group() -> None:
    """Database schema migrations."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    app = get_app(ctx)
    db.upgrade(app.engine, revision)
    console.print(f"Schema at {db.current_revision(app.engine)}.")


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database and of this code."""
    app = get_app(ctx)
    console.print(f"database: {db.current_revision(app.engine)}  code: {db.head_revision()}")


# -- feeds ---------------------------------------------------------------------------------


@main.group(cls=Group)
def feeds() -> None:
    """Add, list and remove the feeds papers come from."""


@feeds.command("add")
@click.argument("sources", nargs=-1, required=True)
@click.pass_context
def feeds_add(ctx: click.Context, sources: Sequence[str]) -> None:
    """Add feeds by URL (RSS or Atom over http/https) or by local file path."""
    from newsletter import ingest

    with ready_app(ctx) as app:
        for source in sources:
            if "://" not in source and not Path(source).is_file():
                fail(f"{source}: no such file (give an http(s) URL or a feed file path)")
            try:
                with db.transaction(app.sessions) as session:
                    feed = ingest.add_feed(session, source)
                    console.print(f"Added feed {feed.id}: {feed.url}")
            except ingest.FeedExists as exc:
                console.print(f"{exc}; nothing to do.")


@feeds.command("list")
@click.pass_context
def feeds_list(ctx: click.Context) -> None:
    """List feeds with their last success, last error and entry count."""
    from newsletter import ingest

    with ready_app(ctx) as app, app.session() as session:
        counts = ingest.entry_counts(session)
        table = Table("id", "feed", "entries", "last success", "last error", box=None)
        for feed in session.scalars(select(Feed).order_by(Feed.id)):
            error = feed.last_error or ""
            if feed.last_error_at and error:
                error = f"{feed.last_error_at:%Y-%m-%d %H:%M} {error}"
            name = feed.url if not feed.title else f"{feed.title}\n{feed.url}"
            if not feed.enabled:
                name += "\n(disabled)"
            success = f"{feed.last_success_at:%Y-%m-%d %H:%M}" if feed.last_success_at else "never"
            table.add_row(str(feed.id), name, str(counts.get(feed.id, 0)), success, error)
        if not table.rows:
            console.print("No feeds yet: add one with `newsletter feeds add URL_OR_PATH`.")
            return
        console.print(table)


@feeds.command("remove")
@click.argument("feed")
@click.pass_context
def feeds_remove(ctx: click.Context, feed: str) -> None:
    """Remove a feed (by id or URL) and its stored entries."""
    from newsletter import ingest

    with ready_app(ctx) as app, db.transaction(app.sessions) as session:
        removed = ingest.remove_feed(session, feed)
        if removed is None:
            fail(f"no feed {feed!r}: see `newsletter feeds list`")
        console.print(f"Removed feed {removed.id}: {removed.url}")


@main.command()
@click.option("--due-only", is_flag=True, help="Skip feeds that are backing off after errors.")
@click.pass_context
def fetch(ctx: click.Context, due_only: bool) -> None:
    """Fetch every feed and store new papers. A failing feed is reported; the rest go on."""
    from newsletter import ingest

    with ready_app(ctx) as app:
        with app.session() as session:
            ids = ingest.due_feeds(session, utcnow(), force=not due_only)
        if not ids:
            console.print("No feeds to fetch: add one with `newsletter feeds add URL_OR_PATH`.")
            return
        failed = 0
        with _progress() as progress:
            task = progress.add_task("fetching feeds", total=len(ids))

            def show(report: ingest.FeedReport) -> None:
                nonlocal failed
                failed += not report.ok
                mark = "[green]ok[/]" if report.ok else "[red]failed[/]"
                progress.console.print(f"{mark} {report.url}: {report.message}")
                progress.advance(task)

            reports = ingest.fetch_all(app, feed_ids=ids, on_report=show)
        new = sum(r.new_entries for r in reports)
        console.print(f"Fetched {len(reports)} feed(s): {new} new paper(s), {failed} failed.")
        if failed == len(reports):
            sys.exit(1)


# -- subscribers ---------------------------------------------------------------------------


@main.group(cls=Group, name="subscribers")
def subscribers_group() -> None:
    """Add, edit, list, remove, import and export subscribers."""


def _profile_options(f: F) -> F:
    options = [
        click.option(
            "-k",
            "--keyword",
            "keywords",
            multiple=True,
            help="An interest: a word or a phrase (repeat, or separate with commas).",
        ),
        click.option(
            "-x", "--exclude", multiple=True, help="A word or phrase that vetoes a paper."
        ),
        click.option("--max-items", type=click.IntRange(1, 50), help="Papers per digest at most."),
        click.option("--timezone", help="IANA time zone, e.g. Europe/Berlin."),
        click.option("--send-hour", type=click.IntRange(0, 23), help="Local hour to send at."),
        click.option("--frequency", type=click.Choice(["daily", "weekly"])),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _spec_fields(**values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("keywords", "exclude"):
        items = [p.strip() for v in values.get(key) or () for p in v.split(",") if p.strip()]
        if items:
            out[key] = items
    for key in ("max_items", "timezone", "send_hour", "frequency"):
        if values.get(key) is not None:
            out[key] = values[key]
    return out


@subscribers_group.command("add")
@click.argument("email")
@_profile_options
@click.pass_context
def subscribers_add(ctx: click.Context, /, email: str, **options: Any) -> None:
    """Add an active subscriber (you vouch for the address)."""
    from newsletter import subscribers

    with ready_app(ctx) as app:
        try:
            spec = subscribers.ProfileSpec.from_mapping({"email": email, **_spec_fields(**options)})
        except subscribers.InvalidProfile as exc:
            fail(str(exc))
        with db.transaction(app.sessions) as session:
            sub, created = subscribers.upsert(session, spec, status=SubscriberStatus.ACTIVE)
            verb = "Added" if created else "Updated"
            console.print(f"{verb} {sub.email}: {', '.join(sub.keywords)}")


@subscribers_group.command("edit")
@click.argument("email")
@_profile_options
@click.option("--add", "add_keywords", multiple=True, help="Add a keyword, keeping the others.")
@click.option("--remove", "remove_keywords", multiple=True, help="Remove a keyword.")
@click.option(
    "--status", type=click.Choice([s.value for s in SubscriberStatus]), help="Change status."
)
@click.pass_context
def subscribers_edit(
    ctx: click.Context,
    /,
    email: str,
    add_keywords: Sequence[str],
    remove_keywords: Sequence[str],
    status: str | None,
    **options: Any,
) -> None:
    """Change a subscriber's profile; options not given stay as they are."""
    from newsletter import subscribers

    with ready_app(ctx) as app, db.transaction(app.sessions) as session:
        try:
            address = subscribers.validate_email(email)
        except subscribers.InvalidProfile as exc:
            fail(str(exc))
        sub = subscribers.find(session, address)
        if sub is None:
            fail(f"no subscriber {address}: see `newsletter subscribers list`")
        current = subscribers.ProfileSpec.from_subscriber(sub)
        fields = {
            "email": current.email,
            "keywords": current.keywords,
            "exclude": current.exclude,
            "max_items": current.max_items,
            "timezone": current.timezone,
            "send_hour": current.send_hour,
            "frequency": current.frequency,
            **_spec_fields(**options),
        }
        removed = {k.strip().lower() for k in remove_keywords}
        fields["keywords"] = [k for k in fields["keywords"] if k.lower() not in removed]
        fields["keywords"] += [k for k in add_keywords if k.strip()]
        try:
            spec = subscribers.ProfileSpec.from_mapping(fields)
        except subscribers.InvalidProfile as exc:
            fail(str(exc))
        subscribers.upsert(session, spec)
        if status is not None:
            sub.status = SubscriberStatus(status)
            sub.status_reason = "changed by the operator" if status != "active" else None
            if status == "active":
                sub.failure_count = 0
        console.print(f"Updated {sub.email} ({sub.status.value}): {', '.join(sub.keywords)}")


@subscribers_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in SubscriberStatus]))
@click.pass_context
def subscribers_list(ctx: click.Context, status: str | None) -> None:
    """List subscribers with their keywords and schedule."""
    with ready_app(ctx) as app, app.session() as session:
        query = select(Subscriber).order_by(Subscriber.email)
        if status:
            query = query.where(Subscriber.status == SubscriberStatus(status))
        table = Table("email", "status", "keywords", "exclude", "max", "sends", box=None)
        for sub in session.scalars(query):
            state = sub.status.value
            if sub.status_reason and sub.status is not SubscriberStatus.ACTIVE:
                state += f"\n{sub.status_reason}"
            schedule = f"{sub.frequency.value} {sub.send_hour:02d}:00 {sub.timezone}"
            table.add_row(
                sub.email,
                state,
                ", ".join(sub.keywords),
                ", ".join(sub.exclude),
                str(sub.max_items),
                schedule,
            )
        if not table.rows:
            console.print("No subscribers: `newsletter subscribers add` or `... import`.")
            return
        console.print(table)


@subscribers_group.command("remove")
@click.argument("email")
@click.pass_context
def subscribers_remove(ctx: click.Context, email: str) -> None:
    """Delete a subscriber and their delivery history."""
    from newsletter import subscribers

    with ready_app(ctx) as app, db.transaction(app.sessions) as session:
        sub = subscribers.remove(session, email)
        if sub is None:
            fail(f"no subscriber {email}: see `newsletter subscribers list`")
        console.print(f"Removed {sub.email}.")


def _default_profiles_dir() -> Path:
    here = Path("subscribers")
    return here if here.is_dir() else REPO_ROOT / "subscribers"


@subscribers_group.command("import")
@click.argument("path", required=False, type=click.Path(exists=True, path_type=Path))
@click.pass_context
def subscribers_import(ctx: click.Context, path: Path | None) -> None:
    """Import TOML profiles from a folder (default: subscribers/) or one file.

    Imported subscribers are active; importing again updates them, never duplicates."""
    from newsletter import subscribers

    with ready_app(ctx) as app:
        target = path or _default_profiles_dir()
        with db.transaction(app.sessions) as session:
            report = subscribers.import_profiles(session, subscribers.profile_paths(target))
        for message in report.errors:
            err.print(f"[yellow]skipped[/] {message}")
        console.print(
            f"Imported from {target}: {len(report.created)} new, {len(report.updated)} updated, "
            f"{len(report.errors)} skipped."
        )
        if report.errors and not (report.created or report.updated):
            sys.exit(1)


@subscribers_group.command("export")
@click.argument("folder", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def subscribers_export(ctx: click.Context, folder: Path | None) -> None:
    """Write one TOML profile per subscriber into FOLDER (default: subscribers/)."""
    from newsletter import subscribers

    with ready_app(ctx) as app, app.session() as session:
        target = folder or Path("subscribers")
        written = subscribers.export_profiles(session, target)
        console.print(f"Exported {len(written)} profile(s) to {target}/.")


# -- digests -------------------------------------------------------------------------------


@main.command()
@click.argument("email")
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/preview"),
    show_default=True,
    help="Folder for the .html, .txt and .eml files.",
)
@click.pass_context
def preview(ctx: click.Context, email: str, out: Path) -> None:
    """Write the digest EMAIL would get now, without sending or recording anything."""
    from newsletter import subscribers

    with ready_app(ctx) as app, app.session() as session:
        settings = app.settings
        sub = subscribers.find(session, email)
        if sub is None:
            fail(f"no subscriber {email}: see `newsletter subscribers list`")
        now = utcnow()
        period = digests.period_for(sub.frequency, sub.timezone, now)
        index, _ = digests.load_index(
            session, now, timedelta(days=settings.entry_window_days), settings.synonyms
        )
        planned = digests.plan_batch(session, index, [digests.Reader.of(sub)], now)
        if not planned:
            already = session.scalar(
                select(Delivery.status).where(
                    Delivery.subscriber_id == sub.id, Delivery.period == period
                )
            )
            reason = (
                f"their digest for {period} is already {already.value}"
                if already
                else f"none of the {len(index)} recent papers matches their keywords "
                "(or they had them all)"
            )
            console.print(f"{sub.email} would get no email now: {reason}.")
            return
        renderer = Renderer(settings)
        composer = Composer(renderer, Signer(app.secret_key))
        digest = digest_from_picks(
            session,
            composer,
            sub,
            planned[0].picks,
            period=period,
            now=now,
            message_id=digests.message_id(renderer.domain, sub.id, period),
        )
        text, html = renderer.bodies(digest)
        out.mkdir(parents=True, exist_ok=True)
        stem = subscribers.profile_filename(sub.email).removesuffix(".toml")
        paths = {
            "html": out / f"{stem}.html",
            "text": out / f"{stem}.txt",
            "eml": out / f"{stem}.eml",
        }
        paths["html"].write_text(html, encoding="utf-8")
        paths["text"].write_text(text, encoding="utf-8")
        paths["eml"].write_bytes(renderer.render_bytes(digest, now=now))
        console.print(f"Subject: {renderer.subject(digest)}")
        for kind, path in paths.items():
            console.print(f"  {kind:5} {path}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Show who would get what; send and record nothing.")
@click.pass_context
def send(ctx: click.Context, dry_run: bool) -> None:
    """Send this period's digest to every active subscriber who has not had it yet.

    Safe to repeat: a digest goes out once per subscriber and period, whatever happens."""
    from newsletter.leader import AlreadyRunning, hold_sqlite

    with ready_app(ctx) as app:
        try:
            # On SQLite one process sends at a time (no SKIP LOCKED): refuse to race `serve`.
            lock = None if dry_run else hold_sqlite(app.engine)
        except AlreadyRunning as exc:
            fail(str(exc))
        try:
            code = run_send(app, dry_run=dry_run)
        finally:
            if lock is not None:
                lock.close()
        sys.exit(code)


def run_send(app: App, *, dry_run: bool = False, stop: threading.Event | None = None) -> int:
    from newsletter.drain import PlanArgs, drain, plan_processes
    from newsletter.sending import active_count, pending_count

    settings = app.settings
    now = utcnow()
    window = timedelta(days=settings.entry_window_days)
    domain = Renderer(settings).domain
    if dry_run:
        rows: list[tuple[str, int, str]] = []
        report = digests.plan_period(
            app.sessions,
            now,
            window=window,
            domain=domain,
            synonyms=settings.synonyms,
            dry_run=True,
            on_planned=lambda p: rows.append((p.email, len(p.picks), p.picks[0].hits[0].keyword)),
        )
        table = Table("to", "papers", "top match", box=None)
        for email, count, keyword in rows:
            table.add_row(email, str(count), keyword)
        console.print(table)
        console.print(
            f"Dry run: {report.planned} digest(s) would be sent to {report.subscribers} active "
            f"subscriber(s) from {report.candidates} recent paper(s); nothing was recorded."
        )
        return 0

    with app.session() as session:
        # Before planning, to start the helper processes that plan and send with this one.
        pending = pending_count(session)
        estimate = pending + active_count(session)
    processes = plan_processes(settings, estimate)
    target = f"{settings.smtp_host}:{settings.smtp_port}"
    with _progress() as progress:
        # The total grows as digests are planned (everyone is matched while mail goes out).
        task = progress.add_task(f"planning and sending to {target}", total=pending)

        def on_event(kind: str, n: int) -> None:
            if kind == "planned":
                progress.update(task, total=(progress.tasks[task].total or 0) + n)
            elif kind != "retry":
                progress.advance(task, n)

        plan = PlanArgs(now, window, domain, settings.synonyms)
        drained = drain(app, processes=processes, plan=plan, on_event=on_event, stop=stop)
    planned = drained.plan
    if planned is not None:
        log.info("planned %d digest(s) for %d subscriber(s)", planned.planned, planned.subscribers)
    if (
        planned is not None
        and planned.planned == 0
        and drained.total.sent + drained.total.failed == 0
    ):
        console.print(
            f"Nothing to send: {planned.subscribers} active subscriber(s), none due a "
            "digest (already sent this period, or no new matching papers)."
        )
        return 0
    result = drained.total
    split = ""
    if processes > 1:
        split = f" ({' + '.join(map(str, drained.per_process))} by {processes} processes)"
    console.print(
        f"Sent {result.sent}{split}, failed {result.failed} (suppressed {result.suppressed}), "
        f"retries {result.retried}."
    )
    for line in drained.died:
        err.print(f"  [yellow]{line}[/]")
    for line in result.failures[:20]:
        err.print(f"  [yellow]{line}[/]")
    if result.aborted:
        err.print(f"[bold red]stopped:[/] {result.aborted}")
        return 2
    return 0


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
    )


# -- development sink and demo -------------------------------------------------------------


@main.command()
@click.option("--host", help="Address to listen on (default: sink_host setting).")
@click.option("--port", type=int, help="Port to listen on (default: sink_port setting, 1025).")
@click.option(
    "--dir",
    "maildir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Maildir to keep messages in (default: sink_dir setting, var/sink).",
)
@click.option("--list", "list_only", is_flag=True, help="List kept messages and exit.")
@click.option("--clear", is_flag=True, help="Delete kept messages and exit.")
@click.pass_context
def sink(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    maildir: Path | None,
    list_only: bool,
    clear: bool,
) -> None:
    """Run the development SMTP sink: it accepts every message and keeps it."""
    from newsletter import sink as sink_mod

    settings = get_app(ctx).settings
    folder = maildir or Path(settings.sink_dir)
    if clear:
        console.print(f"Deleted {sink_mod.clear(folder)} message(s) from {folder}.")
        return
    if list_only:
        messages = sink_mod.list_messages(folder)
        for msg in messages:
            console.print(sink_mod.format_line(msg), markup=False, soft_wrap=True)
        console.print(f"{len(messages)} message(s) in {folder}.")
        return
    try:
        sink_mod.run_forever(
            folder,
            host or settings.sink_host,
            settings.sink_port if port is None else port,
            echo=lambda line: console.print(line, markup=False, soft_wrap=True),
        )
    except OSError as exc:
        fail(f"cannot listen on {host or settings.sink_host}:{port or settings.sink_port}: {exc}")


def _free_port(host: str, preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind((host, preferred))
            return preferred
        except OSError:
            s.bind((host, 0))
            return int(s.getsockname()[1])


@main.command()
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/demo"),
    show_default=True,
    help="Where the demo keeps its database, caught mail and previews (made fresh each run).",
)
@click.option(
    "--serve/--no-serve",
    default=None,
    help="Afterwards, serve the web app and mail viewer until Ctrl-C "
    "(default: when run from a terminal).",
)
@click.pass_context
def demo(ctx: click.Context, workdir: Path, serve: bool | None) -> None:
    """Run the whole pipeline on the samples: sink, sample feed, sample subscribers, send.

    Uses its own SQLite file and mail folder under --dir, so it never touches your data.
    From a terminal it then serves the subscriber pages and the caught emails in a browser."""
    from newsletter import ingest, subscribers
    from newsletter.sink import Sink, format_line

    base = get_app(ctx).settings
    if serve is None:
        serve = sys.stdin.isatty() and sys.stdout.isatty()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    port = _free_port(base.sink_host, base.sink_port)
    web_port = _free_port(base.web_host, base.web_port)
    settings: Settings = base.replace(
        database_url=f"sqlite:///{(workdir / 'newsletter.db').resolve()}",
        smtp_host=base.sink_host,
        smtp_port=port,
        smtp_user="",
        smtp_password="",
        smtp_tls="none",
        sink_port=port,
        sink_dir=str(workdir / "sink"),
        web_port=web_port,
        base_url=f"http://{base.web_host}:{web_port}",
    )
    app = App(settings)
    ctx.call_on_close(app.close)
    maildir = workdir / "sink"
    with Sink(maildir, settings.sink_host, port) as running:
        console.print(f"[bold]1.[/] SMTP sink listening on {settings.sink_host}:{running.port}")
        app.init()
        console.print(f"[bold]2.[/] Database created at {workdir / 'newsletter.db'}")
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(SAMPLE_FEED))
        (report,) = ingest.fetch_all(app)
        console.print(f"[bold]3.[/] Sample feed loaded: {report.message}")
        with db.transaction(app.sessions) as session:
            imported = subscribers.import_profiles(
                session, subscribers.profile_paths(_default_profiles_dir())
            )
        console.print(
            f"[bold]4.[/] Imported {len(imported.created)} subscriber(s) from "
            f"{_default_profiles_dir()}/"
        )
        code = run_send(app)
        messages = running.messages()
        console.print(f"[bold]5.[/] The sink caught {len(messages)} email(s):")
        for msg in messages:
            console.print("   " + format_line(msg), markup=False, soft_wrap=True)
        with app.session() as session:
            sent = session.scalar(
                select(func.count()).where(Delivery.status == DeliveryStatus.SENT)
            )
        console.print(
            f"\nWhere to look:\n"
            f"  the emails     {maildir}/new/  (open any file in a mail client, or run\n"
            f"                 `newsletter sink --list --dir {maildir}`)\n"
            f"  the ledger     {sent} delivery row(s) marked sent in {workdir / 'newsletter.db'}\n"
            f"  run it again   `./dev demo` starts fresh; `newsletter send` with the demo's\n"
            f"                 database would send nothing new (the ledger remembers)."
        )
        if serve and code == 0:
            from newsletter.web import serve as serve_web

            url = settings.base_url
            console.print(
                f"\n[bold]6.[/] Serving the subscriber pages at {url}/ and the caught emails "
                f"at {url}/_sink (Ctrl-C to stop). Subscribe there: the confirmation email "
                "lands in the viewer, and its link works."
            )
            serve_web(app, settings.web_host, web_port, sink_dir=maildir)
        elif not serve:
            console.print(
                "  the web app    run `./dev demo` from a terminal to browse the emails and "
                "the subscriber pages"
            )
    sys.exit(code)


if __name__ == "__main__":
    main()
