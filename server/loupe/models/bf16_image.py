"""Image vectors from a bfloat16 copy of the image tower, where the CPU makes that faster.

On CPUs with bf16 matrix units (Intel AMX) a traced bf16 copy of ViT-B/32's image tower embeds a batch of 8 on one
thread about 4x faster than fp32 (bench/RESULTS.md, "Ingest on the CPU"), with a worst cosine of 0.99995 to fp32 on
the probes. On CPUs without bf16 units it can be slower: models/image_runtime.py times it at start. It costs the
image transformer's weights at 2 bytes each (176 MB for ViT-B/32); the fp32 model stays, the reference for the
check and for fine-tuning.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from loupe.models.bf16_text import TRACE_FLOOR
from loupe.models.tracing import trace_checked
from loupe.models.vectors import normalize


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

        # Ingest's single-threaded passes of its lanes' batch size, where models/compiled_image.py built them.
        self.lanes: Any = None

    def __call__(self, pixel_values: Any) -> Any:
        if self.lanes is not None and (out := self.lanes(pixel_values)) is not None:
            return out
        return self.traced_or_eager(pixel_values)

    def traced_or_eager(self, pixel_values: Any) -> Any:
        return (self.traced if self.traced is not None else self.tower)(pixel_values)
