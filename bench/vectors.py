"""Vector sets for the scale benchmarks, cached under ~/.cache/loupe/bench.

* synthetic: isotropic Gaussian clusters on the unit sphere (512-d), the worst case for product quantization;
* minilm: all-MiniLM-L6-v2 embeddings (384-d, the OCR channel's real encoder) of the descriptions of every package
  in this machine's Debian archive index (`apt-cache dumpavail`, about 64k): a real encoder on a real corpus.
Queries are held out: draws from the same clusters, or descriptions kept out of the corpus.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "loupe" / "bench"


def synthetic(
    n: int, d: int = 512, clusters: int = 0, seed: int = 0, queries: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, queries): n unit vectors around `clusters` random centres (default ~sqrt(n)), and held-out queries."""
    path = CACHE / f"synthetic-{n}-{d}-{seed}.npy"
    clusters = clusters or max(16, int(np.sqrt(n)))
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        out = np.empty((m, d), np.float32)
        for start in range(0, m, 100_000):
            k = min(100_000, m - start)
            noise = r.standard_normal((k, d)).astype(np.float32) / np.sqrt(
                d
            )  # |noise| ~ 1: cosine ~0.7 to the centre
            x = centres[r.integers(0, clusters, k)] + noise
            out[start : start + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    if path.exists():
        corpus = np.load(path, mmap_mode="r")
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        corpus = draw(n, rng)
        np.save(path, corpus)
    return np.asarray(corpus), draw(queries, np.random.default_rng(seed + 1))


def debian_packages() -> list[tuple[str, str, str]]:
    """(package, source package, description) of every binary package apt knows, in apt's order."""
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    packages: list[tuple[str, str, str]] = []
    for record in out.split("\n\n"):
        lines = record.splitlines()
        fields = {
            k: v.strip() for k, _, v in (line.partition(":") for line in lines if not line.startswith(" "))
        }
        desc: list[str] = []
        for i, line in enumerate(lines):
            if line.startswith("Description:"):
                desc.append(line.split(":", 1)[1].strip())
                for cont in lines[i + 1 :]:
                    if not cont.startswith(" "):
                        break
                    desc.append(cont.strip(" ."))
                break
        text = " ".join(w for w in desc if w)
        if text and fields.get("Package"):
            source = fields.get("Source", fields["Package"]).split(" ")[0]
            packages.append((fields["Package"], source, text))
    return packages


def debian_descriptions() -> list[str]:
    """The distinct package descriptions, first seen first (the rows of the MiniLM cache)."""
    return list(dict.fromkeys(text for _, _, text in debian_packages()))


def minilm(queries: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, queries) of MiniLM embeddings of Debian package descriptions (encoded once, cached)."""
    path = CACHE / "minilm-debian.npy"
    if not path.exists():
        from loupe.models.text_encoder import SentenceEncoder

        texts = debian_descriptions()
        enc = SentenceEncoder(max_tokens=128)
        t0 = time.perf_counter()
        vecs = enc.embed(texts)
        print(f"encoded {len(texts)} descriptions in {time.perf_counter() - t0:.0f} s")
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs.astype(np.float32))
    vecs = np.load(path)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(vecs))
    return vecs[order[queries:]], vecs[order[:queries]]
