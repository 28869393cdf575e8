"""The container, without Docker: the Dockerfile passes hadolint, and the image's own start
command and health check, run here as they would run in the image, start the service,
report healthy, and stop with exit code 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_service_support import SECRET, Proc, free_port, http_get, service_env, wait_for

from newsletter.sink import Sink

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def _instruction(name: str) -> str:
    """The text of an instruction of the image's final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    text = text[text.rindex("\nFROM ") :]
    found = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert len(found) == 1, f"one {name} in the Dockerfile"
    return found[0][len(name) + 1 :]


def _image_env() -> dict[str, str]:
    pairs = re.findall(r"(\w+)=(\S+)", _instruction("ENV"))
    return dict(pairs)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_start_command_serves_healthz_and_stops_cleanly(tmp_path: Path, sink: Sink) -> None:
    start = json.loads(_instruction("CMD"))
    assert start[-1].endswith("exec newsletter serve"), "the image runs the whole service"
    check = json.loads(_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    image = _image_env()
    assert image["NEWSLETTER_TEMPLATES_DIR"] == "/app/templates"
    port = free_port()
    env = {
        **os.environ,
        **image,
        # the image's paths, mapped to this machine
        "NEWSLETTER_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'newsletter.db'}",
        "NEWSLETTER_TEMPLATES_DIR": str(REPO / "templates"),
        "NEWSLETTER_WEB_PORT": str(port),
        # what an operator passes with -e
        "NEWSLETTER_SMTP_PORT": str(sink.port),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(start, env=env, cwd=tmp_path, stdout=out, stderr=out)
    try:

        def healthy() -> bool:
            return subprocess.run(check, env=env, capture_output=True, timeout=15).returncode == 0

        wait_for("the image's health check to pass", healthy, timeout=60, every=0.5)
        status, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        assert json.loads(body) == {
            "status": "ok",
            "checks": {
                "database": {"ok": True, "ms": pytest.approx(0, abs=5000)},
                "smtp": {"ok": True, "ms": pytest.approx(0, abs=5000)},
            },
        }
        began = time.monotonic()
        proc.terminate()  # `exec` made the service itself the process the signal reaches
        code = proc.wait(timeout=30)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert took < 10
    assert "stopped cleanly" in output

    sink.stop()  # SMTP down: the health check must say so
    again = subprocess.Popen(
        start, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(
            "/healthz to answer",
            lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] != 0,
            timeout=60,
        )
        status, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503
        report = json.loads(body)
        assert report["status"] == "fail"
        assert report["checks"]["database"]["ok"] is True
        assert report["checks"]["smtp"] == {
            "ok": False,
            "error": "ServerUnreachable",
            "ms": report["checks"]["smtp"]["ms"],
        }
        assert subprocess.run(check, env=env, capture_output=True, timeout=15).returncode != 0
        again.terminate()
        assert again.wait(timeout=30) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()


def test_one_service_process_per_sqlite_database(tmp_path: Path, sink: Sink) -> None:
    """Two processes claiming from one SQLite file could send the same digest twice, so the
    second is refused and told to use PostgreSQL."""
    url = f"sqlite:///{tmp_path / 'newsletter.db'}"
    env = service_env(url, sink.port, web_port=free_port())
    run_cli("init", env=env, cwd=tmp_path)
    first = Proc(["serve"], env, tmp_path, "first")
    try:
        wait_for("the first to start", lambda: "worker" in first.output(), timeout=30)
        second = run_cli("worker", env=env, cwd=tmp_path, check=False)
        assert second.returncode == 1
        assert "already running the service on this SQLite database" in second.stderr
        assert "PostgreSQL" in second.stderr
        status = run_cli("status", env=env, cwd=tmp_path).stdout
        assert f":{first.pid} runs everything" in status
        assert first.stop()[0] == 0
    finally:
        first.kill()
    assert "no service process is running" in run_cli("status", env=env, cwd=tmp_path).stdout


def test_serve_exits_1_when_its_port_is_taken(tmp_path: Path, sink: Sink) -> None:
    url = f"sqlite:///{tmp_path / 'newsletter.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = service_env(url, sink.port, web_port=taken.getsockname()[1])
        run_cli("init", env=env, cwd=tmp_path)
        result = run_cli("serve", env=env, cwd=tmp_path, check=False, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "the web server could not start" in result.stderr
