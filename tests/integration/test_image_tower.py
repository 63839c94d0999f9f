"""Image runtimes (models/image_runtime.py): ONNX Runtime fp32 and a bf16 copy of the image tower, used only when
asked or measured faster, within their cosine floors of torch, the same for ingest and image queries; the fp32
model stays untouched. Checked on the tiny model; bench/ingest_bench.py times the full-size ViT-B/32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loupe.ingest.validate import decode_rgb
from loupe.models import bf16_image, image_runtime, onnx_image
from loupe.models.clip import load_clip
from loupe.models.vectors import normalize
from loupe.search.query import SearchRequest
from tests.fixtures import images as mk

NEVER, ALWAYS = 1e9, 0.0


def test_auto_serves_the_faster_runtime_by_the_gains_it_needs(tiny_clip_dir: Path, tmp_path: Path):
    clip = load_clip(str(tiny_clip_dir))
    pixels = image_runtime.probe_pixels(clip._sizes[1], 5)
    ref = clip.embed_uint8(pixels)

    def attach(mode: str, try_bf16: bool = True, **gains: float) -> str:
        return image_runtime.attach(clip, mode, tmp_path, gains=gains, try_bf16=try_bf16)

    assert attach("torch") == "torch" and clip.image_tower_onnx is None and clip.image_tower_bf16 is None
    # auto decides by the measured rates: gains no candidate can reach, and ones any reaches.
    assert attach("auto", onnx=NEVER, bf16=NEVER) == "torch"
    assert clip.image_tower_onnx is None and clip.image_tower_bf16 is None
    np.testing.assert_allclose(clip.embed_uint8(pixels), ref, atol=1e-6)
    assert attach("auto", onnx=ALWAYS, bf16=NEVER) == "onnx" and clip.image_tower_bf16 is None
    assert attach("auto", onnx=NEVER, bf16=ALWAYS) == "bf16" and clip.image_tower_onnx is None
    assert attach("auto", onnx=NEVER, bf16=ALWAYS, try_bf16=False) == "torch"
    assert attach("auto", onnx=ALWAYS, bf16=ALWAYS) == "bf16"  # bf16 is compared with the faster fp32 runtime
    assert attach("onnx") == "onnx" and attach("bf16") == "bf16"
    # The ONNX export is made once per model fingerprint, beside the text tower's.
    assert [p.name for p in tmp_path.glob("*.onnx")] == [f"{onnx_image.PREFIX}-{clip.info.fingerprint}.onnx"]
    # The fp32 model, which fine-tuning trains and the checks compare against, is untouched.
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())


def test_onnx_image_tower_gives_torch_vectors(tiny_clip_dir: Path, tmp_path: Path):
    clip = load_clip(str(tiny_clip_dir))
    assert image_runtime.attach(clip, "onnx", tmp_path) == "onnx"
    tower = clip.image_tower_onnx
    for n in (1, 3, 9):  # the batch is dynamic
        pixels = image_runtime.probe_pixels(clip._sizes[1], n)
        got = clip.embed_uint8(pixels, 1)
        clip.image_tower_onnx = None
        ref = clip.embed_uint8(pixels)
        clip.image_tower_onnx = tower
        assert got.shape == (n, clip.dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert np.sum(got * ref, axis=1).min() >= image_runtime.FLOORS["onnx"]


def test_a_broken_onnx_export_is_not_used_and_is_rebuilt(tiny_clip_dir: Path, tmp_path: Path, caplog):
    clip = load_clip(str(tiny_clip_dir))
    path = tmp_path / f"{onnx_image.PREFIX}-{clip.info.fingerprint}.onnx"
    path.write_bytes(b"not an onnx file")  # a half-written file from another version, say
    assert image_runtime.attach(clip, "onnx", tmp_path) == "torch" and clip.image_tower_onnx is None
    assert "could not be built" in caplog.text and not path.exists()
    assert image_runtime.attach(clip, "onnx", tmp_path) == "onnx" and path.exists()


def test_bf16_image_tower_stays_within_its_floor_and_really_runs(tiny_clip_dir: Path, tmp_path: Path):
    clip = load_clip(str(tiny_clip_dir))
    pixels = image_runtime.probe_pixels(clip._sizes[1], 5)
    ref = clip.embed_uint8(pixels)
    assert image_runtime.attach(clip, "bf16", tmp_path) == "bf16"
    got = clip.embed_uint8(pixels)
    assert np.sum(ref * got, axis=1).min() >= image_runtime.FLOORS["bf16"]
    assert np.abs(got - ref).max() > 1e-6  # bf16 rounding: the batch really ran on the copy
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One thread (an ingest model worker) or all: the same copy.
    np.testing.assert_allclose(clip.embed_uint8(pixels, 1), got, atol=2e-3)


def test_bf16_image_tower_runs_as_a_trace_that_matches_eager_mode_at_other_batch_sizes(tiny_clip_dir: Path):
    clip = load_clip(str(tiny_clip_dir))
    tower = bf16_image.Bf16ImageTower(clip.model, clip._sizes[1])
    assert tower.traced is not None
    for n in (1, 4, 7):
        x = clip.pixel_values(image_runtime.probe_pixels(clip._sizes[1], n))
        with torch.inference_mode():
            eager, traced = tower.tower(x), tower(x)
        assert traced.dtype == torch.float32 and traced.shape == (n, clip.dim)
        cos = np.sum(normalize(eager.numpy()) * normalize(traced.numpy()), axis=1)
        assert cos.min() >= bf16_image.TRACE_FLOOR


@pytest.mark.parametrize("runtime", ["onnx", "bf16"])
def test_a_library_ingested_on_another_runtime_finds_its_pictures(
    make_settings, runtime_factory, tmp_path, runtime
):
    """Ingest and image queries both go through the runtime: a picture's stored vector is within the runtime's
    floor of its torch vector, health names the runtime, and searching by an uploaded picture finds it first."""
    shapes = mk.shape_set(per_class=1, seed=7)[:8]
    vectors = {}
    for mode in ("torch", runtime):
        rt = runtime_factory(make_settings(data_dir=tmp_path / mode, model={"image_runtime": mode}))
        assert rt.health()["model"]["image_runtime"] == mode
        ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
        assert rt.ingest.drain() == len(shapes)
        vectors[mode] = np.stack([rt.mirror.vector(i) for i in ids])
        if mode == runtime:  # an image query (POST /api/search/image embeds through the same call)
            picture = decode_rgb(shapes[3].data, max_pixels=10**8)
            query = rt.clip.embed_images([picture])[0]
            req = SearchRequest.model_validate({"query": [{"vector": query.tolist()}], "limit": 3})
            assert rt.search.search(req).hits[0].id == ids[3]
    cos = np.sum(vectors["torch"] * vectors[runtime], axis=1)
    assert cos.min() >= image_runtime.FLOORS[runtime]
    if runtime == "bf16":
        assert np.abs(vectors["torch"] - vectors[runtime]).max() > 1e-6


def test_ingest_lanes_on_the_compiled_bf16_copy(make_settings, runtime_factory, tmp_path):
    """LOUPE_MODEL__IMAGE_COMPILE=on: after start, on a thread of its own, ingest's single-threaded lanes get a
    torch.compile'd build of the bf16 copy. It serves only their passes (the lanes' batch size, one thread), within
    its floor of the trace's vectors; every other pass stays on the trace, bit for bit; health names it; a library
    ingested on it finds its pictures."""
    from loupe.models import compiled_image

    settings = make_settings(
        model={"image_runtime": "bf16", "image_compile": "on", "torch_threads": 2}, ingest={"batch_size": 8}
    )
    rt = runtime_factory(settings)
    assert rt.ingest.lane_batch() == 4 and rt.lanes_built is not None
    rt.lanes_built.join(timeout=600)
    assert rt.clip.image_lanes == "compiled" and rt.health()["model"]["image_lanes"] == "compiled"
    tower = rt.clip.image_tower_bf16
    for n, threads in ((4, 1), (3, 1), (4, 2)):
        x = rt.clip.pixel_values(image_runtime.probe_pixels(rt.clip._sizes[1], n), "cpu")
        with torch.inference_mode():
            trace = tower.traced_or_eager(x).numpy()
        got = rt.clip.embed_uint8(image_runtime.probe_pixels(rt.clip._sizes[1], n), threads)
        if (n, threads) == (4, 1):
            assert np.abs(got - normalize(trace)).max() > 1e-6  # the compiled build served it
            assert np.sum(got * normalize(trace), axis=1).min() >= compiled_image.FLOOR
        else:
            assert np.array_equal(got, normalize(trace))
    shapes = mk.shape_set(per_class=1, seed=7)[:8]
    ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
    assert rt.ingest.drain() == len(shapes)
    picture = decode_rgb(shapes[5].data, max_pixels=10**8)
    query = rt.clip.embed_images([picture])[0]
    req = SearchRequest.model_validate({"query": [{"vector": query.tolist()}], "limit": 3})
    assert rt.search.search(req).hits[0].id == ids[5]


def test_auto_compiles_the_lanes_for_a_backlog_and_remembers_its_verdict(
    make_settings, runtime_factory, monkeypatch, tmp_path
):
    """With `auto` nothing is compiled at start, nor for a backlog under COMPILE_BACKLOG; a run of the lanes that
    starts with that many pictures pending starts the build, which is timed against the trace and its verdict kept
    for the next start (which builds only what was chosen, untimed). Either verdict can come out on the tiny model:
    what serves must match what health says."""
    from loupe.models import compiled_image

    monkeypatch.setattr(compiled_image, "COMPILE_BACKLOG", 6)
    settings = make_settings(
        model={"image_runtime": "bf16", "image_compile": "auto", "torch_threads": 2}, ingest={"batch_size": 8}
    )
    described = []
    for start in range(2):
        # Other pictures at each start: the same ones would be duplicates.
        shapes = mk.shape_set(per_class=1, seed=7 + start)[:12]
        rt = runtime_factory(settings)
        rt.ingest.upload([(s.name, s.data) for s in shapes[:4]])
        assert rt.ingest.drain() == 4 and rt.lanes_built is None  # 4 pending: under 6
        rt.ingest.upload([(s.name, s.data) for s in shapes[4:]])
        assert rt.ingest.drain() == 8 and rt.lanes_built is not None
        rt.lanes_built.join(timeout=600)
        lanes = rt.clip.image_lanes
        assert lanes in {"compiled", "trace"}
        assert (rt.clip.image_tower_bf16.lanes is not None) == (lanes == "compiled")
        described.append(rt.health()["model"]["runtime_choices"]["image_lanes"])
        rt.close()
    assert described[0].startswith("timed at start")
    if described[0] == "timed at start":  # remembered (a quiet machine): the second start reused it
        assert described[1].startswith("remembered from")


def test_without_a_cpp_compiler_the_lanes_stay_on_the_trace(
    make_settings, runtime_factory, monkeypatch, caplog, tmp_path
):
    """Inductor needs a C++ compiler: where there is none, the build says so in the log and the trace serves."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    rt = runtime_factory(
        make_settings(
            model={"image_runtime": "bf16", "image_compile": "on", "torch_threads": 2},
            ingest={"batch_size": 8},
        )
    )
    assert rt.lanes_built is not None
    rt.lanes_built.join(timeout=600)
    assert rt.clip.image_lanes == "trace" and rt.clip.image_tower_bf16.lanes is None
    assert "no C++ compiler: " in caplog.text and "no-such-c++ is not on PATH" in caplog.text
    shapes = mk.shape_set(per_class=1, seed=7)[:4]
    rt.ingest.upload([(s.name, s.data) for s in shapes])
    assert rt.ingest.drain() == len(shapes)
