"""Shared bench helpers: machine facts, timing, and writing a section of bench/RESULTS.md in place."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command_line() -> str:
    """This process's command as a reader would type it again (arguments with spaces quoted), led by the Loupe
    settings its environment sets (LOUPE_..., not the test suite's LOUPE_TEST_...): a bench's in-process runtime
    reads them, so a section measured under one says so."""
    script = Path(getattr(sys.modules["__main__"], "__file__", None) or sys.argv[0]).resolve()
    settings = [
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith("LOUPE_") and not k.startswith("LOUPE_TEST_")
    ]
    return " ".join([*settings, "python " + shlex.join([os.path.relpath(script, ROOT), *sys.argv[1:]])])


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


def tiny_model() -> Path:
    """The tiny CLIP where the test suite caches it ($LOUPE_TEST_CACHE, else ~/.cache/loupe), trained there once per
    recipe (a few minutes) if no run has yet."""
    from loupe.models import tiny_clip

    recipe = tiny_clip.Recipe()
    root = Path(os.environ.get("LOUPE_TEST_CACHE", Path.home() / ".cache" / "loupe"))
    return tiny_clip.ensure_model(root / f"tiny-clip-{recipe.fingerprint()}", recipe)


@contextlib.contextmanager
def scratch_runtime(model: str | Path, **settings: Any) -> Iterator[Any]:
    """A Loupe Runtime in process on a temporary data directory and `model`, OCR off unless `settings` say;
    closed and removed afterwards."""
    from loupe.config import Settings
    from loupe.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        values: dict[str, Any] = {
            "data_dir": Path(tmp) / "data",
            "clip_model": str(model),
            "ocr": {"enabled": False},
        }
        rt = Runtime.open(Settings(**{**values, **settings}))
        try:
            yield rt
        finally:
            rt.close()


def loupe_env(data_dir: Path, model: str | Path, **extra: str) -> dict[str, str]:
    """The environment of a `loupe` subprocess on `data_dir` and `model`: this one's without its LOUPE_ settings,
    OCR off, offline, and `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(
        LOUPE_DATA_DIR=str(data_dir),
        LOUPE_CLIP_MODEL=str(model),
        LOUPE_OCR__ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def serve(env: dict[str, str], log_path: Path, timeout_s: float = 600) -> Iterator[tuple[str, int, float]]:
    """`loupe serve` on a free loopback port, its output appended to `log_path`: (url, pid, seconds from the spawn
    to its first healthy answer). A server that exits or never answers stops the bench, naming its log."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "a") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "loupe.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # One client for all the polls: httpx.get builds a client, and its TLS context, each time (19 ms of CPU
        # per poll measured, about a quarter of a core at this rate, taken from the server's start-up timing).
        try:
            with httpx.Client(timeout=2) as poll:
                while True:
                    if proc.poll() is not None:
                        raise SystemExit(f"loupe serve exited {proc.returncode}: see {log_path}")
                    if time.perf_counter() - t > timeout_s:
                        raise SystemExit(f"loupe serve did not answer in {timeout_s:.0f} s: see {log_path}")
                    try:
                        if poll.get(url + "/api/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.05)
            yield url, proc.pid, time.perf_counter() - t
        finally:
            proc.terminate()
            proc.wait(60)
