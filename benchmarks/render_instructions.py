"""Render: machine instructions per message, counted by valgrind: the same on any day.

`bench_render.py` times rendering, and on a shared machine the same code reads 10% apart
from one run to the next, more from one day to the next: too coarse to tell whether a change
of a few percent helped. This counts instead: the script runs the benchmark's digests under
valgrind's cachegrind (instruction counting only, about 50 times slower than native), once
rendering them and once only making them, and prints the difference per message.

Under valgrind a run is repeatable to 0.01% (PYTHONHASHSEED fixed), but only for the same
memory layout: papers are hashed by identity, so where objects land decides dict collisions,
and a few KB more in the environment moved the figure by 0.4%, a different checkout by ~2%.
So each figure is taken in three layouts (environments padded by 0, 1 and 2 KB) and the
median is the one to compare; a change smaller than the spread is not measured by this.
Instructions are not time, and the count leans one way: C loops over bytes (copying,
`str.replace`, encoding) are many instructions that run fast, the interpreter's dispatch and
look-ups are fewer that run slowly. Encoding the frame's HTML ahead instead of per email cut
5% of the count (1,239k to 1,175k) and nothing measurable from the time (three alternating
pairs of `bench_render.py` runs: 4,643-4,853/s against 4,713-4,892/s), and was taken out. So
a change is confirmed by `bench_render.py` too, in alternating runs, and this count says
which of two builds does less work, not by how much it is faster.

    .venv/bin/python benchmarks/render_instructions.py [--messages N]

Needs valgrind (Debian package `valgrind`). Takes about three minutes for 5,000 messages.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _inner(messages: int, render: bool) -> None:
    """What valgrind runs: the benchmark's digests made, and rendered if asked."""
    from benchmarks.bench_render import prepared
    from newsletter.drain import collector_for_sending

    now = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)  # fixed: the Date header is cached by second
    renderer, digests = prepared(messages, now)
    if render:
        with collector_for_sending():
            for digest in digests:
                renderer.render_bytes(digest, now=now)
    print(f"digests {len(digests)}")


def _count(messages: int, render: bool, padding: int) -> tuple[int, int]:
    """(instructions, digests) of one run of `_inner` under cachegrind."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--inner",
        "render" if render else "make",
        "--messages",
        str(messages),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "LAYOUT_PADDING": "x" * padding}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    made = re.search(r"digests (\d+)", done.stdout)
    if done.returncode or refs is None or made is None:
        raise SystemExit(f"valgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(refs[1].replace(",", "")), int(made[1])


def per_message(messages: int, padding: int) -> tuple[int, int]:
    """(instructions per message, digests) in one memory layout."""
    with ThreadPoolExecutor(2) as pool:  # the two runs are independent: one per core
        rendering = pool.submit(_count, messages, True, padding)
        making = pool.submit(_count, messages, False, padding)
        (with_render, digests), (without, _) = rendering.result(), making.result()
    return (with_render - without) // digests, digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--inner", choices=["render", "make"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        _inner(args.messages, args.inner == "render")
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    # Byte-compiled first: otherwise whichever run imports an edited module first compiles
    # it, and the difference between the two runs counts that compilation.
    root = Path(__file__).resolve().parent.parent
    for folder in ("newsletter", "benchmarks"):
        compileall.compile_dir(root / folder, quiet=1)
    figures = []
    for padding in (0, 1024, 2048):
        figure, digests = per_message(args.messages, padding)
        figures.append(figure)
    print(f"messages                   {digests}")
    print(f"instructions_per_message   {sorted(figures)[1]:,} (median of three layouts)")
    print(f"layouts                    {', '.join(f'{f:,}' for f in figures)}")


if __name__ == "__main__":
    main()
