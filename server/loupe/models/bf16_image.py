"""Image vectors from a bfloat16 copy of the image tower, where the CPU makes that faster.

On CPUs with bf16 matrix units (Intel AMX) a traced bf16 copy of ViT-B/32's image tower embeds a batch of 8 on one
thread about 4x faster than fp32 (bench/RESULTS.md, "Ingest on the CPU"), with a worst cosine of 0.99995 to fp32 on
the probes. On CPUs without bf16 units it can be slower. So nothing is assumed: at start the copy is timed against
the fp32 tower on a probe batch of the shape an ingest model worker embeds (PROBE_BATCH pictures on one torch
thread), and it serves every image vector (ingest and image queries) only where it wins by GAIN and its vectors
keep a worst cosine of COSINE_FLOOR to fp32 on the probes. It costs the image transformer's weights at 2 bytes each
(176 MB for ViT-B/32); the fp32 model stays, the reference for the check and for fine-tuning.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from loupe.models.bf16_text import COSINE_FLOOR, TRACE_FLOOR, best_of
from loupe.models.tracing import trace_checked
from loupe.models.vectors import normalize

log = logging.getLogger(__name__)

# Pictures in the batch timed at start: an ingest model worker's share of a batch of 16 on 2 cores.
PROBE_BATCH = 8
# The speed-up over fp32 that makes the copy worth its memory and its rounding.
GAIN = 1.25


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


class Bf16ImageTower:
    """get_image_features of a CLIP model on a bfloat16 copy of its vision transformer and projection: normalized
    float32 pixel values in, the projected embedding out (float32). A TorchScript trace where tracing works (one
    call per pass, the GIL released throughout: models/tracing.py), checked against eager mode at another batch
    size; eager mode serves where it fails or differs."""

    def __init__(self, model: Any, side: int) -> None:
        import torch

        vision = copy.deepcopy(model.vision_model).to(torch.bfloat16).eval()
        projection = copy.deepcopy(model.visual_projection).to(torch.bfloat16).eval()

        class Tower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vision, self.projection = vision, projection

            def forward(self, pixel_values: Any) -> Any:
                pooled = self.vision(pixel_values=pixel_values.to(torch.bfloat16)).pooler_output
                return self.projection(pooled).float()

        self.tower = Tower().eval()
        gen = torch.Generator().manual_seed(0)
        example, check = (torch.randn(n, 3, side, side, generator=gen) for n in (2, 3))

        def differs(eager: Any, traced: Any) -> str | None:
            worst = float(np.min(np.sum(normalize(eager.numpy()) * normalize(traced.numpy()), 1)))
            return f"worst cosine {worst:.6f} to eager mode" if worst < TRACE_FLOOR else None

        self.traced = trace_checked("bf16 image tower", self.tower, (example,), [(check,)], differs)

    def __call__(self, pixel_values: Any) -> Any:
        return (self.traced if self.traced is not None else self.tower)(pixel_values)


def attach(clip: Any, mode: str, gain_needed: float | None = None) -> str:
    """Give `clip` a bf16 image tower when `mode` is on, or auto and it measures at least `gain_needed` (default
    GAIN) times faster than fp32 on PROBE_BATCH pictures on one thread. Returns the image runtime for health:
    "bf16" or "fp32". Call on the torch thread (models/torch_thread.py), as the model's other start-up checks."""
    clip.image_tower_bf16 = None
    if mode == "off" or clip.info.device != "cpu":
        return "fp32"
    pixels = probe_pixels(clip._sizes[1])
    try:
        tower = Bf16ImageTower(clip.model, clip._sizes[1])
        ref = clip.embed_uint8(pixels)
        clip.image_tower_bf16 = tower
        got = clip.embed_uint8(pixels)
    except Exception as exc:  # bf16 unsupported by this torch build or model: fp32 serves
        clip.image_tower_bf16 = None
        log.warning("the bf16 image tower could not be built (%s: %s): not used", type(exc).__name__, exc)
        return "fp32"
    worst = float(np.min(np.sum(ref * got, axis=1)))
    if worst < COSINE_FLOOR:
        clip.image_tower_bf16 = None
        log.warning(
            "the bf16 image tower differs from fp32 (worst cosine %.5f < %.4f): not used", worst, COSINE_FLOOR
        )
        return "fp32"
    if mode == "auto":
        bf16 = best_of(lambda: clip.embed_uint8(pixels, 1))
        clip.image_tower_bf16 = None
        fp32 = best_of(lambda: clip.embed_uint8(pixels, 1))
        gain = fp32 / bf16
        log.info("bf16 image tower on %d pictures, one thread: %.2fx fp32", len(pixels), gain)
        if gain < (GAIN if gain_needed is None else gain_needed):
            return "fp32"
        clip.image_tower_bf16 = tower
    log.info("image vectors come from a bf16 copy of the image tower (worst cosine %.6f to fp32)", worst)
    return "bf16"


def attach_for_settings(clip: Any, settings: Any) -> str:
    """`attach` as LOUPE_MODEL__IMAGE_BF16 says, on the torch thread."""
    from loupe.models import torch_thread

    return torch_thread.call(attach, clip, settings.model.image_bf16)  # type: ignore[no-any-return]
