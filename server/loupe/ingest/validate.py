"""Image checks at the edge (cheap, before a byte is stored) and the one full decode the worker does."""

from __future__ import annotations

import io
import math
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from loupe.errors import InvalidImage, LoupeError, TooLarge, UnsupportedFormat

# Formats Loupe stores and searches; anything else Pillow happens to open is refused by name.
SUPPORTED = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
ImageFile.LOAD_TRUNCATED_IMAGES = False
# A JPEG's last two bytes: its end-of-image marker (see _inspect).
JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class ImageFacts:
    format: str
    mime: str
    width: int
    height: int
    frames: int


class DecodeError(InvalidImage):
    """The bytes passed the upload checks but the full decode failed (recorded on the image as `failed`)."""

    code = "decode_error"


def clean_name(name: str | None) -> str:
    """A display name only: never used as a path. Basename, no control characters, at most 255 characters."""
    if not name:
        return ""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().lstrip(".")
    return name[:255]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit below decides; Pillow's warning threshold is lower than LOUPE_INGEST__MAX_PIXELS may be.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise TooLarge("image has too many pixels (decompression bomb?)", code="too_many_pixels") from exc
        except UnidentifiedImageError as exc:
            raise InvalidImage("the file is not an image Loupe can read", code="not_an_image") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidImage("the image header is corrupt", code="corrupt_image") from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InvalidImage("the image has no pixels", code="corrupt_image")
    if w * h > max_pixels:
        raise TooLarge(
            f"the image has {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (LOUPE_INGEST__MAX_PIXELS)",
            code="too_many_pixels",
        )
    return img


def inspect_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageFacts:
    """Type sniffing, Pillow open/verify, pixel limit, and a cheap reduced decode where one exists.

    Pillow raises many exception types on damaged data (IndexError, struct.error, ...): any of them means the
    file is corrupt, never a server error."""
    try:
        return _inspect(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except LoupeError:
        raise
    except Exception as exc:
        raise InvalidImage(f"the image data is corrupt ({type(exc).__name__})", code="corrupt_image") from exc


def _inspect(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageFacts:
    if not data:
        raise InvalidImage("the file is empty", code="empty_file")
    if len(data) > max_bytes:
        raise TooLarge(
            f"the file is {len(data):,} bytes, over the limit of {max_bytes:,} (LOUPE_INGEST__MAX_FILE_MB)",
            code="file_too_large",
        )
    img = _open(data, max_pixels)
    fmt = (img.format or "").upper()
    if fmt == "MPO":  # multi-picture JPEG from cameras: the first picture is a plain JPEG
        fmt = "JPEG"
    if fmt not in SUPPORTED:
        raise UnsupportedFormat(
            f"{fmt or 'this'} images are not supported (supported: {', '.join(sorted(SUPPORTED))})",
            code="unsupported_format",
        )
    frames = int(getattr(img, "n_frames", 1) or 1)
    width, height = img.size
    try:
        img.verify()
    except Exception as exc:  # Pillow raises many types from verify()
        raise InvalidImage("the image data is corrupt", code="corrupt_image") from exc
    # verify() checks structure, and a PNG's checksums: they find a PNG cut short and any flipped bit (200 of 200
    # single-bit flips), so a PNG that passes is not decoded here. A JPEG has none: one cut short is found by a
    # reduced decode, needed only where its last bytes are not its end-of-image marker (JPEG_END; a file cut short,
    # or with data after the marker such as a phone's appended video). The other formats are decoded up to 16 MP.
    # Whatever damage a whole file may still hold, the worker's decode finds, marking the picture failed with a
    # code. Decoding whole files here cost 2.9 of an upload's 6.7 ms for a 1 MP JPEG and 16 ms for a 1920x1080
    # screenshot PNG (bench/RESULTS.md, "A/B: whole JPEGs and PNGs not decoded at upload").
    try:
        img = Image.open(io.BytesIO(data))
        if fmt == "JPEG":
            if not data.endswith(JPEG_END):
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
        elif fmt != "PNG" and width * height <= 16_000_000:
            img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"the image data is truncated or corrupt ({fmt})", code="corrupt_image") from exc
    if (width, height) != img.size and fmt != "JPEG":
        raise InvalidImage("the image size changed on decode", code="corrupt_image")
    orientation = 1
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is not a reason to refuse the picture
        orientation = 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageFacts(format=fmt, mime=SUPPORTED[fmt], width=width, height=height, frames=frames)


def decode_rgb(data: bytes, *, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """The full decode: first frame, EXIF orientation applied, any mode (CMYK, 16-bit, alpha, palette) to RGB.

    With `min_side`, a JPEG is decoded at a reduced scale (DCT draft) that keeps its shorter side at least that
    large: a large photo decodes several times faster and the model sees the same picture.
    """
    try:
        img = _open(data, max_pixels)
        if min_side and (img.format or "").upper() in {"JPEG", "MPO"}:
            w, h = img.size
            scale = max(1.0, min(w, h) / min_side)
            img.draft("RGB", (int(w / scale), int(h / scale)))
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except LoupeError:
        raise
    except Exception as exc:  # any Pillow failure on damaged data: permanent, with a code
        raise DecodeError(f"the image cannot be decoded: {type(exc).__name__}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the used range to 8 bits instead of clipping it to white.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype("uint8"), "L").convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV


def make_thumbnail(img: Image.Image, max_px: int, quality: int, fmt: str) -> bytes:
    return encode_thumbnail(thumbnail_image(img, max_px), quality, fmt)


# Pillow's thumbnail box-reduces by a whole factor first where a side is at least twice this many times the
# thumbnail's.
REDUCING_GAP = 2.0


def thumbnail_size(size: tuple[int, int], max_px: int) -> tuple[int, int] | None:
    """The size Pillow's `Image.thumbnail` gives a picture of `size` fitted into `max_px` x `max_px` (the aspect
    ratio kept, each side rounded down or up, whichever keeps it closer), or None where it fits already."""
    width, height = size
    if max_px >= width and max_px >= height:
        return None
    aspect = width / height

    def nearest(number: float, error: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if aspect <= 1:  # Pillow's test, x / y >= aspect, with x = y = max_px
        return nearest(max_px * aspect, lambda n: abs(aspect - n / max_px)), max_px
    return max_px, nearest(max_px / aspect, lambda n: 0 if n == 0 else abs(aspect - max_px / n))


def thumbnail_image(img: Image.Image, max_px: int) -> Image.Image:
    """The picture fitted into `max_px` x `max_px` (never enlarged) by Pillow's thumbnail: its geometry and
    antialiased bilinear filter (its support scales with the reduction; bicubic cost 1.6x as much for what a draft
    decode leaves to reduce). Where that is one resampling step (the picture under 4x the thumbnail: every JPEG
    after its draft decode but panoramas) and the picture is RGB, torch's SIMD uint8 kernel resamples it instead
    (resample_planes): each pixel within 1/255 of Pillow's, 1.18 against 2.05 ms for a 1 MP JPEG's draft decode on
    one thread (bench/RESULTS.md, "A/B: thumbnails and model inputs resampled by torch"). Larger pictures Pillow
    first box-reduces by a whole factor and then resizes within an offset box; that stays Pillow's."""
    size = thumbnail_size(img.size, max_px)
    if size is None:
        return img.copy()
    one_step = img.width / size[0] < 2 * REDUCING_GAP and img.height / size[1] < 2 * REDUCING_GAP
    if img.mode == "RGB" and one_step:
        # Pillow interleaves the planes in 0.09 ms, where a strided copy took 0.5-0.7 ms.
        return Image.merge("RGB", [Image.fromarray(p, "L") for p in resample_planes(img, size, "bilinear")])
    thumb = img.copy()
    thumb.thumbnail((max_px, max_px), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return thumb


def resample_planes(img: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    """An RGB picture resized to `size` by torch's antialiased `mode` filter ("bilinear" or "bicubic", Pillow's
    filters: torch's SIMD uint8 kernels are a port of Pillow-SIMD's), as planes (3, H, W) uint8. Torch starts no
    OpenMP team for it from a thread of its own (checked with 4 threads side by side), so decode threads may call
    it."""
    import torch

    pixels = np.array(img)  # writable (np.asarray's is not, and torch warns on those)
    # (1, 3, H, W) over channels-last memory: the layout torch's SIMD uint8 path takes.
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode=mode, antialias=True)
    return y[0].numpy()


def encode_thumbnail(thumb: Image.Image, quality: int, fmt: str) -> bytes:
    """JPEG (libjpeg-turbo, 0.3 ms at 384x288) or WebP (method 0, the fastest: 2.5 ms; 16% smaller files)."""
    out = io.BytesIO()
    if fmt == "webp":
        thumb.save(out, "WEBP", quality=quality, method=0)
    else:
        thumb.save(out, "JPEG", quality=quality)
    return out.getvalue()
