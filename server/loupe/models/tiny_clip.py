"""The tiny CLIP: built and trained offline on synthetic coloured shapes.

It is the offline demo model (when no real checkpoint can be loaded) and the model the test suite uses to
assert real retrieval quality ("a red circle" returns red circles). Everything here is deterministic for a
given recipe: a fixed seed, a locally trained byte-level BPE vocabulary in `CLIPTokenizer` format (all 256
byte symbols, so any word tokenizes), and a `transformers.CLIPModel` saved with `save_pretrained`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 35),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
TEMPLATES: tuple[str, ...] = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a picture of a {c} {s}",
    "a drawing of a {c} {s}",
    "{c} {s}",
    "the {c} {s}",
    "a {s} that is {c}",
    "a {c} {s} on a plain background",
)
# Words that are not in captions but should still be whole tokens (filler of real queries).
EXTRA_WORDS = [
    "an",
    "of",
    "on",
    "in",
    "the",
    "with",
    "and",
    "image",
    "shape",
    "colour",
    "color",
    "coloured",
    "background",
    "plain",
    "small",
    "big",
    "large",
]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained model. Its hash keys the test cache."""

    seed: int = 1234
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    projection_dim: int = 64
    max_text_len: int = 32
    steps: int = 4000
    lr: float = 2e-3
    render_size: int = 64
    version: int = 1

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "square":
        s = r * 0.85
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if shape == "cross":
        t = r * 0.33
        return rot(
            [
                (-t, -r),
                (t, -r),
                (t, -t),
                (r, -t),
                (r, t),
                (t, t),
                (t, r),
                (-t, r),
                (-t, t),
                (-r, t),
                (-r, -t),
                (-t, -t),
            ]
        )
    raise ValueError(f"unknown shape {shape!r}")


def render_shape(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One RGB picture of a coloured shape on a noisy, low-saturation background."""
    base = rng.randint(90, 200)
    tint = [max(0, min(255, base + rng.randint(-25, 25))) for _ in range(3)]
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
    bg = np.clip(np.array(tint, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.2, 0.36)
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    rgb = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=rgb)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img


def all_classes() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def caption(colour: str, shape: str, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(c=colour, s=shape)


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def train_bpe(words: Counter[str], num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train CLIP-style BPE merges on a word-frequency table. Returns (vocab, merges)."""
    byte_map = bytes_to_unicode()
    base = list(byte_map.values())
    vocab_list = base + [b + "</w>" for b in base]
    corpus: dict[tuple[str, ...], int] = {}
    for word, freq in words.items():
        syms = [byte_map[b] for b in word.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        corpus[tuple(syms)] = corpus.get(tuple(syms), 0) + freq
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for seq, freq in corpus.items():
            for a, b in itertools.pairwise(seq):
                pairs[(a, b)] += freq
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 1:
            break
        merges.append((a, b))
        merged = a + b
        new_corpus: dict[tuple[str, ...], int] = {}
        for seq, freq in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_corpus[tuple(out)] = new_corpus.get(tuple(out), 0) + freq
        corpus = new_corpus
        if merged not in vocab_list:
            vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write vocab.json + merges.txt trained on every caption word (and a few filler words)."""
    words: Counter[str] = Counter()
    rng = random.Random(0)
    for c, s in all_classes():
        for _ in range(20):
            words.update(caption(c, s, rng).split())
    words.update({w: 5 for w in EXTRA_WORDS})
    vocab, merges = train_bpe(words)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_path, merges_path


# ---------------------------------------------------------------- model


def build_untrained(recipe: Recipe, workdir: Path):  # type: ignore[no-untyped-def]
    """A fresh CLIPModel + CLIPProcessor for the recipe (tokenizer written into workdir)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab_path, merges_path = write_tokenizer_files(workdir / "tokenizer-src")
    tokenizer = CLIPTokenizer(
        vocab=str(vocab_path), merges=str(merges_path), model_max_length=recipe.max_text_len
    )
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": recipe.hidden,
            "intermediate_size": recipe.hidden * 2,
            "num_hidden_layers": recipe.layers,
            "num_attention_heads": recipe.heads,
            "max_position_embeddings": recipe.max_text_len,
            "eos_token_id": eos,
            "bos_token_id": bos,
            "pad_token_id": eos,
        },
        vision_config={
            "image_size": recipe.image_size,
            "patch_size": recipe.patch_size,
            "hidden_size": recipe.hidden,
            "intermediate_size": recipe.hidden * 2,
            "num_hidden_layers": recipe.layers,
            "num_attention_heads": recipe.heads,
        },
        projection_dim=recipe.projection_dim,
    )
    torch.manual_seed(recipe.seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": recipe.image_size},
        crop_size={"height": recipe.image_size, "width": recipe.image_size},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def _batch(rng: random.Random, recipe: Recipe) -> tuple[list[Image.Image], list[str]]:
    """One of each class per batch: no false negatives inside the contrastive loss."""
    images, texts = [], []
    classes = all_classes()
    rng.shuffle(classes)
    for c, s in classes:
        images.append(render_shape(c, s, rng, recipe.render_size))
        texts.append(caption(c, s, rng))
    return images, texts


def train(
    recipe: Recipe, out_dir: Path, progress: Callable[[int, int, float], None] | None = None
) -> dict[str, float]:
    """Train the tiny CLIP and save it (model + processor) to out_dir. Returns evaluation metrics."""
    import torch

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model, processor = build_untrained(recipe, tmp)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1
    )
    started = time.monotonic()
    for step in range(recipe.steps):
        images, texts = _batch(rng, recipe)
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs, return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 50 == 0 or step == recipe.steps - 1):
            progress(step + 1, recipe.steps, float(out.loss.detach()))
    log.info("tiny CLIP trained in %.0f s", time.monotonic() - started)
    model.eval()
    metrics = evaluate(model, processor, seed=recipe.seed + 1)
    shutil.rmtree(tmp / "tokenizer-src", ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "loupe_recipe.json").write_text(
        json.dumps(
            {"recipe": asdict(recipe), "fingerprint": recipe.fingerprint(), "metrics": metrics}, indent=2
        )
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return metrics


def evaluate(model, processor, seed: int, per_class: int = 10) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Text->image precision@5 on held-out renders (and colour-only / shape-only precision)."""
    import torch

    rng = random.Random(seed)
    classes = all_classes()
    images, labels = [], []
    for c, s in classes:
        for _ in range(per_class):
            images.append(render_shape(c, s, rng, 96))
            labels.append((c, s))
    with torch.no_grad():
        iv = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        tv = model.get_text_features(
            **processor(text=[f"a {c} {s}" for c, s in classes], return_tensors="pt", padding=True)
        ).pooler_output
    iv = torch.nn.functional.normalize(iv, dim=-1)
    tv = torch.nn.functional.normalize(tv, dim=-1)
    top = (tv @ iv.T).topk(5, dim=1).indices
    both = colour = shape = 0.0
    for qi, (c, s) in enumerate(classes):
        for j in top[qi].tolist():
            both += labels[j] == (c, s)
            colour += labels[j][0] == c
            shape += labels[j][1] == s
    n = 5 * len(classes)
    return {"text_p5": both / n, "colour_p5": colour / n, "shape_p5": shape / n}


def ensure_model(directory: Path, recipe: Recipe | None = None, progress=None) -> Path:  # type: ignore[no-untyped-def]
    """Train into `directory` unless a model of the same recipe is already there."""
    recipe = recipe or Recipe()
    marker = directory / "loupe_recipe.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == recipe.fingerprint():
                return directory
        except (OSError, ValueError):
            pass
    directory.parent.mkdir(parents=True, exist_ok=True)
    train(recipe, directory, progress)
    return directory
