"""Image vectors from a bf16 copy of the image tower (models/bf16_image.py): used only when asked or measured
faster, within the cosine floor of fp32, the same for ingest and image queries, traced with eager mode's vectors;
the fp32 model stays untouched. Checked on the tiny model; bench/ingest_bench.py times the full-size ViT-B/32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loupe.ingest.validate import decode_rgb
from loupe.models import bf16_image
from loupe.models.clip import load_clip
from loupe.models.vectors import normalize
from loupe.search.query import SearchRequest
from tests.fixtures import images as mk


def test_bf16_image_tower_serves_only_when_asked_or_faster(tiny_clip_dir: Path):
    clip = load_clip(str(tiny_clip_dir))
    pixels = bf16_image.probe_pixels(clip._sizes[1], 5)
    ref = clip.embed_uint8(pixels)

    assert bf16_image.attach(clip, "off") == "fp32" and clip.image_tower_bf16 is None
    # auto decides by the measured speed-up: one no tower can reach, and one any reaches.
    assert bf16_image.attach(clip, "auto", gain_needed=1e9) == "fp32" and clip.image_tower_bf16 is None
    np.testing.assert_allclose(clip.embed_uint8(pixels), ref, atol=1e-6)
    assert bf16_image.attach(clip, "auto", gain_needed=0.0) == "bf16" and clip.image_tower_bf16 is not None
    assert bf16_image.attach(clip, "on") == "bf16"

    got = clip.embed_uint8(pixels)
    assert np.sum(ref * got, axis=1).min() >= bf16_image.COSINE_FLOOR
    assert np.abs(got - ref).max() > 1e-6  # bf16 rounding: the batch really ran on the copy
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One thread (an ingest model worker) or all: the same copy.
    np.testing.assert_allclose(clip.embed_uint8(pixels, 1), got, atol=2e-3)
    # The fp32 model, which fine-tuning trains and the check compares against, is untouched.
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())


def test_bf16_image_tower_runs_as_a_trace_that_matches_eager_mode_at_other_batch_sizes(tiny_clip_dir: Path):
    clip = load_clip(str(tiny_clip_dir))
    tower = bf16_image.Bf16ImageTower(clip.model, clip._sizes[1])
    assert tower.traced is not None
    for n in (1, 4, 7):
        x = clip.pixel_values(bf16_image.probe_pixels(clip._sizes[1], n))
        with torch.inference_mode():
            eager, traced = tower.tower(x), tower(x)
        assert traced.dtype == torch.float32 and traced.shape == (n, clip.dim)
        cos = np.sum(normalize(eager.numpy()) * normalize(traced.numpy()), axis=1)
        assert cos.min() >= bf16_image.TRACE_FLOOR


def test_a_library_ingested_on_the_bf16_tower_finds_its_pictures(make_settings, runtime_factory, tmp_path):
    """Ingest and image queries both go through the copy: a picture's stored vector is within the cosine floor of
    its fp32 vector, health names the runtime, and searching by an uploaded picture finds that picture first."""
    shapes = mk.shape_set(per_class=1, seed=7)[:8]
    vectors = {}
    for mode in ("off", "on"):
        rt = runtime_factory(make_settings(data_dir=tmp_path / mode, model={"image_bf16": mode}))
        assert rt.health()["model"]["image_runtime"] == ("bf16" if mode == "on" else "fp32")
        ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
        assert rt.ingest.drain() == len(shapes)
        vectors[mode] = np.stack([rt.mirror.vector(i) for i in ids])
        if mode == "on":  # an image query (POST /api/search/image embeds through the same call)
            picture = decode_rgb(shapes[3].data, max_pixels=10**8)
            query = rt.clip.embed_images([picture])[0]
            req = SearchRequest.model_validate({"query": [{"vector": query.tolist()}], "limit": 3})
            assert rt.search.search(req).hits[0].id == ids[3]
    cos = np.sum(vectors["off"] * vectors["on"], axis=1)
    assert cos.min() >= bf16_image.COSINE_FLOOR and np.abs(vectors["off"] - vectors["on"]).max() > 1e-6
