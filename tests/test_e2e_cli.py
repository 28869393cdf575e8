"""The whole pipeline through the real command line, as an operator would run it:
init → add the fixture feed → import subscribers → send → the sink holds exactly one multipart
email per subscriber with matches → send again → nothing more."""

from __future__ import annotations

import shutil
import tomllib
from email.message import EmailMessage
from pathlib import Path

from conftest import REPO, RSS_FIXTURE, run_cli

from newsletter.sink import Sink

# What the sample profiles in subscribers/ must get from the fixture feed (checked by reading
# the papers): one title each that the profile is clearly about.
EXPECTED = {
    "ada@example.org": "Light Schrödinger Bridge",
    "grace@example.org": "Cutting Slack: Quantum Optimization with Slack-Free Methods for "
    "Combinatorial Benchmarks",
    "emmy@example.org": "Enabling Efficient Equivariant Operations in the Fourier Basis via "
    "Gaunt Tensor Products",
    "alan@example.org": "Merging Models with Fisher-Weighted Averaging",
}
NO_MATCH = "rosalind@example.org"


def _titles(msg: EmailMessage) -> str:
    text = msg.get_body(("plain",))
    assert text is not None
    return " ".join(str(text.get_content()).split())  # the text part wraps long titles


def test_cli_pipeline_end_to_end(tmp_path: Path, db_url: str, sink: Sink) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO / "subscribers", profiles)
    env = {
        "NEWSLETTER_DATABASE_URL": db_url,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(sink.port),
        "NEWSLETTER_FROM": "Paper Digest <digest@example.org>",
        "NEWSLETTER_BASE_URL": "https://digest.example.org",
        "NEWSLETTER_ENTRY_WINDOW_DAYS": "3650",
    }
    init = run_cli("init", env=env, cwd=tmp_path)
    assert "Created a secret key" in init.stdout
    run_cli("feeds", "add", str(RSS_FIXTURE), env=env, cwd=tmp_path)
    imported = run_cli("subscribers", "import", str(profiles), env=env, cwd=tmp_path)
    assert "5 new, 0 updated, 0 skipped" in imported.stdout
    fetched = run_cli("fetch", env=env, cwd=tmp_path)
    assert "44 new paper(s), 0 failed" in fetched.stdout
    listed = run_cli("feeds", "list", env=env, cwd=tmp_path)
    assert "44" in listed.stdout and "Daily Papers" in listed.stdout

    sent = run_cli("send", env=env, cwd=tmp_path)
    assert "Sent 4, failed 0" in sent.stdout, sent.stdout

    messages = sink.messages()
    by_rcpt = {m.rcpt_tos: m for m in messages}
    assert sorted(r for (r,) in by_rcpt) == sorted(EXPECTED), "one email per matching subscriber"
    assert len(messages) == len(EXPECTED)
    for address, title in EXPECTED.items():
        msg = by_rcpt[(address,)].message
        assert msg.get_content_type() == "multipart/alternative"
        parts = [p.get_content_type() for p in msg.iter_parts()]
        assert parts == ["text/plain", "text/html"], "text first, HTML last"
        assert msg["To"] == address
        assert msg["Message-ID"] and msg["Date"] and msg["List-Id"]
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "<https://digest.example.org/unsubscribe/" in msg["List-Unsubscribe"]
        assert "<mailto:unsubscribe@example.org?subject=" in msg["List-Unsubscribe"]
        assert title in _titles(msg), f"{address} should get {title!r}"
        html = msg.get_body(("html",))
        assert html is not None and "https://digest.example.org/manage/" in html.get_content()
    assert "quantum" not in _titles(by_rcpt[("ada@example.org",)].message).lower(), (
        "ada excludes 'quantum'"
    )

    again = run_cli("send", env=env, cwd=tmp_path)
    assert "Nothing to send" in again.stdout
    assert len(sink.messages()) == len(EXPECTED), "a second send sends nothing more"

    # Re-importing updates and never duplicates.
    reimported = run_cli("subscribers", "import", str(profiles), env=env, cwd=tmp_path)
    assert "0 new, 5 updated" in reimported.stdout


def test_cli_reports_bad_input_clearly(tmp_path: Path, sqlite_url: str) -> None:
    env = {"NEWSLETTER_DATABASE_URL": sqlite_url}
    not_ready = run_cli("feeds", "list", env=env, cwd=tmp_path, check=False)
    assert not_ready.returncode == 1
    assert "run `newsletter init` first" in not_ready.stderr

    run_cli("init", env=env, cwd=tmp_path)
    bad_email = run_cli(
        "subscribers", "add", "not-an-address", "-k", "x", env=env, cwd=tmp_path, check=False
    )
    assert bad_email.returncode == 1 and "is not a valid address" in bad_email.stderr
    bad_keyword = run_cli(
        "subscribers",
        "add",
        "a@example.org",
        "-k",
        "<script>",
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert bad_keyword.returncode == 1 and "keywords:" in bad_keyword.stderr
    missing = run_cli("feeds", "add", "no/such/feed.xml", env=env, cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "no such file" in missing.stderr
    bad_config = run_cli("config", env={"NEWSLETTER_SMTP_TLS": "maybe"}, cwd=tmp_path, check=False)
    assert bad_config.returncode == 1 and "smtp_tls must be one of" in bad_config.stderr


def test_help_lists_every_command(tmp_path: Path) -> None:
    out = run_cli("--help", env={}, cwd=tmp_path).stdout
    for command in ("init", "feeds", "fetch", "subscribers", "preview", "send", "sink", "demo"):
        assert f"  {command}" in out


def test_operator_commands(tmp_path: Path, sqlite_url: str, sink: Sink) -> None:
    env = {
        "NEWSLETTER_DATABASE_URL": sqlite_url,
        "NEWSLETTER_SMTP_PORT": str(sink.port),
        "NEWSLETTER_ENTRY_WINDOW_DAYS": "3650",
        "NEWSLETTER_SINK_DIR": str(sink.maildir),
    }
    run_cli("init", env=env, cwd=tmp_path)
    run_cli("feeds", "add", str(RSS_FIXTURE), env=env, cwd=tmp_path)
    run_cli("fetch", env=env, cwd=tmp_path)
    run_cli(
        "subscribers",
        "add",
        "Kim@Example.org",
        "-k",
        "diffusion models, inverse problems",
        "-x",
        "quantum",
        "--max-items",
        "3",
        "--timezone",
        "Europe/Paris",
        env=env,
        cwd=tmp_path,
    )
    run_cli(
        "subscribers",
        "edit",
        "kim@example.org",
        "--add",
        "Schrödinger bridge",
        "--send-hour",
        "9",
        env=env,
        cwd=tmp_path,
    )
    listed = run_cli("subscribers", "list", env=env, cwd=tmp_path).stdout
    assert "kim@example.org" in listed and "Schrödinger bridge" in listed
    assert "daily 09:00 Europe/Paris" in listed

    preview = run_cli("preview", "kim@example.org", "--out", "pv", env=env, cwd=tmp_path)
    assert "Subject: 3 new papers for you" in preview.stdout
    html = (tmp_path / "pv" / "kim@example.org.html").read_text(encoding="utf-8")
    assert "<mark" in html and "Unsubscribe" in html
    assert (tmp_path / "pv" / "kim@example.org.eml").stat().st_size > 1000
    assert sink.messages() == [], "preview sends nothing"

    dry = run_cli("send", "--dry-run", env=env, cwd=tmp_path).stdout
    assert "kim@example.org" in dry and "nothing was recorded" in dry
    assert sink.messages() == [], "a dry run sends nothing"
    real = run_cli("send", env=env, cwd=tmp_path).stdout
    assert "Sent 1, failed 0" in real
    caught = run_cli("sink", "--list", env=env, cwd=tmp_path).stdout
    assert "kim@example.org" in caught and "1 message(s)" in caught

    again = run_cli("preview", "kim@example.org", env=env, cwd=tmp_path).stdout
    assert "would get no email now" in again and "already sent" in again

    out = tmp_path / "exported"
    exported = run_cli("subscribers", "export", str(out), env=env, cwd=tmp_path).stdout
    assert "Exported 1 profile(s)" in exported
    profile = tomllib.loads((out / "kim@example.org.toml").read_text(encoding="utf-8"))
    assert profile["keywords"] == ["diffusion models", "inverse problems", "Schrödinger bridge"]
    assert (profile["exclude"], profile["max_items"], profile["send_hour"]) == (["quantum"], 3, 9)

    run_cli("subscribers", "remove", "kim@example.org", env=env, cwd=tmp_path)
    assert "No subscribers" in run_cli("subscribers", "list", env=env, cwd=tmp_path).stdout
    removed = run_cli("feeds", "remove", "1", env=env, cwd=tmp_path).stdout
    assert "Removed feed 1" in removed
    gone = run_cli("feeds", "remove", "1", env=env, cwd=tmp_path, check=False)
    assert gone.returncode == 1 and "no feed" in gone.stderr
