"""The tiny CLIP recipe trains to finite losses inside a Loupe process (after the OCR channel has run)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import io, math
from pathlib import Path
import tempfile
import loupe.runtime  # noqa: F401  (everything a serving process imports: faiss, qdrant, tesseract)
from PIL import Image
from loupe.ocr.tesseract import read_text
from loupe.models import tiny_clip
read_text(Image.new("RGB", (64, 64), "white"), presence_threshold=None)
losses = []
tiny_clip.train(tiny_clip.Recipe(steps=55), Path(tempfile.mkdtemp()) / "m", progress=lambda s, n, l: losses.append(l))
assert all(math.isfinite(x) for x in losses), losses
assert losses[-1] < losses[0], losses
print("ok", losses)
"""


def test_training_stays_finite_in_a_serving_process():
    # Once, OMP_THREAD_LIMIT=1 set process-wide for Tesseract made torch's backward pass return NaN from step 2:
    # the demo model trained by `loupe serve` was garbage. The limit now goes to the Tesseract subprocess only.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
