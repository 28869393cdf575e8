"""Quick exits (newsletter.exiting): the status, output and exit handlers of a normal exit,
without the teardown; the normal exit while a thread still has to finish. Each case runs in a
process of its own, since the whole point is how a process ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from newsletter.exiting import exit_quickly

out = Path(sys.argv[1])


class Heap:
    def __del__(self):  # runs when the interpreter frees its objects at exit
        (out / "teardown").write_text("ran")


heap = Heap()
atexit.register(lambda: (out / "atexit").write_text("ran"))
sys.stdout.write("buffered, no newline")  # still in Python's buffer when exiting
if sys.argv[2] == "worker":
    def work():
        time.sleep(0.3)
        (out / "worker").write_text("done")
    threading.Thread(target=work).start()
if sys.argv[2] == "daemon":
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
exit_quickly({"3": 3, "none": None, "text": "gave up: no server"}.get(sys.argv[3], 0))
"""


def run(tmp_path: Path, threads: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), threads, code],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [("3", 3, ""), ("none", 0, ""), ("text", 1, "gave up: no server\n")],
)
def test_exits_as_sys_exit_would_with_output_and_exit_handlers(
    tmp_path: Path, code: str, status: int, stderr: str
) -> None:
    done = run(tmp_path, "daemon", code)
    assert done.returncode == status
    assert done.stdout == "buffered, no newline"
    assert done.stderr == stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists(), "the heap was not freed object by object"


def test_waits_for_a_thread_that_is_still_working(tmp_path: Path) -> None:
    done = run(tmp_path, "worker", "3")
    assert done.returncode == 3
    assert (tmp_path / "worker").read_text() == "done", "the normal exit waited for it"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "teardown").read_text() == "ran", "the normal exit, teardown and all"
