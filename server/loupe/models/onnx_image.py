"""The image tower through ONNX Runtime on the CPU, in fp32: the same vectors as torch (worst cosine 0.9999999 on
the probes), faster where torch's CPU kernels are slow.

On a 2-core AMD EPYC with AVX2 only (no AVX-512), ViT-B/32's image tower ran 1.4-1.7x faster on ONNX Runtime than
as a torch trace: one picture on 2 threads 73 against 126 ms, batches of 8 17.5 against 12.8 pictures/s (/tmp
probe; bench/RESULTS.md, the summary's eighth box and "A/B: ingest pipeline"). The session runs every pass on its own pool of all threads, one pass
at a time: two passes at once on that pool ran 14.4 pictures/s against 17.5 one after another. The tower (vision
transformer and projection) is exported once per model fingerprint into the data directory with the batch
dynamic. models/image_runtime.py decides at start whether it serves.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from loupe.models.onnx_text import cpu_session, export_module
from loupe.models.vectors import normalize

# Export files: PREFIX-<fingerprint>.onnx in the ONNX cache directory (beside the text tower's exports).
PREFIX = "image1"

_export_lock = threading.Lock()


class OnnxImageTower:
    """Normalized float32 pixel values (n, 3, H, W) in, unit vectors out; thread-safe, one pass at a time."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.session = cpu_session(path, threads)
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        with self._lock:
            (out,) = self.session.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})
        return normalize(out)


def export(model: Any, side: int, target: Path) -> Path:
    """Export `model`'s image tower (get_image_features: vision transformer, pooled output, projection) to
    `target`, the batch dynamic; atomic."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision, self.projection = model.vision_model, model.visual_projection

        def forward(self, pixel_values: Any) -> Any:
            return self.projection(self.vision(pixel_values=pixel_values).pooler_output)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock:
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            example = torch.zeros(2, 3, side, side)
            axes = {"pixel_values": {0: "batch"}, "embedding": {0: "batch"}}
            export_module(Tower().eval(), (example,), tmp, ["pixel_values"], axes)
            tmp.replace(target)
    return target
