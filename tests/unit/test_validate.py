"""Upload checks and the worker's decode: every awkward file gets a clear code, good ones decode right."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from loupe.errors import InvalidImage, LoupeError, TooLarge, UnsupportedFormat
from loupe.ingest.service import model_input
from loupe.ingest.validate import (
    clean_name,
    decode_rgb,
    inspect_upload,
    make_thumbnail,
    thumbnail_image,
    thumbnail_size,
)
from loupe.models.clip import resize_crop
from tests.fixtures import images as mk

LIMITS = {"max_bytes": 10 * 1024 * 1024, "max_pixels": 50_000_000}


def code_of(data: bytes, **limits: int) -> str:
    with pytest.raises(LoupeError) as info:
        inspect_upload(data, **{**LIMITS, **limits})
    return info.value.code


def test_empty_file_is_rejected_as_empty():
    assert code_of(b"") == "empty_file"


def test_text_file_is_not_an_image():
    assert code_of(b"hello, I am not a picture at all") == "not_an_image"


def test_file_over_the_size_limit_is_rejected_before_decoding():
    assert code_of(mk.jpeg(), max_bytes=100) == "file_too_large"


def test_decompression_bomb_is_rejected_by_pixel_count():
    with pytest.raises(TooLarge) as info:
        inspect_upload(mk.png_bomb(20000, 20000), **LIMITS)
    assert info.value.code == "too_many_pixels"
    assert "pixels" in info.value.message


def test_unsupported_format_is_named():
    with pytest.raises(UnsupportedFormat) as info:
        inspect_upload(mk.ppm(), **LIMITS)
    assert "PPM" in info.value.message


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_png_is_corrupt(keep: float):
    data = mk.noise_png(1, 96)
    with pytest.raises(InvalidImage) as info:
        inspect_upload(mk.truncated(data, keep), **LIMITS)
    assert info.value.code in {"corrupt_image", "not_an_image"}


def test_truncated_jpeg_is_caught_by_the_reduced_decode():
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(3).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    data = mk.encode(Image.fromarray(arr), "JPEG", quality=95)
    with pytest.raises(InvalidImage):
        inspect_upload(mk.truncated(data, 0.5), **LIMITS)


def test_good_formats_report_their_facts():
    facts = inspect_upload(mk.jpeg(64, 48), **LIMITS)
    assert (facts.format, facts.mime, facts.width, facts.height) == ("JPEG", "image/jpeg", 64, 48)
    assert inspect_upload(mk.png(10, 20), **LIMITS).format == "PNG"
    assert inspect_upload(mk.encode(mk.Image.new("RGB", (9, 9)), "WEBP"), **LIMITS).format == "WEBP"


def test_exif_rotation_swaps_reported_dimensions_and_is_applied_on_decode():
    data = mk.exif_rotated_jpeg(80, 40, orientation=6)
    facts = inspect_upload(data, **LIMITS)
    assert (facts.width, facts.height) == (40, 80)
    assert decode_rgb(data, max_pixels=LIMITS["max_pixels"]).size == (40, 80)


def test_animated_gif_counts_frames_and_decodes_the_first():
    data = mk.animated_gif(3)
    assert inspect_upload(data, **LIMITS).frames == 3
    img = decode_rgb(data, max_pixels=LIMITS["max_pixels"])
    assert img.mode == "RGB" and img.size == (40, 40)
    assert img.getpixel((5, 5))[2] > 150  # first frame is blue-ish (0, 20, 200)


@pytest.mark.parametrize(
    "maker",
    [mk.cmyk_jpeg, mk.png16, mk.rgba_png, mk.palette_png_with_transparency],
    ids=["cmyk", "16-bit", "alpha", "palette-transparent"],
)
def test_every_mode_decodes_to_rgb(maker):
    data = maker()
    inspect_upload(data, **LIMITS)
    img = decode_rgb(data, max_pixels=LIMITS["max_pixels"])
    assert img.mode == "RGB"
    for fmt, name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        thumb = Image.open(io.BytesIO(make_thumbnail(img, 64, 80, fmt)))
        assert (thumb.format, thumb.mode) == (name, "RGB") and max(thumb.size) <= 64


def test_sixteen_bit_greyscale_keeps_its_gradient():
    img = decode_rgb(mk.png16(), max_pixels=LIMITS["max_pixels"])
    left, right = img.getpixel((0, 16))[0], img.getpixel((63, 16))[0]
    assert left < 20 and right > 235  # scaled, not clipped to white


def test_alpha_is_composited_on_white():
    img = decode_rgb(mk.rgba_png(), max_pixels=LIMITS["max_pixels"])
    r, g, _b = img.getpixel((10, 10))
    assert r > 250 and 120 < g < 135  # half-transparent red over white


def test_jpeg_draft_decode_keeps_the_shorter_side_at_least_min_side():
    data = mk.jpeg(2000, 1000)
    img = decode_rgb(data, max_pixels=LIMITS["max_pixels"], min_side=200)
    assert min(img.size) >= 200 and img.size[0] < 2000


def pillows_thumbnail(img: Image.Image, max_px: int) -> Image.Image:
    thumb = img.copy()
    thumb.thumbnail((max_px, max_px), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return thumb


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with per-pixel noise: edges and gradients for a resampling filter to get wrong."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (max(1, height // 12), max(1, width // 12), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8))


def test_thumbnails_have_pillows_size_for_every_shape():
    rng = np.random.default_rng(11)
    shapes = [(1, 1), (1, 5000), (5000, 1), (384, 384), (385, 384), (384, 1000), (3, 2), (1152, 864)]
    shapes += [(int(rng.integers(1, 4000)), int(rng.integers(1, 4000))) for _ in range(300)]
    for width, height in shapes:
        for max_px in (16, 64, 384, 1000):
            expected = pillows_thumbnail(Image.new("1", (width, height)), max_px).size
            assert (thumbnail_size((width, height), max_px) or (width, height)) == expected, (
                width,
                height,
                max_px,
            )


@pytest.mark.parametrize(
    ("width", "height"),
    [(576, 432), (433, 577), (1000, 411), (1535, 1150), (400, 390), (385, 120), (912, 639)],
)
def test_rgb_thumbnails_are_within_one_level_of_pillows(width: int, height: int):
    """Where a picture is under 4x its thumbnail (a draft-decoded JPEG), torch resamples it: Pillow's size and
    filter, each pixel within 1/255 of Pillow's, nearly all of them equal."""
    img = photo_like(width, height, seed=width)
    ours, pillows = thumbnail_image(img, 384), pillows_thumbnail(img, 384)
    assert (ours.mode, ours.size) == ("RGB", pillows.size)
    diff = np.abs(np.asarray(ours, np.int16) - np.asarray(pillows, np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.05


@pytest.mark.parametrize(
    "img",
    [
        photo_like(2000, 1500, seed=1),  # 5.2x the thumbnail: Pillow box-reduces first
        photo_like(3000, 200, seed=2),  # a panorama
        photo_like(700, 500, seed=3).convert("L"),
        photo_like(700, 500, seed=4).convert("RGBA"),
    ],
    ids=["large", "panorama", "greyscale", "rgba"],
)
def test_thumbnails_that_pillow_reduces_first_or_not_rgb_are_pillows_own(img: Image.Image):
    ours, pillows = thumbnail_image(img, 384), pillows_thumbnail(img, 384)
    assert ours.mode == pillows.mode and ours.tobytes() == pillows.tobytes()


@pytest.mark.parametrize(
    ("width", "height"), [(576, 432), (432, 576), (1000, 700), (1535, 1150), (700, 1000)]
)
def test_a_model_input_from_a_resampled_thumbnail_is_within_two_levels_of_pillows(width: int, height: int):
    img = photo_like(width, height, seed=height)
    thumb = thumbnail_image(img, 384)
    ours, pillows = model_input(img, thumb, 224, 224), resize_crop(thumb, 224, 224)
    assert ours.shape == pillows.shape == (224, 224, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    diff = np.abs(ours.astype(np.int16) - pillows.astype(np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.02


@pytest.mark.parametrize(("width", "height"), [(300, 240), (384, 250), (112, 112), (200, 150), (700, 1400)])
def test_a_picture_no_larger_than_its_thumbnail_gets_clips_processor_pixels_exactly(width: int, height: int):
    """Pictures that fit their thumbnail, and those whose thumbnail is narrower than the model's input (700x1400:
    192x384), are resized from the decode as CLIPImageProcessorPil resizes them."""
    img = photo_like(width, height, seed=width)
    thumb = thumbnail_image(img, 384)
    assert np.array_equal(model_input(img, thumb, 224, 224), resize_crop(img, 224, 224))


def test_a_thumbnail_never_enlarges_and_is_a_copy():
    img = photo_like(300, 200, seed=5)
    thumb = thumbnail_image(img, 384)
    assert thumb is not img and thumb.tobytes() == img.tobytes()


def test_thumbnails_made_side_by_side_start_no_thread_teams():
    """Decode threads resample side by side: torch must run each on its calling thread, not start an OpenMP team
    per thread (threads that would spin against the model's own; models/torch_thread.py keeps one team)."""
    img = photo_like(576, 432, seed=6)
    expected = thumbnail_image(img, 384).tobytes()  # torch's own pools, if any, exist before the count
    workers = 4
    before = len(os.listdir("/proc/self/task"))
    all_done = threading.Barrier(workers + 1)
    counted = threading.Barrier(workers + 1)
    made: list[bytes] = []

    def work() -> None:
        made.append(thumbnail_image(img, 384).tobytes())
        all_done.wait()  # every worker alive, each after its thumbnail
        counted.wait()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    all_done.wait()
    during = len(os.listdir("/proc/self/task"))
    counted.wait()
    for t in threads:
        t.join()
    assert made == [expected] * workers
    assert during <= before + workers


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system32\\x.png", "x.png"),
        ("a\x00b\x1f.png", "ab.png"),
        (".hidden.png", "hidden.png"),
        ("x" * 400 + ".png", "x" * 255),
        (None, ""),
    ],
)
def test_hostile_file_names_are_reduced_to_a_display_name(raw, clean):
    assert clean_name(raw) == clean


@pytest.mark.parametrize("seed", range(12))
def test_bit_flipped_files_never_escape_as_unexpected_exceptions(seed: int):
    for data in (mk.jpeg(120, 90), mk.noise_png(seed, 48), mk.animated_gif(2)):
        broken = mk.bit_flipped(data, seed)
        try:
            inspect_upload(broken, **LIMITS)
            decode_rgb(broken, max_pixels=LIMITS["max_pixels"])
        except LoupeError:
            pass  # a clear code is the point; any other exception type fails the test


def test_a_picture_prepares_in_a_worker_process_as_in_the_server():
    """prepare_picture needs no model, so a fresh (spawned) worker process prepares a picture exactly as ingest
    does in process: the same model input, thumbnail and metadata; damaged data fails there with its code."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from loupe.config import IngestSettings
    from loupe.ingest.service import prepare_picture
    from loupe.ingest.validate import DecodeError

    big = Image.open(io.BytesIO(mk.shape_set(per_class=1, seed=3)[2].data)).convert("RGB")
    buf = io.BytesIO()
    big.resize((1152, 864), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    data, settings = buf.getvalue(), IngestSettings()
    here = prepare_picture(data, settings, 288, 224, 224)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = pool.submit(prepare_picture, data, settings, 288, 224, 224).result()
        with pytest.raises(DecodeError) as err:
            pool.submit(prepare_picture, data[: len(data) // 3], settings, 288, 224, 224).result()
    assert err.value.code == DecodeError.code
    assert here.pixels.shape == (224, 224, 3) and here.pixels.dtype == np.uint8
    np.testing.assert_array_equal(here.pixels, there.pixels)
    assert here.thumbnail == there.thumbnail and here.meta == there.meta and "phash" in here.meta
    thumb = Image.open(io.BytesIO(here.thumbnail))
    assert thumb.format == "JPEG" and max(thumb.size) == settings.thumbnail_px
