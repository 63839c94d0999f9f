"""Vector helpers: normalization lives in exactly this one function."""

from __future__ import annotations

import numpy as np


def normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L2-normalize rows (or a single vector) to float32."""
    arr = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return (arr / np.maximum(norms, eps)).astype(np.float32, copy=False)
