"""`newsletter web`: serve the subscriber pages."""

from __future__ import annotations

from pathlib import Path

import click

from newsletter.app import App, SecretKeyMissing
from newsletter.db import DatabaseNotReady


@click.command()
@click.option("--host", help="Address to listen on (default: the web_host setting, 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default: the web_port setting, 8000).")
@click.option(
    "--sink-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also show the mail the development sink caught in this Maildir, at /_sink. "
    "For development only: never on a public server.",
)
@click.pass_context
def web(ctx: click.Context, host: str | None, port: int | None, sink_dir: Path | None) -> None:
    """Serve the subscriber web app: subscribe, confirm, manage interests, unsubscribe.

    Put it behind an HTTPS reverse proxy and set base_url to its public https:// address:
    the links in every email point there."""
    from newsletter.cli import fail
    from newsletter.web.app import serve

    app = ctx.obj
    if not isinstance(app, App):
        raise click.UsageError("run this through the `newsletter` command")
    try:
        app.check_ready()
        _ = app.secret_key
    except (DatabaseNotReady, SecretKeyMissing) as exc:
        fail(str(exc))
    settings = app.settings
    host = host or settings.web_host
    port = settings.web_port if port is None else port
    where = f"http://{host}:{port}"
    click.echo(f"Subscriber pages on {where}/ (links in emails use {settings.base_url})")
    if sink_dir is not None:
        click.echo(f"Development mail viewer on {where}/_sink (Maildir {sink_dir})")
    serve(app, host, port, sink_dir=sink_dir)
