"""Activation smoothing before int8 quantization (SmoothQuant, Xiao et al., 2023), for the quantized text towers.

`onnx-int8` quantizes each activation tensor with one scale at run time (ONNX Runtime's dynamic quantization). A
trained transformer's activations carry a few channels far larger than the rest, and one scale for the tensor
leaves the other channels a handful of int8 steps. Smoothing divides every weight matmul's input by a per-channel
factor s_j = max|x_j|^a / max|W_j|^(1-a) (max|x_j| from calibration queries) and multiplies the weight's input
rows by it: the same function in fp32, with the outliers moved into the weights, whose scales are per output
channel. On all-MiniLM-L6-v2's real weights (bench/RESULTS.md, "int8 text encoder on real weights") a = 0.8 moved
per-channel int8 query vectors from a mean cosine of 0.9936 to fp32 to 0.9981 and kept 96% of the top 10 instead
of 94%; the division runs as one Mul before each MatMul (on ViT-B/32's text tower within the timing noise here).

`onnx-w8` quantizes activations per block of input channels, so an outlier channel costs only its own block; it is
smoothed more gently (FOLD_ALPHA), and only where the division folds into the operation before the matmul, so its
graph gains no operation (folded): the layer norms before the query, key and value projections (one factor shared
by the three) and before the first feed-forward matmul and the projection, and the value projection's output
channels for the attention's output projection (attention mixes tokens, not channels). The second feed-forward
matmul, whose input comes from the GELU, stays as it is. On MiniLM's real weights (a BERT: the same folds, its
layer norms after the sublayers) that kept 8-bit blocks of 128 as close to fp32 as unsmoothed blocks of 32 (mean
cosine 0.99967 against 0.99969, 98.7% of the top 10 against 98.4%), and blocks of 32 closer (0.99985, 99.0%).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from typing import Any

ALPHA = 0.8
# onnx-w8's (folded): on MiniLM with blocks of 128, a = 0.4 / 0.5 / 0.6 kept a mean cosine of 0.99961 / 0.99967 /
# 0.99968 to fp32 and 98.4 / 98.7 / 98.6% of the top 10 (SmoothQuant's own default is 0.5).
FOLD_ALPHA = 0.5

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

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and full in amax:
                setattr(m, child_name, divided(child, factors(amax[full], [child.weight], alpha)))
    return out


@cache
def _divided_class() -> Any:
    import torch

    class Divided(torch.nn.Module):
        def __init__(self, lin: Any, s: Any) -> None:  # `lin`: the copy's own Linear, scaled in place
            super().__init__()
            self.register_buffer("inv", (1.0 / s).to(lin.weight.dtype))
            with torch.no_grad():
                lin.weight.mul_(s[None, :].to(lin.weight.dtype))
            self.lin = lin

        def forward(self, x: Any) -> Any:
            return self.lin(x * self.inv)

    return Divided


def divided(lin: Any, s: Any) -> Any:
    """`lin` (a Linear, its weight's input rows multiplied by `s` in place) computing (W diag(s)) (x / s): the same
    function in fp32. Exported, the division is a Mul before the MatMul."""
    return _divided_class()(lin, s)


def factors(amax: Any, weights: list[Any], alpha: float) -> Any:
    """s_j = max|x_j|^a / max|W_j|^(1-a) for one input `amax` read by the Linears' `weights` (the largest weight
    of input channel j across them: readers of one input share its factor)."""
    import torch

    wmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)
    return amax.clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)


def folded(parts: Any, amax: dict[str, Any], alpha: float = FOLD_ALPHA) -> Any:
    """A copy of `parts` ({"text": CLIP's text model, "projection": its text projection}, calibrated by `amax` under
    those names) with smoothing folded into the operations before the matmuls (the module docstring says which):
    the same function in fp32, the same operations, the activation outliers moved into the weights."""
    import torch

    out = copy.deepcopy(parts)
    text, proj = out["text"], out["projection"]

    def into_norm(norm: Any, readers: list[Any], key: str) -> None:
        s = factors(amax[key], [r.weight for r in readers], alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        if norm.bias is not None:  # a layer norm without a bias (not CLIP's) scales the same way
            norm.bias.div_(s.to(norm.bias.dtype))
        for r in readers:
            r.weight.mul_(s[None, :].to(r.weight.dtype))

    with torch.no_grad():
        for i, layer in enumerate(text.encoder.layers):
            a, at = layer.self_attn, f"text.encoder.layers.{i}."
            into_norm(layer.layer_norm1, [a.q_proj, a.k_proj, a.v_proj], at + "self_attn.q_proj")
            into_norm(layer.layer_norm2, [layer.mlp.fc1], at + "mlp.fc1")
            s = factors(amax[at + "self_attn.out_proj"], [a.out_proj.weight], alpha)
            a.v_proj.weight.div_(s[:, None].to(a.v_proj.weight.dtype))
            if a.v_proj.bias is not None:
                a.v_proj.bias.div_(s.to(a.v_proj.bias.dtype))
            a.out_proj.weight.mul_(s[None, :].to(a.out_proj.weight.dtype))
        into_norm(text.final_layer_norm, [proj], "projection")
    return out
