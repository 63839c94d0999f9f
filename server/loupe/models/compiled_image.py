"""Ingest's lanes on a torch.compile'd build of the bf16 image copy, where that measures faster.

Ingest on the CPU runs one single-threaded forward pass per core side by side (its model workers' lanes,
ingest/service.py). On a CPU with AMX, much of such a pass on the traced bf16 copy (models/bf16_image.py) is not
the matrix products but bf16 elementwise work (QuickGELU's three operators, residual adds, layer norms) that
TorchScript runs one operator at a time: perf put a fifth of an ingest run's CPU in those loops. Inductor
(`torch.compile` with frozen weights and its C++ wrapper) packs the weights for oneDNN once and fuses that work
into its kernels: on an Intel AMX box two lanes ran ViT-B/32 batches of 8 at 162-172 against 124-134 pictures/s on
the trace (1.28-1.34x). In one pass on two threads it gave nothing there (86 against 85), so it serves only the
lanes' single-threaded passes of their batch size; every other pass stays on the trace.

What it costs: a C++ compiler (where none is found the build says so in the log and the trace serves), 18-25 s
of one core each time a process builds it on an idle machine (frozen weights are constants of the graph, so
little of it comes from inductor's caches), and the packed weights (RSS +280 MB for ViT-B/32 after the build). So
it is built on a thread of its own at the lowest priority, ingest running on the trace meanwhile (slowed, since
the build's Python holds the GIL), and with `auto` only once ingest finds COMPILE_BACKLOG pictures pending: an
import that repays it. Its vectors are checked against the trace's on the probe pictures before it serves.
`auto` then times it against the trace in lanes and keeps it from COMPILE_GAIN; the verdict is remembered per model
and machine (models/runtime_choice.py), so a machine where it loses never builds it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from typing import Any

import numpy as np

from loupe.models import torch_thread
from loupe.models.runtime_choice import ChoiceMemory, TimingWindow, described, timed
from loupe.models.vectors import normalize

log = logging.getLogger(__name__)

# The gain over the traced copy's lanes that makes the compile (CPU at every start, memory) worth it.
COMPILE_GAIN = 1.15
# Pictures pending when a run of ingest's lanes starts that make `auto` build (runtime.py, Runtime.arm_image_lanes):
# an import large enough to repay the build. Built in the middle of an import of 1 MP JPEGs on an Intel AMX box, it
# slowed the lanes for its 34-64 s (from 63 to 27 pictures/s at normal priority, to 46 at the lowest), about 17-21 s
# of the import lost, against 1.3-1.8 ms saved a picture afterwards (63 -> 69 pictures/s there; 67 -> 76 in the A/B):
# repaid over 10,000-17,000 pictures.
COMPILE_BACKLOG = 20_000
# Worst cosine of the compiled build's vectors to the trace's (both bf16; measured 0.99994 on ViT-B/32).
FLOOR = 0.9999


def cxx() -> str:
    """The C++ compiler inductor is to build with: $CXX, else g++ (inductor's own choice on Linux), found on PATH
    before anything is compiled, so that its absence gets a plain message."""
    name = os.environ.get("CXX") or "g++"
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no C++ compiler: {name} is not on PATH (install g++, or name one in CXX)")
    return found


class CompiledLanes:
    """A torch.compile'd (inductor, frozen weights, C++ wrapper) build of a Bf16ImageTower's module for
    single-threaded passes of `batch` pictures, under inference mode (as every pass runs). `__call__` returns None
    for any other pass, which the trace serves, so it is never called with what it would recompile for."""

    def __init__(self, module: Any, batch: int, side: int) -> None:
        import torch
        import torch._inductor.config as inductor_config

        self.batch = batch
        self._fn = torch.compile(module, dynamic=False)
        # The options apply when the first call compiles, set in this thread (a setting made on another thread did
        # not reach a compile here; torch.compile's own `options` left the weights unfrozen: no gain). One thread:
        # the lanes' passes, and no OpenMP team for this thread.
        options = {"freezing": True, "cpp_wrapper": True, "cpp.cxx": (cxx(),)}
        torch_thread.use_threads(1)
        with inductor_config.patch(options), torch.inference_mode():
            self._fn(torch.zeros(batch, 3, side, side))

    def __call__(self, pixel_values: Any) -> Any:
        import torch

        if pixel_values.shape[0] != self.batch or torch.get_num_threads() != 1:
            return None
        # Always an inference tensor of the layout and dtype it was compiled for, so that no guard fails: a recompile
        # would take seconds, and outside `__init__`'s options it would not freeze the weights (recompiled for
        # ClipModel's channels-last pixel values, or for a tensor made outside inference mode, the lanes ran 111-121
        # against the trace's 124-138 pictures/s). The copy costs 0.5 ms of a 100 ms pass.
        with torch.inference_mode():
            return self._fn(pixel_values.to(torch.float32, memory_format=torch.contiguous_format, copy=True))


def build(
    clip: Any,
    mode: str,
    batch: int,
    memory: ChoiceMemory | None,
    quiet: contextlib.AbstractContextManager[Any] | None = None,
) -> str:
    """Give `clip`'s bf16 image copy compiled lanes for passes of `batch` pictures as `mode` says (auto: where
    timed COMPILE_GAIN faster, or remembered so; on: whenever it builds and keeps FLOOR). Returns what serves the
    lanes, for health: "compiled" or "trace". `quiet` is held while `auto` times: ingest's model lock, so that the
    timing does not share the cores with the very lanes that started the build (TimingWindow sees other processes
    only)."""
    import torch

    from loupe.models.image_runtime import probe_pixels, side_by_side_rates

    tower = clip.image_tower_bf16
    if tower is None or mode == "off" or batch < 1:
        return "trace"
    key = entry = None
    if mode == "auto" and memory is not None:
        key = memory.key(
            "image-lanes", clip.info.fingerprint, lanes=clip.threads, batch=batch, gain=COMPILE_GAIN
        )
        entry = memory.get(key)
        if entry is not None and entry.get("choice") == "trace":
            clip.runtime_choices["image_lanes"] = described(entry)
            log.info("image lanes: the trace (%s; delete %s to time again)", described(entry), memory.path)
            return "trace"
    t = time.perf_counter()
    try:
        compiled = CompiledLanes(tower.tower, batch, clip._sizes[1])
        pixels = clip.pixel_values(probe_pixels(clip._sizes[1], batch), "cpu")
        with torch.inference_mode():
            ref = normalize(tower.traced_or_eager(pixels).numpy())
            got = normalize(compiled(pixels).numpy())
    except Exception as exc:  # no C++ compiler, an inductor that cannot build this model: the trace serves
        log.warning(
            "the image lanes could not be compiled (%s: %s): the trace serves", type(exc).__name__, exc
        )
        return "trace"
    worst = float(np.min(np.sum(ref * got, axis=1)))
    if worst < FLOOR:
        log.warning("the compiled image lanes differ from the trace (worst cosine %.6f): not used", worst)
        return "trace"
    log.info(
        "image lanes compiled in %.1f s (worst cosine %.7f to the trace)", time.perf_counter() - t, worst
    )
    chosen = "compiled"
    if mode == "auto" and entry is not None:
        clip.runtime_choices["image_lanes"] = described(entry)
    elif mode == "auto":

        def one_pass(name: str) -> None:
            torch_thread.use_threads(1)
            with torch.inference_mode():
                (compiled if name == "compiled" else tower.traced_or_eager)(pixels)

        with quiet or contextlib.nullcontext(), TimingWindow(clip.threads) as window:
            rates = side_by_side_rates(["trace", "compiled"], one_pass, clip.threads, batch)
        chosen = "compiled" if rates["compiled"] >= COMPILE_GAIN * rates["trace"] else "trace"
        log.info(
            "image lanes: trace %.1f, compiled %.1f pictures/s; serving the %s",
            rates["trace"],
            rates["compiled"],
            chosen,
        )
        if memory is not None and key is not None:
            memory.put(key, window=window, choice=chosen, rates={k: round(v, 2) for k, v in rates.items()})
        clip.runtime_choices["image_lanes"] = timed(window)
    if chosen == "compiled":
        tower.lanes = compiled
    return chosen


def build_in_background(
    clip: Any,
    mode: str,
    batch: int,
    memory: ChoiceMemory | None,
    quiet: contextlib.AbstractContextManager[Any] | None = None,
) -> threading.Thread:
    """`build` on a daemon thread of its own (minutes of CPU on a slow box; the server serves meanwhile and ingest
    runs on the trace until it is done); `clip.image_lanes` says what serves the lanes once it has finished."""

    def run() -> None:
        clip.image_lanes = "compiling"
        # At the lowest priority (on Linux a thread's own; the compiler processes it starts and the threads of
        # the timing inherit it), so that the build takes only what the import leaves idle: at normal priority
        # an import's lanes fell from 63 to 27 pictures/s for the 34-37 s of the build.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            clip.image_lanes = build(clip, mode, batch, memory, quiet)
        except Exception:  # never let a background build take anything down
            log.exception("building the compiled image lanes failed: the trace serves")
            clip.image_lanes = "trace"

    thread = threading.Thread(target=run, name="loupe-compile", daemon=True)
    thread.start()
    return thread
