"""What the `auto` runtimes chose at start, remembered per model and machine, so that later starts skip the timing.

`auto` times the image towers (models/image_runtime.py), the text runtime (models/onnx_text.py) and the bf16 text
copy's micro-batches (models/bf16_text.py) on probe inputs at start: seconds of full-size passes on every start of `loupe serve`,
`loupe import` or `loupe eval`, and a verdict that a noisy start can flip (an image runtime chosen on Monday and
another on Tuesday would give one library vectors from two runtimes). So the verdict is written to
`<data dir>/models/runtime-choices.json` and reused while what it depends on holds: the model (its fingerprint),
the machine (CPU model and flags, core count, torch threads), the torch and onnxruntime versions and the rules
that decide (RULES). A reused choice is still built and checked against torch's vectors on the probe inputs
before it serves, so a broken export or build is never trusted from memory; only the timing is skipped. An entry
older than MAX_AGE_DAYS is timed again; deleting the file re-times every choice at the next start.

A verdict is only as good as the machine was quiet while it was timed: another process busy on the cores (a test
run, an index build, a neighbour's VM stealing time) can flip it, and remembered it would stand for 30 days (seen
here: the bf16 text copy timed under a test run lost to onnx-w8 and was never used, where on the quiet machine it
runs batches of 8 1.84x faster). So each timing runs inside a TimingWindow, which reads the CPU time every process
and the hypervisor took over it (/proc/stat) beside this process's own: where the others held the cores the timing
needed, the verdict serves this run and is not remembered, and the next start times again.

Several API nodes may share a data directory: each machine has its own entries, and a write replaces the file
atomically (two nodes writing at once can lose one's entry, which that node then times again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Collection, Mapping
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "runtime-choices.json"
MAX_AGE_DAYS = 30
# Bumped when what `auto` measures or how it decides changes, so that no choice made by other rules is reused.
RULES = 1
# Cores that other processes (and steal) may take, beyond those the timing leaves free, before its verdict is not
# remembered: an idle 2-core box's services take about 0.01-0.05.
SLACK_CORES = 0.25


@cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none: not Linux)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (x86: "avx2", "avx512_vnni", ...); empty if unknown."""
    info = cpu_info()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


@cache
def machine() -> dict[str, str]:
    """What makes one machine's timings another's: the CPU (model name and feature flags), its cores, the
    versions of the runtimes timed."""
    info = cpu_info()
    out = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16],
        "cores": str(os.cpu_count()),
        "arch": platform.machine(),
    }
    for module in ("torch", "onnxruntime"):
        try:
            out[module] = str(__import__(module).__version__)
        except ImportError:
            out[module] = "none"
    return out


def cpu_ticks(cpus: Collection[int] = ()) -> int | None:
    """Busy clock ticks since boot of the CPUs `cpus` (/proc/stat's cpuN lines), or of every CPU (its first line),
    steal included (time the hypervisor gave the vCPUs to others). None where /proc/stat is not readable or lacks
    one of them."""
    wanted = {f"cpu{c}" for c in cpus} or {"cpu"}
    busy = found = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name in wanted:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in values[:8])
                    busy, found = busy + user + nice + system + irq + softirq + steal, found + 1
    except (OSError, ValueError):
        return None
    return busy if found == len(wanted) else None


def _affinity() -> list[int]:
    """The CPUs this process may run on (a container's cpuset, taskset), where the OS says."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


class TimingWindow:
    """Whether a timing had the cores it needed: `others` is the CPU time, in cores, that other processes and
    the hypervisor took over the window on the CPUs this process may run on (their busy time less this process's
    own; in a container pinned to some of a host's CPUs, those only). `threads`: the cores the timing runs on.
    `contended` when the others took more than the cores it leaves free (plus SLACK_CORES); unknown (no
    /proc/stat) counts as quiet."""

    def __init__(self, threads: int | None = None) -> None:
        self.cpus = _affinity()
        self.cores = len(self.cpus) or os.cpu_count() or 1
        self.threads = min(self.cores, threads or self.cores)
        self.others = 0.0

    def __enter__(self) -> TimingWindow:
        self._t, self._own, self._ticks = time.monotonic(), _own_cpu_s(), cpu_ticks(self.cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        wall, ticks = time.monotonic() - self._t, cpu_ticks(self.cpus)
        if self._ticks is None or ticks is None or wall <= 0:
            return
        tick = 1 / os.sysconf("SC_CLK_TCK")
        # Both counters move in whole clock ticks: at each end of the window every CPU's count, and this
        # process's, may be a part of a tick ahead. That much is not others' work (a window of a millisecond once
        # read 29 cores busy elsewhere on a quiet 2-core box).
        grain = (len(self.cpus) or self.cores) * tick + tick
        busy_s = (ticks - self._ticks) * tick
        self.others = max(0.0, (busy_s - (_own_cpu_s() - self._own) - grain) / wall)

    @property
    def contended(self) -> bool:
        return self.others > self.cores - self.threads + SLACK_CORES


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ChoiceMemory:
    """The remembered choices in `models_dir` (the data directory's `models/`)."""

    def __init__(self, models_dir: Path) -> None:
        self.path = models_dir / FILE

    @staticmethod
    def key(kind: str, fingerprint: str, **context: object) -> str:
        parts = {"kind": kind, "model": fingerprint, "rules": RULES, **machine(), **context}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): the runtimes are timed again", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)):
            return None
        if time.time() - entry["at"] > MAX_AGE_DAYS * 86400:
            return None
        return entry

    def put(self, key: str, window: TimingWindow | None = None, **entry: Any) -> None:
        """Remember a verdict timed inside `window`; not where other processes held the cores it needed (the
        next start times again)."""
        if window is not None and window.contended:
            log.warning(
                "the runtime timing shared the CPU with other processes (%.2f of %d cores busy elsewhere): its "
                "verdict serves this run and is not remembered; the next start times again",
                window.others,
                window.cores,
            )
            return
        data = self._read()
        data[key] = {**entry, "at": round(time.time(), 1), "machine": machine()["cpu"]}
        if window is not None:
            data[key]["busy_elsewhere"] = round(window.others, 3)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only data directory: the next start times again
            tmp.unlink(missing_ok=True)
            log.warning("could not remember the runtime choice in %s (%s)", self.path, exc)


def described(entry: dict[str, Any]) -> str:
    """'remembered from <UTC time>' for logs and health."""
    return "remembered from " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(entry["at"]))


def timed(window: TimingWindow | None) -> str:
    """How a choice timed at this start (inside `window`) is described in health."""
    busy = window is not None and window.contended
    return "timed at start on a busy machine: not remembered" if busy else "timed at start"


def fastest_interleaved(runs: Mapping[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Seconds of the fastest of `rounds` runs of each of `runs`, taken in turn round after round (after one
    warm-up each). Interleaved, a slow spell of the machine (a neighbour's burst, a page-cache flush) slows every
    contender of a round alike; timed one after the other, it fell on one side: on an AVX2-only AMD Zen 3 whose
    onnx-w8 runs one query 1.04-1.27x faster than onnx in interleaved probes, a start that timed the two one
    after the other read 1.56x."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best
