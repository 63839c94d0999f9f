"""CLIP through torch + transformers: any Hugging Face CLIP checkpoint id or local directory.

Image and text towers give L2-normalized float32 vectors in one space. Offline with the default checkpoint and
nothing cached, the offline demo model (the tiny CLIP, trained once into the data directory) takes its place and
says so loudly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from loupe.errors import ConfigError
from loupe.models import text_pooled, torch_thread
from loupe.models.tracing import trace_checked
from loupe.models.vectors import normalize

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "loupe/demo-tiny-clip"
T = TypeVar("T")
# Queries waiting that start a text pass beside a running one, on one thread (ClipModel.text_passes): a batch that
# runs about as efficiently per query as a larger one on one thread, so passes side by side stay full.
SIDE_BY_SIDE_BATCH = 4


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    fingerprint: str
    dim: int
    image_size: int
    max_text_tokens: int
    is_demo: bool
    device: str


class ClipModel:
    """Both towers of one CLIP checkpoint. Thread-safe. On a GPU forward passes are serialized (one batch's
    activations in memory at a time). On the CPU each runs on the torch threads its caller asks for: passes on
    more than one run one at a time on the process's torch thread (`torch_pass`), single-threaded ones where they
    are called, side by side (ingest runs one single-threaded model worker per core: see `embed_uint8`)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, info: ModelInfo) -> None:
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.info = info
        self._lock: Any = threading.Lock() if info.device.startswith("cuda") else contextlib.nullcontext()
        # torch's intra-op threads for a caller that asks for none.
        self.threads = torch_thread.default_threads()
        self.text_threads_under_load = 0  # 0: one fewer than `threads` (threads_under_load)
        self.text_tower: Any = None  # an ONNX Runtime text tower (models/onnx_text.py) when attached
        self.text_runtime = "torch"
        # Batches of at least text_batch_min queries go to a bf16 copy of the text tower (models/bf16_text.py).
        self.text_batch_tower: Any = None
        self.text_batch_min = 0
        self.text_batches = ""
        ip = image_processor
        shortest = ip.size.get("shortest_edge") if hasattr(ip.size, "get") else ip.size["shortest_edge"]
        self._sizes = (int(shortest or info.image_size), int(ip.crop_size["height"]))
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean_np, self._std_np = self._mean.numpy(), self._std.numpy()
        # On the CPU the image tower runs as a trace (models/tracing.py): the same vectors, bit for bit.
        self._image_tower: Any = self._trace_image_tower() if info.device == "cpu" else None
        # Where ONNX Runtime or a bf16 copy of the image tower is faster, it gives every image vector (chosen at
        # start: models/image_runtime.py).
        self.image_tower_onnx: Any = None
        self.image_tower_bf16: Any = None
        self.image_runtime = "torch"
        # What serves ingest's single-threaded lanes on the bf16 copy: "trace", or "compiled" once
        # models/compiled_image.py has built it ("compiling" meanwhile).
        self.image_lanes = "trace"
        # How each `auto` choice was made: "timed at start" (or "... on a busy machine: not remembered") or
        # "remembered from ..." (models/runtime_choice.py).
        self.runtime_choices: dict[str, str] = {}

    def _trace_image_tower(self) -> Any:
        import torch

        model = self.model

        class ImageTower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values: Any) -> Any:
                return pooled(self.model.get_image_features(pixel_values=pixel_values))

        side = self._sizes[1]
        gen = torch.Generator().manual_seed(0)
        example, check = (torch.randn(n, 3, side, side, generator=gen) for n in (2, 3))

        def differs(eager: Any, traced: Any) -> str | None:
            gap = float((eager - traced).abs().max())
            return f"differs from eager mode by {gap:.2e}" if gap > 1e-5 else None

        return trace_checked("image tower", ImageTower().eval(), (example,), [(check,)], differs)

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def input_side(self) -> int:
        """The shorter side a picture is resized to before the centre crop."""
        return self._sizes[0]

    @property
    def model_sizes(self) -> tuple[int, int]:
        """(the shorter side a picture is resized to, the side of the centre crop): resize_crop's sizes."""
        return self._sizes

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        return resize_crop(img, *self._sizes)

    def pixel_values(self, batch: np.ndarray, device: Any = "cpu") -> Any:
        """resize_crop outputs (n, H, W, 3) uint8 as the model's normalized float32 input on `device` (moved there
        as uint8, 4x less to copy than float32, and normalized there)."""
        import torch

        batch = np.ascontiguousarray(batch)
        # np.asarray of a Pillow image (one query picture) is read-only, and torch warns on those.
        if not batch.flags.writeable:
            batch = batch.copy()
        x = torch.from_numpy(batch).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def use_threads(self, n: int | None = None) -> None:
        """Run this thread's torch work on `n` intra-op threads (default: `self.threads`)."""
        torch_thread.use_threads(n or self.threads)

    def torch_pass(self, fn: Callable[[], T], threads: int | None = None) -> T:
        """Run the torch work `fn` on `threads` torch threads (default: `self.threads`). On the CPU with more than
        one, on the process's torch thread (models/torch_thread.py: one OpenMP team for the process)."""
        n = threads or self.threads
        if self.info.device == "cpu" and n > 1 and not torch_thread.on_torch_thread():
            return torch_thread.call(self.torch_pass, fn, n)
        self.use_threads(n)
        return fn()

    def embed_uint8(self, batch: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Embed resize_crop outputs (n, H, W, 3) uint8: rescale and normalize on the model's device, on `threads`
        torch threads of the CPU (default: `self.threads`). On ONNX Runtime, one pass at a time on its own pool
        whatever `threads` says (models/onnx_image.py)."""
        import torch

        if self.image_tower_onnx is not None:
            # Normalized in numpy, in place: torch ops here would give the calling thread an OpenMP team of its own
            # (models/torch_thread.py).
            x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
            x /= np.float32(255.0)
            x -= self._mean_np
            x /= self._std_np
            return self.image_tower_onnx(x)  # type: ignore[no-any-return]

        def run() -> np.ndarray:
            with self._lock, torch.inference_mode():
                x = self.pixel_values(batch, self.model.device).to(self.model.dtype)
                if self.image_tower_bf16 is not None:
                    return normalize(self.image_tower_bf16(x).numpy())
                if self._image_tower is not None:
                    return normalize(self._image_tower(x).float().numpy())
                out = self.model.get_image_features(pixel_values=x)
                return normalize(pooled(out).float().cpu().numpy())

        return self.torch_pass(run, threads)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_uint8(np.stack([self.resize_crop(im) for im in images]))

    def tokenize(self, texts: list[str], return_tensors: str = "pt") -> Any:
        """Padded to the batch's longest text only, truncated to the model's context."""
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.info.max_text_tokens,
            return_tensors=return_tensors,
        )

    @property
    def threads_under_load(self) -> int:
        """torch threads for a text pass while other searches are in flight: one core is left to the server's
        Python (HTTP, JSON, the search: one core at a time under the GIL). On 2 cores, a 2-thread pass lost its
        second thread to that work at every operator's barrier (bench/RESULTS.md, "Text tower under load").
        `text_threads_under_load` (LOUPE_MODEL__TEXT_THREADS_UNDER_LOAD) overrides it, at most `threads`."""
        if self.text_threads_under_load:
            return min(self.threads, self.text_threads_under_load)
        return max(1, self.threads - 1)

    def text_passes(self) -> tuple[int, int]:
        """Text passes that may run side by side, and the queries that must be waiting to start one beside a
        running pass (models/batching.py). On the CPU, where a pass under load runs on one thread: one per torch
        thread, each from a full batch (SIDE_BY_SIDE_BATCH queries). Otherwise one at a time: passes on more
        threads run on the torch thread one after another anyway, and a GPU serializes them. Passes side by side
        on ONNX Runtime share its session's pool: a second, one-thread session for them was tried twice on AMD
        Zen 4 and rejected (no gain that held at 1M, 150 MB more memory: bench/RESULTS.md)."""
        if self.info.device != "cpu" or self.threads_under_load != 1:
            return 1, 1
        return self.threads, SIDE_BY_SIDE_BATCH

    def _bf16_takes(self, n: int, threads: int | None) -> bool:
        """Whether a text pass of `n` queries runs on the bf16 copy: from its smallest batch (timed at start on
        all threads against the runtime in use), and under load, single-threaded, from SIDE_BY_SIDE_BATCH. ONNX
        Runtime runs on its own pool of all threads whatever the pass asks for, so beside another pass it would
        share the cores; the copy on one thread runs a batch of 4 as fast as ONNX Runtime on one thread (135
        against 132 queries/s, bench/RESULTS.md "Text tower runtimes") and side by side. Measured on an AMD box
        where the copy took batches from 8: 80 uncached searches/s at concurrency 8 with passes of 4-7 on ONNX
        Runtime, 120 with them on the copy (/tmp probe, 10k)."""
        if self.text_batch_tower is None:
            return False
        under_load = threads == 1 and self.threads > 1
        return n >= self.text_batch_min or (under_load and n >= SIDE_BY_SIDE_BATCH)

    def embed_texts(self, texts: list[str], threads: int | None = None) -> np.ndarray:
        """Text queries: only their real tokens, packed into one sequence (models/text_pooled.py: the tower is
        causally masked and pools the end-of-text token, so this equals full-context padding), at most
        PACK_QUERIES at a time, on the bf16 copy from its batch size, else on ONNX Runtime when attached, else
        torch. `threads`: torch threads (default `self.threads`; ONNX Runtime keeps its own)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        packed = self.text_batch_tower is not None or self.text_tower is not None
        if packed and len(texts) > text_pooled.PACK_QUERIES:
            step = text_pooled.PACK_QUERIES
            return np.concatenate(
                [self.embed_texts(texts[i : i + step], threads) for i in range(0, len(texts), step)]
            )
        if self._bf16_takes(len(texts), threads):
            enc = self.tokenize(texts)
            tower = self.text_batch_tower
            return self.torch_pass(lambda: tower(enc["input_ids"], enc["attention_mask"]), threads)
        if self.text_tower is not None:
            enc = self.tokenize(texts, "np")
            return self.text_tower(enc["input_ids"], enc["attention_mask"])  # type: ignore[no-any-return]
        return self.embed_texts_torch(texts, threads)

    def prefix_stats(self) -> dict[str, int] | None:
        """The text towers' kept prefixes (models/text_prefix.py), together; None where none keeps any."""
        caches = [getattr(t, "prefixes", None) for t in (self.text_tower, self.text_batch_tower)]
        kept = [c for c in caches if c is not None]
        if not kept:
            return None
        return {
            "kept": sum(len(c) for c in kept),
            "bytes": sum(c.bytes for c in kept),
            "passes": sum(c.hits for c in kept),
            "tokens_saved": sum(c.tokens_saved for c in kept),
        }

    def embed_texts_torch(self, texts: list[str], threads: int | None = None) -> np.ndarray:
        import torch

        enc = self.tokenize(texts)

        def run() -> np.ndarray:
            with self._lock, torch.inference_mode():
                out = self.model.get_text_features(**{k: v.to(self.model.device) for k, v in enc.items()})
                return normalize(pooled(out).float().cpu().numpy())

        return self.torch_pass(run, threads)


def pooled(out: Any) -> Any:
    """The projected embedding of get_image_features / get_text_features: an output object in transformers 5
    (`.pooler_output`), a bare tensor in 4.x."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def resize_geometry(
    width: int, height: int, size: int, crop: int
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The CLIP image processor's geometry for a picture of `width` x `height`: the size its shortest edge
    resized to `size` gives, and the centre crop box (left, top, right, bottom) of side `crop` in it."""
    nw, nh = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    return (nw, nh), (left, top, left + crop, top + crop)


def resize_crop(img: Image.Image, size: int, crop: int) -> np.ndarray:
    """The CLIP image processor's geometry (shortest edge to `size` with bicubic resampling, then a centre crop)
    as a uint8 HWC array: the same pixels as CLIPImageProcessorPil (a test checks the embeddings are identical)
    without its per-call overhead, and 4x less to move to a GPU than float32 (normalization runs on the device)."""
    resized, box = resize_geometry(*img.size, size, crop)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img.resize(resized, Image.Resampling.BICUBIC).crop(box), dtype=np.uint8)


def _fingerprint(model: Any) -> str:
    """Stable identity of the weights: the config plus samples of the first and last tensors."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    state = model.state_dict()
    keys = sorted(state)
    for key in keys[:4] + keys[-4:]:
        t = state[key].detach().flatten()[:4096].float().cpu().numpy()
        h.update(key.encode())
        h.update(t.tobytes())
    return h.hexdigest()[:32]


def _resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def load_clip(
    source: str, *, device: str = "auto", is_demo: bool = False, local_only: bool = False
) -> ClipModel:
    """Load a CLIP checkpoint (hub id or directory) with the Pillow image processor (no torchvision). On the torch
    thread: loading runs torch on all threads, which would give the calling thread an OpenMP team of its own
    (models/torch_thread.py)."""
    return torch_thread.call(_load_clip, source, device=device, is_demo=is_demo, local_only=local_only)


def _load_clip(source: str, *, device: str, is_demo: bool, local_only: bool) -> ClipModel:
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = _resolve_device(device)
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    model: Any = CLIPModel.from_pretrained(source, **kwargs)
    if dev.startswith("cuda"):
        model = model.to(dev, dtype=torch.float16)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    image_processor = CLIPImageProcessorPil.from_pretrained(source, **kwargs)
    config: Any = model.config
    info = ModelInfo(
        name=DEMO_MODEL_NAME if is_demo else source,
        source=str(source),
        fingerprint=_fingerprint(model),
        dim=int(config.projection_dim),
        image_size=int(config.vision_config.image_size),
        max_text_tokens=int(config.text_config.max_position_embeddings),
        is_demo=is_demo,
        device=dev,
    )
    return ClipModel(model, tokenizer, image_processor, info)


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def demo_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / "demo-tiny-clip"


def open_clip_for_settings(
    clip_model: str, *, is_default: bool, data_dir: Path, device: str, demo_fallback: bool
) -> ClipModel:
    """The configured model, or (offline, default model, nothing cached) the demo model, trained once if needed."""
    path = Path(clip_model).expanduser()
    if path.exists():
        try:
            return load_clip(str(path), device=device)
        except Exception as exc:
            raise ConfigError(
                f"LOUPE_CLIP_MODEL={clip_model!r} is a directory but not a loadable CLIP checkpoint: {exc}"
            ) from exc
    try:
        return load_clip(clip_model, device=device, local_only=True)  # already in the Hugging Face cache
    except OSError:
        pass
    online = hub_reachable()
    if online:
        try:
            return load_clip(clip_model, device=device)
        except OSError as exc:
            if not is_default:
                raise ConfigError(f"LOUPE_CLIP_MODEL={clip_model!r} cannot be loaded: {exc}") from exc
    elif not is_default:
        raise ConfigError(
            f"LOUPE_CLIP_MODEL={clip_model!r} is not cached locally and the model hub cannot be reached "
            "(offline). Point LOUPE_CLIP_MODEL at a local checkpoint directory, or go online once to fetch it."
        )
    if not demo_fallback:
        raise ConfigError(
            f"LOUPE_CLIP_MODEL={clip_model!r} cannot be loaded (offline?) and LOUPE_MODEL__DEMO_FALLBACK is off."
        )
    from loupe.models import tiny_clip

    target = demo_model_dir(data_dir)
    log.warning("=" * 78)
    log.warning("OFFLINE DEMO MODEL: %s cannot be loaded (no network, not cached).", clip_model)
    log.warning("Loupe runs on its tiny demo CLIP (coloured shapes only): search quality on real photos")
    log.warning("will be poor. Set LOUPE_CLIP_MODEL to a local checkpoint directory for real use.")
    log.warning("=" * 78)
    if not (target / "loupe_recipe.json").exists():
        log.warning("training the demo model once into %s (a few minutes on 2 CPU cores)...", target)
    tiny_clip.ensure_model(
        target,
        progress=lambda step, total, loss: log.info(
            "demo model training: step %d/%d loss %.3f", step, total, loss
        ),
    )
    return load_clip(str(target), device=device, is_demo=True)
