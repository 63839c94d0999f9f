"""Activation smoothing before int8 quantization (SmoothQuant, Xiao et al., 2023), for the `onnx-int8` text tower.

`onnx-int8` quantizes each activation tensor with one scale at run time (ONNX Runtime's dynamic quantization). A
trained transformer's activations carry a few channels far larger than the rest, and one scale for the tensor
leaves the other channels a handful of int8 steps. Smoothing divides every weight matmul's input by a per-channel
factor s_j = max|x_j|^a / max|W_j|^(1-a) (max|x_j| from calibration queries) and multiplies the weight's input
rows by it: the same function in fp32, with the outliers moved into the weights, whose scales are per output
channel. On all-MiniLM-L6-v2's real weights (bench/RESULTS.md, "int8 text encoder on real weights") a = 0.8 moved
per-channel int8 query vectors from a mean cosine of 0.9936 to fp32 to 0.9981 and kept 96% of the top 10 instead
of 94%; the division runs as one Mul before each MatMul (on ViT-B/32's text tower within the timing noise here).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

ALPHA = 0.8

# Calibration queries for CLIP text towers: the kinds of things people type into an image search.
CALIBRATION = [
    "a photo of a cat",
    "a dog running on the beach",
    "a red bicycle against a brick wall",
    "sunset over the sea with boats",
    "two people walking a dog on the beach at dawn, with long shadows",
    "a hand-drawn sketch of a house",
    "screenshot of an error message",
    "a bowl of ramen on a wooden table",
    "snow on the mountains",
    "birthday cake with candles",
    "city skyline at night",
    "a child playing in the park",
    "an old black and white portrait of a woman",
    "receipt",
    "whiteboard with diagrams from a meeting",
    "a yellow car parked in front of a blue door",
    "forest path in autumn with orange leaves",
    "close-up of a flower with a bee",
    "my passport",
    "a crowd at a concert with stage lights",
    "oil painting of a ship in a storm",
    "a cartoon cat wearing sunglasses, meme",
    "kitchen interior with white cabinets",
    "a plate of pasta with tomato sauce and basil",
    "aerial view of a river winding through fields",
    "people at a wedding",
    "a map",
    "the Eiffel Tower",
    "a green circle",
    "a photo of a small blue square on a white background",
    "handwritten note",
    "a frog",
    "product photo of running shoes on a white background",
    "graph showing sales by month",
    "christmas tree with lights in a living room",
    "a man fishing from a small boat on a calm lake early in the morning",
    "cat sleeping on a laptop keyboard",
    "rainy street with umbrellas",
    "a selfie in front of a mirror",
    "vintage poster with bold typography",
]


def calibrate(model: Any, run: Callable[[], Any]) -> dict[str, Any]:
    """max |x| per input channel of every Linear in `model` while `run()` runs it: {module name: tensor}."""
    import torch

    amax: dict[str, Any] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):

            def hook(_mod: Any, inp: Any, _out: Any, name: str = name) -> None:
                a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return amax


def smoothed(model: Any, amax: dict[str, Any], alpha: float = ALPHA) -> Any:
    """A copy of `model` in which every calibrated Linear computes (W diag(s)) (x / s): the same function in fp32,
    its per-channel input outliers moved into the weights. Exported, the division is a Mul before the MatMul."""
    import torch

    class Smoothed(torch.nn.Module):
        def __init__(self, lin: Any, s: Any) -> None:  # `lin`: the copy's own Linear, scaled in place
            super().__init__()
            self.register_buffer("inv", (1.0 / s).to(lin.weight.dtype))
            with torch.no_grad():
                lin.weight.mul_(s[None, :].to(lin.weight.dtype))
            self.lin = lin

        def forward(self, x: Any) -> Any:
            return self.lin(x * self.inv)

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and full in amax:
                wmax = child.weight.detach().abs().amax(0).float().clamp(min=1e-5)
                s = amax[full].clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)
                setattr(m, child_name, Smoothed(child, s))
    return out
