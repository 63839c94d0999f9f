"""Camera facts from EXIF (capture time, camera, lens, GPS, orientation) and a perceptual hash for duplicates."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
from PIL import Image

EXIF_IFD = 0x8769
GPS_IFD = 0x8825
# A few tags worth showing people; the rest of EXIF stays in the original file.
SHOWN = {
    0x010F: "Make",
    0x0110: "Model",
    0x0131: "Software",
    0x9003: "DateTimeOriginal",
    0x829A: "ExposureTime",
    0x829D: "FNumber",
    0x8827: "ISOSpeedRatings",
    0x920A: "FocalLength",
    0xA434: "LensModel",
    0x0112: "Orientation",
}


def _clean(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace").strip("\x00 ").strip()
    if isinstance(v, str):
        return v.strip("\x00 ").strip()
    try:
        f = float(v)
        return int(f) if f.is_integer() else round(f, 6)
    except (TypeError, ValueError):
        return str(v)


def _when(value: Any, offset: Any) -> datetime | None:
    text = _clean(value) if value is not None else None
    if not isinstance(text, str) or len(text) < 19:
        return None
    try:
        naive = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    tz = UTC
    off = _clean(offset) if offset is not None else None
    if isinstance(off, str) and len(off) == 6 and off[0] in "+-":
        try:
            sign = 1 if off[0] == "+" else -1
            tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6])))
        except ValueError:
            tz = UTC
    # Without an offset the camera's clock is taken as UTC: consistent, if not always true.
    return naive.replace(tzinfo=tz).astimezone(UTC)


def _degrees(dms: Any, ref: Any) -> float | None:
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError):
        return None
    value = d + m / 60 + s / 3600
    if _clean(ref) in ("S", "W"):
        value = -value
    return round(value, 7)


def read_exif(data: bytes) -> dict[str, Any]:
    """Column values for the images table (taken_at, camera_make, camera_model, lens, gps_lat, gps_lon,
    orientation, exif). A broken EXIF block gives what could be read, never an error."""
    out: dict[str, Any] = {}
    try:
        exif = Image.open(io.BytesIO(data)).getexif()
    except Exception:  # unreadable EXIF is not a reason to refuse a picture
        return out
    if not exif:
        return out
    try:
        sub = exif.get_ifd(EXIF_IFD)
    except Exception:
        sub = {}
    try:
        gps = exif.get_ifd(GPS_IFD)
    except Exception:
        gps = {}
    taken = _when(sub.get(0x9003) or exif.get(0x0132), sub.get(0x9011))
    if taken:
        out["taken_at"] = taken
    for key, tag in (("camera_make", 0x010F), ("camera_model", 0x0110)):
        if exif.get(tag):
            out[key] = str(_clean(exif.get(tag)))[:100]
    if sub.get(0xA434):
        out["lens"] = str(_clean(sub.get(0xA434)))[:200]
    if gps:
        lat = _degrees(gps.get(2), gps.get(1))
        lon = _degrees(gps.get(4), gps.get(3))
        if lat is not None and lon is not None and -90 <= lat <= 90 and -180 <= lon <= 180:
            out["gps_lat"], out["gps_lon"] = lat, lon
    if exif.get(0x0112):
        with contextlib.suppress(TypeError, ValueError):
            out["orientation"] = int(exif.get(0x0112) or 1)
    shown = {}
    for tag, name in SHOWN.items():
        v = exif.get(tag, sub.get(tag))
        if v is not None:
            shown[name] = _clean(v)
    if shown:
        out["exif"] = shown
    return out


def dhash(img: Image.Image) -> int:
    """64-bit difference hash (signed, to fit a BIGINT): near-identical pictures differ in few bits."""
    # A box reduction to at least 8x the 9x8 grid first: 0.14 instead of 0.48 ms for a 384x288 thumbnail, with the
    # same hash or one at most 2 bits away (1 MP photographs).
    factor = max(1, min(img.width // 72, img.height // 64))
    small = np.asarray(
        img.reduce(factor).convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16
    )
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value - (1 << 64) if value >= (1 << 63) else value


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & ((1 << 64) - 1)).bit_count()
