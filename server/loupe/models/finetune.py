"""Domain fine-tuning of the library's CLIP on its own pairs, guarded by held-out retrieval quality.

Pairs come from the library (descriptions as captions; tags and album names as pseudo-captions "a photo of {x}")
or from a JSONL of {"image_id" | "path", "caption"}. Methods (arXiv 2409.01936, "Optimizing CLIP Models for Image
Retrieval with Maintained Joint-Embedding Alignment"):

* sequential (default): first the image tower, trained for image->image retrieval (positives: images sharing a
  caption, near-duplicates by perceptual hash, or two augmentations of one image) with, as pseudo-caption alignment, the InfoNCE loss to the frozen
  text tower's caption embeddings; then the text tower alone, re-aligned to the new image embeddings;
* joint: both towers together with the CLIP contrastive (InfoNCE) loss.

The trainable parameters are LoRA adapters (peft) on the attention projections of both towers, or the last layers
of each tower (`mode=last_layers`). Every run is evaluated before and after on held-out pairs (text->image and
image->image Recall@10 and mAP@10); a drop of more than `max_regression` (relative) in any of them refuses the run,
and nothing is kept. An accepted run is a new checkpoint directory, activated through a model switch.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from loupe.config import FinetuneSettings
from loupe.errors import BadRequest, Conflict
from loupe.models.clip import pooled
from loupe.search.evaluate import metrics_at_k

if TYPE_CHECKING:
    from loupe.models.clip import ClipModel
    from loupe.runtime import Runtime

log = logging.getLogger(__name__)

K = 10


@dataclass(frozen=True)
class Pair:
    key: str  # the image: "id:<n>" or a file path
    caption: str  # a caption, or for a pseudo-caption the label itself ("red bicycle")
    pseudo: bool = False


# Pseudo-captions are drawn from several generic prompt templates at each step, so the text tower learns the label,
# not one phrasing (with a single "a photo of {}" the tiny model lost 17% text->image mAP on other phrasings).
PSEUDO_TEMPLATES = (
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "{}",
    "a close-up photo of {}",
    "a photo of the {}",
)


def text_of(pair: Pair, rng: random.Random | None = None) -> str:
    if not pair.pseudo:
        return pair.caption
    return (rng.choice(PSEUDO_TEMPLATES) if rng else PSEUDO_TEMPLATES[0]).format(pair.caption)


@dataclass
class FinetuneReport:
    accepted: bool
    reason: str
    method: str
    mode: str
    train_pairs: int
    heldout_queries: dict[str, int]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    steps: int
    seconds: float
    samples_per_s: float
    output: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------ pairs


def library_pairs(rt: Runtime) -> list[Pair]:
    """Captions and pseudo-captions of every ready image: its description; its tags and album names as labels that
    training phrases through PSEUDO_TEMPLATES ('a photo of {tag}', ...); the first words read in it by OCR."""
    ids = [int(i) for i in rt.repo.all_ready_ids()]
    pairs: list[Pair] = []
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        rows = rt.repo.get_images(chunk)
        tags, albums = rt.repo.tags_for(chunk), rt.repo.albums_for(chunk)
        texts = rt.repo.get_texts(chunk)
        for i in chunk:
            desc = (rows[i].description or "").strip() if i in rows else ""
            if desc:
                pairs.append(Pair(f"id:{i}", desc))
            pairs += [Pair(f"id:{i}", t, pseudo=True) for t in tags.get(i, [])]
            pairs += [Pair(f"id:{i}", a, pseudo=True) for a in albums.get(i, [])]
            words = " ".join(texts[i].content.split()[:24]) if i in texts else ""
            if len(words) >= 3:  # the words read in the picture (OCR): what a screenshot or a poster says
                pairs.append(Pair(f"id:{i}", f"a picture with the words {words}"))
    return pairs


def jsonl_pairs(path: Path) -> list[Pair]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
            caption = str(obj["caption"]).strip()
            key = f"id:{int(obj['image_id'])}" if "image_id" in obj else str(Path(obj["path"]).expanduser())
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BadRequest(
                f'{path} line {n}: want {{"image_id" or "path", "caption"}} ({exc})', code="bad_pairs"
            ) from exc
        if not caption:
            raise BadRequest(f"{path} line {n}: empty caption", code="bad_pairs")
        pairs.append(Pair(key, caption))
    return pairs


def split_pairs(pairs: Sequence[Pair], heldout: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Split by image (an image's pairs stay on one side), reproducibly."""
    keys = sorted({p.key for p in pairs})
    random.Random(seed).shuffle(keys)
    held = set(keys[: max(1, round(len(keys) * heldout))]) if len(keys) > 1 else set()
    return [p for p in pairs if p.key not in held], [p for p in pairs if p.key in held]


# ------------------------------------------------------------ images


class ImageSource:
    """Decoded pictures by key, kept small (the model's input size x 1.5) for augmentation."""

    def __init__(self, rt: Runtime, side: int) -> None:
        self.rt = rt
        self.side = side
        self._cache: dict[str, Image.Image] = {}

    def get(self, key: str) -> Image.Image:
        img = self._cache.get(key)
        if img is None:
            from loupe.ingest.validate import decode_rgb

            if key.startswith("id:"):
                row = self.rt.repo.get_image(int(key[3:]))
                if row is None:
                    raise BadRequest(f"image {key[3:]} is not in the library", code="bad_pairs")
                data = self.rt.blobs.read_original(row.sha256)
            else:
                try:
                    data = Path(key).read_bytes()
                except OSError as exc:
                    raise BadRequest(f"cannot read {key}: {exc.strerror}", code="bad_pairs") from exc
            img = decode_rgb(data, max_pixels=self.rt.settings.ingest.max_pixels, min_side=self.side)
            img.thumbnail((self.side * 3 // 2, self.side * 3 // 2), Image.Resampling.BICUBIC)
            self._cache[key] = img
        return img

    def augmented(self, key: str, rng: random.Random) -> Image.Image:
        img = self.get(key)
        w, h = img.size
        scale = rng.uniform(0.9, 1.0)  # mild: stronger crops cut subjects out and cost the tiny model 10% mAP
        cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = img.crop((x, y, x + cw, y + ch))
        return ImageOps.mirror(out) if rng.random() < 0.5 else out


# ------------------------------------------------------------ evaluation


def embed(
    model: Any, clip: ClipModel, images: Sequence[Image.Image], texts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of images and texts through `model` (which may differ from clip.model), in batches."""
    import torch

    with torch.inference_mode():
        iv = [_features(model, clip, list(images[i : i + 64]), None)[0] for i in range(0, len(images), 64)]
        tv = [_features(model, clip, None, list(texts[i : i + 256]))[1] for i in range(0, len(texts), 256)]
    empty = np.zeros((0, clip.dim), np.float32)
    return (
        torch.cat(iv).float().cpu().numpy() if iv else empty,
        torch.cat(tv).float().cpu().numpy() if tv else empty,
    )


def heldout_eval(
    model: Any, clip: ClipModel, source: ImageSource, heldout: Sequence[Pair]
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Recall@10, mAP@10 and NDCG@10 (loupe eval's metrics; the guard judges the first two).
    text->image: each held-out caption against the held-out images (relevant: the images with that caption);
    image->image: each held-out image against the others (relevant: those sharing a caption with it)."""
    keys = sorted({p.key for p in heldout})
    index = {k: n for n, k in enumerate(keys)}
    captions_of: dict[str, set[str]] = {}
    for p in heldout:
        captions_of.setdefault(p.key, set()).add(p.caption)
    images_of: dict[str, set[int]] = {}
    for p in heldout:
        images_of.setdefault(p.caption, set()).add(index[p.key])
    texts = sorted(images_of)
    pseudo = {p.caption for p in heldout if p.pseudo}
    iv, tv = embed(
        model, clip, [source.get(k) for k in keys], [text_of(Pair("", t, t in pseudo)) for t in texts]
    )
    out: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    rows = []
    for t, q in zip(texts, tv, strict=True):
        ranked = np.argsort(-(iv @ q))[:K].tolist()
        rows.append(metrics_at_k(ranked, images_of[t], K))
    # every held-out pair is a text query (a caption shared by several images counts once per pair)
    weights = [sum(1 for p in heldout if p.caption == t) for t in texts]
    out["text_to_image"] = {
        m: float(np.average([r[m] for r in rows], weights=weights)) for m in ("recall", "map", "ndcg")
    }
    counts["text_to_image"] = int(sum(weights))
    rows = []
    sims = iv @ iv.T
    for n, k in enumerate(keys):
        relevant = set().union(*(images_of[c] for c in captions_of[k])) - {n}
        if not relevant:
            continue
        s = sims[n].copy()
        s[n] = -np.inf
        rows.append(metrics_at_k(np.argsort(-s)[:K].tolist(), relevant, K))
    out["image_to_image"] = {
        m: float(np.mean([r[m] for r in rows])) if rows else 0.0 for m in ("recall", "map", "ndcg")
    }
    counts["image_to_image"] = len(rows)
    return out, counts


# ------------------------------------------------------------ training


def _trainable(model: Any, settings: FinetuneSettings) -> tuple[Any, set[str]]:
    """LoRA adapters on both towers (peft), or the last layers of each tower (and the projections) unfrozen.
    Returns the model to train and the names of its trainable parameters."""
    if settings.mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            target_modules=list(settings.lora_targets),
            lora_dropout=0.0,
            bias="none",
        )
        peft_model = get_peft_model(model, config)
        return peft_model, {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    names: set[str] = set()
    for tower in ("vision_model", "text_model"):
        layers = len(getattr(model, tower).encoder.layers)
        keep = {f"{tower}.encoder.layers.{i}." for i in range(layers - settings.last_layers, layers)}
        names |= {n for n, _ in model.named_parameters() if any(n.startswith(k) for k in keep)}
    names |= {
        n for n, _ in model.named_parameters() if n.startswith(("visual_projection", "text_projection"))
    }
    return model, names


def _set_phase(model: Any, trainable: set[str], tower: str | None) -> list[Any]:
    """Let only `tower`'s trainable parameters learn ("vision", "text", or None: both); returns them."""
    marks = {"vision": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}
    params = []
    for name, p in model.named_parameters():
        learn = name in trainable and (tower is None or any(m in name for m in marks[tower]))
        p.requires_grad_(learn)
        if learn:
            params.append(p)
    return params


def _info_nce(a: Any, b: Any, scale: Any) -> Any:
    import torch
    import torch.nn.functional as F

    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _features(
    model: Any, clip: ClipModel, images: list[Image.Image] | None, texts: list[str] | None
) -> tuple[Any, Any]:
    """Normalized image and text embeddings as tensors (with gradients when training)."""
    import torch.nn.functional as F

    iv = tv = None
    if images is not None:
        px = clip.pixel_values(np.stack([clip.resize_crop(im) for im in images]), model.device)
        iv = F.normalize(pooled(model.get_image_features(pixel_values=px)), dim=-1)
    if texts is not None:
        enc = clip.tokenize(texts)
        tv = F.normalize(
            pooled(model.get_text_features(**{k: v.to(model.device) for k, v in enc.items()})), dim=-1
        )
    return iv, tv


def near_duplicate_keys(rt: Runtime, max_distance: int = 4) -> dict[str, list[str]]:
    """Image key -> the keys of its near-duplicates (perceptual hash): more positives for the image phase."""
    out: dict[str, list[str]] = {}
    for group in rt.repo.duplicate_groups(max_distance, limit=100_000):
        keys = [f"id:{i}" for i, _ in group]
        for k in keys:
            out[k] = [o for o in keys if o != k]
    return out


def positives(pair: Pair, by_caption: dict[str, list[Pair]], near_dups: dict[str, list[str]]) -> list[str]:
    """Other images that may stand for this one in the image phase: those sharing its caption and its
    near-duplicates. Empty: two augmentations of the image itself are the positive pair."""
    same = [q.key for q in by_caption.get(pair.caption, []) if q.key != pair.key]
    return list(dict.fromkeys(same + near_dups.get(pair.key, [])))


def _batches(train: Sequence[Pair], batch: int, rng: random.Random) -> Any:
    """Endless batches of pairs with distinct captions (no false negatives in the contrastive loss)."""
    by_caption: dict[str, list[Pair]] = {}
    for p in train:
        by_caption.setdefault(p.caption, []).append(p)
    captions = list(by_caption)
    while True:
        picked = rng.sample(captions, min(batch, len(captions)))
        yield [rng.choice(by_caption[c]) for c in picked], by_caption


def finetune(
    rt: Runtime,
    train: Sequence[Pair],
    heldout: Sequence[Pair],
    settings: FinetuneSettings,
    out_dir: Path,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> FinetuneReport:
    """Train on `train`, judge on `heldout`; save to out_dir only when accepted."""
    import torch
    from transformers import CLIPModel

    if len({p.caption for p in train}) < 2 or not heldout:
        raise BadRequest(
            "fine-tuning needs pairs with at least two different captions and a held-out share to judge it",
            code="not_enough_pairs",
        )
    clip = rt.clip
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    device = "cuda" if clip.info.device.startswith("cuda") else "cpu"
    base: Any = CLIPModel.from_pretrained(clip.info.source)
    base = base.to(device).float().eval()
    source = ImageSource(rt, clip.info.image_size)
    before, counts = heldout_eval(base, clip, source, heldout)
    warnings = []
    if min(counts.values()) < settings.min_queries:
        warnings.append(
            f"only {min(counts.values())} held-out queries (want >= {settings.min_queries}): the guard is noisier"
        )
    model, trainable = _trainable(base, settings)
    scale = base.logit_scale.exp().detach()
    phases = (
        [("vision", settings.steps), ("text", settings.steps)]
        if settings.method == "sequential"
        else [(None, settings.steps)]
    )
    held_keys = {p.key for p in heldout}
    near_dups = {
        k: [o for o in v if o not in held_keys]
        for k, v in near_duplicate_keys(rt).items()
        if k not in held_keys
    }
    started = time.monotonic()
    samples = 0
    batches = _batches(train, settings.batch_size, rng)
    for tower, steps in phases:
        params = _set_phase(model, trainable, tower)
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        model.train()
        for step in range(steps):
            pairs, by_caption = next(batches)
            if tower == "vision":
                # image->image: two views of each caption group (another image with that caption, or an augmentation)
                first = [source.augmented(p.key, rng) for p in pairs]
                second = []
                for p in pairs:
                    others = positives(p, by_caption, near_dups)
                    second.append(source.augmented(rng.choice(others) if others else p.key, rng))
                a, _ = _features(model, clip, first + second, None)
                n = len(pairs)
                loss = _info_nce(a[:n], a[n:], scale)
                if settings.pseudo_captions:
                    with torch.no_grad():
                        _, t = _features(model, clip, None, [text_of(p, rng) for p in pairs])
                    loss = loss + _info_nce(a[:n], t, scale)
                samples += 2 * n
            else:
                imgs = [source.augmented(p.key, rng) for p in pairs]
                if tower == "text":  # re-align the text tower to the (new, frozen) image embeddings
                    with torch.no_grad():
                        iv, _ = _features(model, clip, imgs, None)
                    _, tv = _features(model, clip, None, [text_of(p, rng) for p in pairs])
                else:
                    iv, tv = _features(model, clip, imgs, [text_of(p, rng) for p in pairs])
                loss = _info_nce(iv, tv, scale)
                samples += len(pairs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress and (step % 20 == 0 or step == steps - 1):
                progress(tower or "both", step + 1, steps, float(loss.detach()))
    seconds = time.monotonic() - started
    model.eval()
    merged = model.merge_and_unload() if settings.mode == "lora" else model
    after, _ = heldout_eval(merged, clip, source, heldout)
    reasons = []
    for direction in ("text_to_image", "image_to_image"):
        for metric in ("recall", "map"):
            b, a = before[direction][metric], after[direction][metric]
            if b > 0 and (b - a) / b > settings.max_regression:
                reasons.append(
                    f"{direction} {metric}@{K} fell {100 * (b - a) / b:.1f}% ({b:.3f} -> {a:.3f}), "
                    f"over the {100 * settings.max_regression:g}% allowed"
                )
    accepted = not reasons
    report = FinetuneReport(
        accepted=accepted,
        reason="; ".join(reasons) if reasons else "no held-out metric fell by more than the allowed share",
        method=settings.method,
        mode=settings.mode,
        train_pairs=len(train),
        heldout_queries=counts,
        before=before,
        after=after,
        steps=sum(s for _, s in phases),
        seconds=seconds,
        samples_per_s=samples / seconds if seconds else 0.0,
        warnings=warnings,
    )
    if accepted:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        clip.tokenizer.save_pretrained(tmp)
        clip.image_processor.save_pretrained(tmp)
        (tmp / "loupe_finetune.json").write_text(json.dumps(report.as_dict(), indent=2))
        tmp.rename(out_dir)
        report.output = str(out_dir)
    return report


def run_finetune(
    rt: Runtime,
    settings: FinetuneSettings,
    pairs_file: Path | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> FinetuneReport:
    """The CLI and API entry: pairs from the file or the library, split, trained, judged, saved when accepted."""
    pairs = jsonl_pairs(pairs_file) if pairs_file else library_pairs(rt)
    if not pairs:
        raise BadRequest(
            "no training pairs: give images descriptions, tags or albums, or pass a JSONL of pairs",
            code="not_enough_pairs",
        )
    train, heldout = split_pairs(pairs, settings.heldout, settings.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = rt.settings.data_dir / "models" / f"finetuned-{stamp}"
    return finetune(rt, train, heldout, settings, out, progress)


@dataclass
class FinetuneStatus:
    state: str = "idle"  # idle | training | switching | done | refused | failed
    phase: str | None = None
    step: int = 0
    steps: int = 0
    loss: float | None = None
    report: dict[str, Any] | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state in ("training", "switching")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FinetuneRunner:
    """One fine-tuning run at a time, in the background (the admin API) or in the caller's thread (the CLI).
    With `activate`, an accepted run becomes the library's model through a model switch."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.status = FinetuneStatus()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listener: Callable[[str, int, int, float], None] | None = None

    def _claim(self) -> None:
        with self._lock:
            if self.status.running or self.rt.switcher.status.running:
                raise Conflict(
                    "a fine-tuning run or a model switch is already running", code="finetune_running"
                )
            self.status = FinetuneStatus(state="training")

    def start(self, settings: FinetuneSettings, pairs_file: Path | None, activate: bool) -> FinetuneStatus:
        self._claim()
        self._thread = threading.Thread(
            target=self._run_logged, args=(settings, pairs_file, activate), name="loupe-finetune", daemon=True
        )
        self._thread.start()
        return self.status

    def run(
        self,
        settings: FinetuneSettings,
        pairs_file: Path | None,
        activate: bool,
        progress: Callable[[str, int, int, float], None] | None = None,
    ) -> FinetuneReport:
        self._claim()
        return self._run(settings, pairs_file, activate, progress)

    def wait(self, timeout: float | None = None) -> FinetuneStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    def _progress(self, phase: str, step: int, steps: int, loss: float) -> None:
        self.status.phase, self.status.step, self.status.steps, self.status.loss = phase, step, steps, loss
        if self._listener:
            self._listener(phase, step, steps, loss)

    def _run_logged(self, settings: FinetuneSettings, pairs_file: Path | None, activate: bool) -> None:
        try:
            self._run(settings, pairs_file, activate)
        except BaseException:
            log.exception("fine-tuning failed; the library keeps its model")

    def _run(
        self,
        settings: FinetuneSettings,
        pairs_file: Path | None,
        activate: bool,
        progress: Callable[[str, int, int, float], None] | None = None,
    ) -> FinetuneReport:
        self._listener = progress
        try:
            report = self._train_and_activate(settings, pairs_file, activate)
        except BaseException as exc:
            self.status.state = "failed"
            self.status.error = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
            raise
        return report

    def _train_and_activate(
        self, settings: FinetuneSettings, pairs_file: Path | None, activate: bool
    ) -> FinetuneReport:
        report = run_finetune(self.rt, settings, pairs_file, self._progress)
        self.status.report = report.as_dict()
        if not report.accepted:
            self.status.state = "refused"
            log.warning("fine-tuning refused: %s", report.reason)
            return report
        if activate and report.output:
            self.status.state = "switching"
            self.rt.switcher.run(report.output)
        self.status.state = "done"
        return report
