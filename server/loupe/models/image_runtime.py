"""Which runtime gives image vectors (ingest and image queries) on the CPU, chosen at start by measured speed:
torch fp32 (the reference, a trace: models/tracing.py), ONNX Runtime fp32 (models/onnx_image.py: the same
vectors, faster where torch's kernels are slow, as on AVX2-only CPUs) or a traced bf16 copy (models/bf16_image.py:
about 4x faster on CPUs with bf16 matrix units, within COSINE_FLOOR of fp32).

`auto` times each candidate on probe batches of the shape an ingest model worker embeds (PROBE_BATCH pictures)
and compares what each gives the whole machine: torch and the bf16 copy run one single-threaded pass per torch
thread side by side (ingest's lanes), ONNX Runtime one pass at a time on its own pool of all threads. Where torch
has no bf16 kernels (bf16_text.cpu_has_bf16: AVX2-only CPUs) the bf16 copy is not tried. ONNX Runtime serves
where it gives ONNX_GAIN times torch's rate; the bf16 copy where it gives BF16_GAIN times the faster fp32
runtime's (it costs rounding). A candidate serves only while its
vectors keep its cosine floor to torch's on the probe pictures; the others are freed. On a GPU torch serves.
The verdict is remembered per model and machine (models/runtime_choice.py): later starts build and check only the
runtime chosen, without timing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from loupe.models.bf16_text import COSINE_FLOOR, cpu_has_bf16
from loupe.models.runtime_choice import ChoiceMemory, TimingWindow, described, timed

log = logging.getLogger(__name__)

# Pictures in the batch timed at start: an ingest model worker's share of a batch of 16 on 2 cores.
PROBE_BATCH = 8
# The gain over the runtime it replaces that makes a candidate worth its memory (and, for bf16, its rounding).
ONNX_GAIN = 1.1
BF16_GAIN = 1.25
FLOORS = {"onnx": 0.9999, "bf16": COSINE_FLOOR}


def probe_pixels(side: int, n: int = PROBE_BATCH) -> np.ndarray:
    """n picture-like (n, side, side, 3) uint8 inputs: smooth colour fields with edges and a little noise (white
    noise would not look like a photograph to the tower), the same every start."""
    rng = np.random.default_rng(0)
    cells = max(2, side // 16)
    out = np.empty((n, side, side, 3), np.uint8)
    for k in range(n):
        coarse = rng.random((cells, cells, 3)) * 255
        field = np.kron(coarse, np.ones((side // cells + 1, side // cells + 1, 1)))[:side, :side]
        yy, xx = np.mgrid[:side, :side]
        disc = (yy - rng.integers(side)) ** 2 + (xx - rng.integers(side)) ** 2 < (side // 4) ** 2
        field[disc] = rng.random(3) * 255
        out[k] = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    return out


def _install(clip: Any, name: str, tower: Any) -> None:
    clip.image_tower_onnx = tower if name == "onnx" else None
    clip.image_tower_bf16 = tower if name == "bf16" else None


def _build(clip: Any, name: str, cache_dir: Path, threads: int) -> Any:
    if name == "bf16":
        from loupe.models.bf16_image import Bf16ImageTower

        return Bf16ImageTower(clip.model, clip._sizes[1])
    from loupe.models import onnx_image

    path = cache_dir / f"{onnx_image.PREFIX}-{clip.info.fingerprint}.onnx"
    if not path.exists():
        log.info("exporting the image tower to ONNX, once per model: %s", path)
    try:
        return onnx_image.OnnxImageTower(onnx_image.export(clip.model, clip._sizes[1], path), threads)
    except Exception:
        path.unlink(missing_ok=True)  # rebuilt at the next start
        raise


def _candidates(
    clip: Any, names: list[str], cache_dir: Path, threads: int, pixels: np.ndarray
) -> dict[str, Any]:
    """The candidates that build and keep their cosine floor to torch's vectors on `pixels`."""
    ref = clip.embed_uint8(pixels)
    out = {}
    for name in names:
        try:
            tower = _build(clip, name, cache_dir, threads)
            _install(clip, name, tower)
            got = clip.embed_uint8(pixels)
        except Exception as exc:  # unsupported by this torch or onnxruntime build, or by the model: not used
            log.warning(
                "the %s image tower could not be built (%s: %s): not used", name, type(exc).__name__, exc
            )
            continue
        finally:
            _install(clip, "torch", None)
        worst = float(np.min(np.sum(ref * got, axis=1)))
        if worst < FLOORS[name]:
            log.warning(
                "the %s image tower differs from torch (worst cosine %.6f < %.4f): not used",
                name,
                worst,
                FLOORS[name],
            )
            continue
        log.info("%s image tower: worst cosine %.7f to torch on %d probe pictures", name, worst, len(pixels))
        out[name] = tower
    return out


def side_by_side_rates(
    names: list[str],
    run: Callable[[str], object],
    lanes: int,
    pictures: int,
    alone: Collection[str] = (),
    around: Callable[[str], AbstractContextManager[Any]] | None = None,
    rounds: int = 3,
) -> dict[str, float]:
    """Pictures/s the whole machine embeds with each of `names`, where `run(name)` embeds `pictures` pictures once:
    `lanes` runs side by side on as many threads, as ingest's lanes run (they share the memory bus), or one at a
    time for those in `alone` (a runtime with a pool of all threads of its own). Each timed pass runs inside
    `around(name)` (setting up and taking down what it times). The best of `rounds` passes each after a warm-up,
    the names taking turns, so that a box whose speed drifts (a shared host) does not favour the one timed first."""
    best = dict.fromkeys(names, float("inf"))
    with ThreadPoolExecutor(lanes, thread_name_prefix="loupe-probe") as pool:

        def one_pass(name: str) -> float:
            with around(name) if around is not None else contextlib.nullcontext():
                t = time.perf_counter()
                if name in alone:
                    run(name)
                else:
                    list(pool.map(lambda _: run(name), range(lanes)))
                return time.perf_counter() - t

        for name in names:
            one_pass(name)  # warm
        for _ in range(rounds):
            for name in names:
                best[name] = min(best[name], one_pass(name))
    return {name: (1 if name in alone else lanes) * pictures / took for name, took in best.items()}


def _rates(clip: Any, towers: Mapping[str, Any], pixels: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """side_by_side_rates of each of `towers` installed in turn: torch and bf16 one single-threaded pass per torch
    thread side by side, ONNX Runtime one pass at a time on all of its threads."""

    @contextlib.contextmanager
    def installed(name: str) -> Iterator[None]:
        _install(clip, name, towers[name])
        try:
            yield
        finally:
            _install(clip, "torch", None)

    return side_by_side_rates(
        list(towers),
        lambda name: clip.embed_uint8(pixels) if name == "onnx" else clip.embed_uint8(pixels, 1),
        clip.threads,
        len(pixels),
        alone={"onnx"},
        around=installed,
        rounds=rounds,
    )


def attach(
    clip: Any,
    mode: str,
    cache_dir: Path,
    threads: int = 0,
    gains: Mapping[str, float] | None = None,
    try_bf16: bool = True,
    memory: ChoiceMemory | None = None,
) -> str:
    """Give `clip` the image runtime `mode` asks for (auto | torch | onnx | bf16; a named one serves whenever it
    builds and keeps its floor, else torch). `gains` overrides ONNX_GAIN / BF16_GAIN for `auto`, and `try_bf16`
    False leaves the bf16 copy out of it. `threads`: ONNX Runtime's pool (0: its default, one per core). With a
    `memory`, `auto` reuses the choice an earlier start timed for this model on this machine (still checked
    against torch's vectors) and records the ones it times. Returns the runtime in use, for health. Call on the
    torch thread (models/torch_thread.py), as the model's other start-up checks."""
    _install(clip, "torch", None)
    if mode == "torch" or clip.info.device != "cpu":
        return "torch"
    pixels = probe_pixels(clip._sizes[1])
    names = (["onnx", "bf16"] if try_bf16 else ["onnx"]) if mode == "auto" else [mode]
    need = {"onnx": ONNX_GAIN, "bf16": BF16_GAIN, **(gains or {})}
    key = None
    if mode == "auto" and memory is not None:
        key = memory.key(
            "image",
            clip.info.fingerprint,
            lanes=clip.threads,
            pool=threads,
            names=names,
            gains=need,
            n=len(pixels),
        )
        entry = memory.get(key)
        if entry is not None and entry.get("choice") in {"torch", *names}:
            chosen = str(entry["choice"])
            found = {} if chosen == "torch" else _candidates(clip, [chosen], cache_dir, threads, pixels)
            if chosen == "torch" or chosen in found:
                log.info(
                    "image tower: %s (%s; delete %s to time again)", chosen, described(entry), memory.path
                )
                clip.runtime_choices["image"] = described(entry)
                _install(clip, chosen, found.get(chosen))
                return chosen
            log.warning(
                "the remembered %s image tower does not check out now: timing the image towers", chosen
            )
    found = _candidates(clip, names, cache_dir, threads, pixels)
    if mode != "auto":
        chosen = mode if mode in found else "torch"
    else:
        with TimingWindow(clip.threads) as window:
            rates = _rates(clip, {"torch": None, **found}, pixels)
        chosen = "onnx" if "onnx" in rates and rates["onnx"] >= need["onnx"] * rates["torch"] else "torch"
        if "bf16" in rates and rates["bf16"] >= need["bf16"] * rates[chosen]:
            chosen = "bf16"
        log.info(
            "image towers on %d probe pictures: %s; serving %s",
            len(pixels),
            ", ".join(f"{name} {rate:.1f} pictures/s" for name, rate in rates.items()),
            chosen,
        )
        if memory is not None and key is not None:
            rounded = {k: round(v, 2) for k, v in rates.items()}
            memory.put(key, window=window, choice=chosen, rates=rounded)
        clip.runtime_choices["image"] = timed(window)
    _install(clip, chosen, found.get(chosen))
    if chosen != "torch":
        log.info("image vectors come from the %s image tower", chosen)
    return chosen


def attach_for_settings(clip: Any, settings: Any) -> str:
    """`attach` as LOUPE_MODEL__IMAGE_RUNTIME says, the ONNX export and the choice remembered in the data
    directory, on the torch thread; `auto` tries the bf16 copy only where torch has bf16 kernels
    (bf16_text.cpu_has_bf16)."""
    from loupe.models import torch_thread

    try_bf16 = cpu_has_bf16()
    if settings.model.image_runtime == "auto" and not try_bf16:
        log.info("this CPU has no bf16 kernels: the bf16 image tower is not tried")
    return torch_thread.call(  # type: ignore[no-any-return]
        attach,
        clip,
        settings.model.image_runtime,
        settings.data_dir / "models" / "onnx",
        settings.model.torch_threads,
        try_bf16=try_bf16,
        memory=ChoiceMemory(settings.data_dir / "models"),
    )
