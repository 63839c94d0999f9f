"""Shared bench helpers: machine facts, timing, and writing a section of bench/RESULTS.md in place."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
sys.path.insert(0, str(ROOT))  # `tests.fixtures` image makers are shared with the benchmarks


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        tess = subprocess.run(["tesseract", "--version"], capture_output=True, text=True).stdout.splitlines()[
            0
        ]
    except (OSError, IndexError):
        tess = "tesseract: not installed"
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {tess}"
    )


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Median wall seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def write_section(name: str, body: str, command: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md, stamped with the date, machine and command."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Loupe benchmark results\n\nEach section is rewritten by the command it names.\n"
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- section:{name} -->\n## {name}\n\n"
        f"Measured {stamp} on {machine()}.\n\nCommand: `{command}`\n\n{body.strip()}\n<!-- /section:{name} -->\n"
    )
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def revisions(base: str, extra: str = "") -> tuple[str, str]:
    """Short names of `base` and of this checkout (its HEAD, and whether `server/` has uncommitted changes)."""

    def short(rev: str) -> str:
        return subprocess.run(
            ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()

    dirty = subprocess.run(
        ["git", "status", "--porcelain", "server"], cwd=ROOT, capture_output=True, text=True
    )
    return short(base), short("HEAD") + (" + uncommitted changes" if dirty.stdout.strip() else "") + extra


@contextlib.contextmanager
def base_worktree(rev: str) -> Iterator[Path]:
    """`rev` checked out in a temporary git worktree: run its code with PYTHONPATH=<tree>/server."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), rev], cwd=ROOT, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
