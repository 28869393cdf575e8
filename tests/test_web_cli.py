"""`newsletter web` as an operator runs it: a real process, a real port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import REPO, make_settings, run_cli
from test_web_support import free_port

from newsletter.app import App
from newsletter.sink import Sink


def test_web_refuses_an_uninitialized_database(tmp_path: Path) -> None:
    env = {"NEWSLETTER_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    proc = run_cli("web", "--port", str(free_port()), env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "newsletter init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_web_serves_pages_and_the_mail_viewer(tmp_path: Path, sink: Sink) -> None:
    url = f"sqlite:///{tmp_path / 'web.db'}"
    App(make_settings(url, sink.port)).init()
    port = free_port()
    env = {
        **os.environ,
        "NEWSLETTER_DATABASE_URL": url,
        "NEWSLETTER_SECRET_KEY": "test-secret-key-not-for-production",
        "NEWSLETTER_WEB_PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "web", "--sink-dir", str(sink.maildir)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                home = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the web server did not start"
                time.sleep(0.1)
        assert home.status_code == 200 and "Subscribe" in home.text
        assert "server" not in home.headers  # no software banner
        assert home.headers["referrer-policy"] == "no-referrer"
        assert httpx.get(f"http://127.0.0.1:{port}/_sink", timeout=5).status_code == 200
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
    assert f"http://127.0.0.1:{port}/" in output
    assert "/_sink" in output
