"""Domain fine-tuning on the tiny CLIP: it learns a colour word it never saw, the image phase helps image->image
retrieval without hurting text->image on what it knew, a bad run (shuffled captions) is refused and changes
nothing, and the admin API runs it as a job."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient
from PIL import Image

from loupe.app import create_app
from loupe.config import FinetuneSettings, Settings
from loupe.models import tiny_clip
from loupe.models.finetune import Pair, finetune, library_pairs, split_pairs
from loupe.runtime import Runtime
from loupe.search.evaluate import metrics_at_k
from loupe.search.query import SearchRequest, Term

NEW = {"magenta": (230, 40, 200)}  # a colour the tiny model never saw
SETTINGS = FinetuneSettings(steps=200, lr=1e-3)


def render(colour: str, shape: str, rng: random.Random) -> Image.Image:
    saved = dict(tiny_clip.COLOURS)
    tiny_clip.COLOURS.update(NEW)
    try:
        return tiny_clip.render_shape(colour, shape, rng, 112)
    finally:
        tiny_clip.COLOURS.clear()
        tiny_clip.COLOURS.update(saved)


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


OLD_CLASSES = tiny_clip.all_classes()
NEW_CLASSES = [("magenta", "circle"), ("magenta", "square")]


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[Runtime]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("ft"),
        clip_model=str(tiny_clip_dir),
        ocr={"enabled": False},  # type: ignore[arg-type]
        model={"image_runtime": "torch"},  # type: ignore[arg-type]
    )
    runtime = Runtime.open(settings)
    rng = random.Random(0)
    for c, s in OLD_CLASSES + NEW_CLASSES:
        files = [(f"{c}-{s}-{k}.png", png(render(c, s, rng))) for k in range(10)]
        runtime.ingest.upload(files, albums=[f"{c} {s}"])
    runtime.ingest.drain()
    yield runtime
    runtime.close()


def fresh_quality(clip, seed: int = 123, per_class: int = 6) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """On renders never seen in training: image->image P@5 over all classes; text->image mAP@10 on the old ones."""
    rng = random.Random(seed)
    classes = OLD_CLASSES + NEW_CLASSES
    labels = [k for k in range(len(classes)) for _ in range(per_class)]
    imgs = clip.embed_images([render(*classes[k], rng) for k in labels])
    labels_a = np.asarray(labels)
    sims = imgs @ imgs.T
    np.fill_diagonal(sims, -np.inf)
    i2i = np.mean([np.mean(labels_a[np.argsort(-sims[n])[:5]] == labels_a[n]) for n in range(len(labels))])
    old = [k for k in range(len(OLD_CLASSES))]
    texts = clip.embed_texts([f"a {c} {s}" for c, s in OLD_CLASSES])
    t2i = np.mean(
        [
            metrics_at_k(
                np.argsort(-(imgs @ texts[k]))[:10].tolist(), set(np.nonzero(labels_a == k)[0].tolist()), 10
            )["map"]
            for k in old
        ]
    )
    return {"i2i_p5": float(i2i), "t2i_map": float(t2i)}


def top_albums(rt: Runtime, text: str, k: int = 5) -> list[str]:
    hits = rt.search.search(SearchRequest(query=[Term(text=text)], limit=k)).hits
    albums = rt.repo.albums_for([h.id for h in hits])
    return [albums[h.id][0] for h in hits]


def test_a_bad_run_with_shuffled_captions_is_refused_and_changes_nothing(rt: Runtime, tmp_path: Path):
    train, heldout = split_pairs(library_pairs(rt), 0.2)
    captions = [p.caption for p in train]
    random.Random(1).shuffle(captions)
    shuffled = [Pair(p.key, c, p.pseudo) for p, c in zip(train, captions, strict=True)]
    version = rt.model_version.id
    report = finetune(rt, shuffled, heldout, SETTINGS, tmp_path / "out")
    assert not report.accepted, report
    assert "fell" in report.reason and "over the 5% allowed" in report.reason
    assert report.output is None and not (tmp_path / "out").exists()
    assert rt.model_version.id == version


def test_learns_a_new_colour_and_the_image_phase_helps_image_search(rt: Runtime):
    assert not any(a.startswith("magenta circle") for a in top_albums(rt, "a magenta circle"))
    before = fresh_quality(rt.clip)
    version = rt.model_version.id
    report = rt.finetuner.run(SETTINGS, None, activate=True)
    assert report.accepted, report.reason
    assert rt.model_version.id != version and rt.finetuner.status.state == "done"
    assert report.samples_per_s > 0 and report.heldout_queries["text_to_image"] > 0
    found = top_albums(rt, "a magenta circle")
    assert found.count("magenta circle") >= 3, found
    after = fresh_quality(rt.clip)
    assert after["i2i_p5"] > before["i2i_p5"], (before, after)
    assert after["t2i_map"] >= 0.95 * before["t2i_map"], (before, after)


def test_the_admin_api_runs_it_as_a_job_and_checks_its_input(rt: Runtime):
    with TestClient(create_app(rt.settings, runtime=rt), timeout=120) as client:
        bad = client.post("/api/finetune", json={"settings": {"steps": 0}})
        assert bad.status_code == 400 and "steps" in bad.json()["error"]["message"]
        before = rt.finetuner.status
        typo = client.post("/api/finetune", json={"settings": {"stepz": 5}})
        assert typo.status_code == 400 and "settings.stepz" in typo.json()["error"]["message"]
        assert rt.finetuner.status is before  # nothing was started
        missing = client.post("/api/finetune", json={"pairs": "/no/such/pairs.jsonl"})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "bad_pairs"
        res = client.post("/api/finetune", json={"settings": {"steps": 5}})
        assert res.status_code == 202, res.text
        st = rt.finetuner.wait(300).as_dict()
        assert st["state"] in ("done", "refused") and st["report"]["steps"] == 10
        assert client.get("/api/finetune").json()["state"] == st["state"]
        assert client.get("/api/health").json()["model"]["finetune"]["state"] == st["state"]
