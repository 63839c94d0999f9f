"""Metadata over HTTP on SQLite and PostgreSQL: EXIF round trips, user fields, filtered browse and search,
facets, the exists check and near-duplicates."""

from __future__ import annotations

import io
import json

import pytest
from litestar.testing import TestClient
from PIL import Image

from tests.e2e.conftest import upload
from tests.fixtures import images as mk
from tests.fixtures.text_images import text_free_picture


def camera_jpeg(
    colour: tuple[int, int, int],
    *,
    make: str,
    model: str,
    taken: str,
    offset: str | None = None,
    lens: str | None = None,
    gps: tuple[float, float] | None = None,
    size: tuple[int, int] = (320, 240),
) -> bytes:
    """A JPEG with camera-style EXIF written by Pillow: Make/Model in IFD0, DateTimeOriginal (+offset) and
    LensModel in the Exif IFD, latitude/longitude in the GPS IFD."""
    img = Image.new("RGB", size, colour)
    exif = Image.Exif()
    exif[0x010F] = make
    exif[0x0110] = model
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = taken
    if offset:
        sub[0x9011] = offset
    if lens:
        sub[0xA434] = lens
    if gps:
        lat, lon = gps

        def dms(v: float) -> tuple[float, float, float]:
            v = abs(v)
            d = int(v)
            m = int((v - d) * 60)
            return (float(d), float(m), round((v - d - m / 60) * 3600, 4))

        g = exif.get_ifd(0x8825)
        g[1], g[2], g[3], g[4] = ("N" if lat >= 0 else "S"), dms(lat), ("E" if lon >= 0 else "W"), dms(lon)
    return mk.encode(img, "JPEG", exif=exif.tobytes(), quality=92)


def get_filtered(client: TestClient, filters: dict | None, **params) -> dict:
    q = dict(params)
    if filters is not None:
        q["filters"] = json.dumps(filters)
    res = client.get("/api/images", params=q)
    assert res.status_code == 200, res.text
    return res.json()


def test_exif_round_trip_and_filters_on_camera_time_and_place(api):
    client, rt = api
    files = [
        (
            "lisbon.jpg",
            camera_jpeg(
                (200, 40, 40),
                make="FUJIFILM",
                model="X100V",
                taken="2019:07:14 18:30:00",
                offset="+01:00",
                lens="23mm F2",
                gps=(38.7223, -9.1393),
            ),
        ),
        (
            "paris.jpg",
            camera_jpeg(
                (40, 200, 40),
                make="Canon",
                model="EOS R5",
                taken="2021:03:02 09:00:00",
                gps=(48.8584, 2.2945),
            ),
        ),
        (
            "nyc.jpg",
            camera_jpeg(
                (40, 40, 200),
                make="Apple",
                model="iPhone 13",
                taken="2019:12:31 23:59:59",
                gps=(40.7128, -74.006),
            ),
        ),
        ("plain.png", mk.png(50, 40)),
    ]
    ids = {o["filename"]: o["id"] for o in upload(client, files, tags="trip").json()["files"]}
    rt.ingest.drain()
    d = client.get(f"/api/images/{ids['lisbon.jpg']}").json()
    assert d["camera"] == {"make": "FUJIFILM", "model": "X100V", "lens": "23mm F2"}
    assert d["taken_at"].startswith("2019-07-14T17:30:00")  # 18:30 at +01:00, stored in UTC
    assert d["location"]["lat"] == pytest.approx(38.7223, abs=1e-3)
    assert d["location"]["lon"] == pytest.approx(-9.1393, abs=1e-3)
    assert d["exif"]["Model"] == "X100V"
    assert client.get(f"/api/images/{ids['plain.png']}").json()["camera"] == {
        "make": None,
        "model": None,
        "lens": None,
    }

    def names(flt: dict) -> set[str]:
        rev = {v: k for k, v in ids.items()}
        return {rev[i["id"]] for i in get_filtered(client, flt)["images"]}

    assert names({"camera": {"model": "x100v"}}) == {"lisbon.jpg"}
    assert names({"taken": {"from": "2019-01-01", "to": "2019-12-31"}}) == {"lisbon.jpg", "nyc.jpg"}
    assert names({"near": {"lat": 48.86, "lon": 2.29, "radius_m": 2000}}) == {"paris.jpg"}
    assert names({"box": {"min_lat": 30, "min_lon": -80, "max_lat": 45, "max_lon": -70}}) == {"nyc.jpg"}
    assert names({"format": ["png"]}) == {"plain.png"}
    assert names({"or": [{"camera": {"make": "apple"}}, {"format": ["PNG"]}]}) == {"nyc.jpg", "plain.png"}
    # The same filter inside a search: only matching images come back.
    res = client.post(
        "/api/search", json={"query": [{"text": "a red square"}], "filters": {"camera": {"make": "canon"}}}
    )
    assert [h["id"] for h in res.json()["hits"]] == [ids["paris.jpg"]]
    assert res.json()["plan"]["filter"]["matching"] == 1


def test_user_fields_batch_edits_sorting_totals_and_facets(api):
    client, rt = api
    files = [(f"p{i}.png", mk.noise_png(i, 40)) for i in range(6)]
    res = upload(client, files, tags="holiday", albums="Summer 2024")
    ids = [o["id"] for o in res.json()["files"]]
    rt.ingest.drain()
    r = client.patch(
        f"/api/images/{ids[0]}",
        json={"add_tags": ["best"], "rating": 5, "starred": True, "description": "sunset"},
    )
    assert r.status_code == 200, r.text
    assert (
        r.json()["tags"] == ["best", "holiday"]
        and r.json()["rating"] == 5
        and r.json()["description"] == "sunset"
    )
    assert client.patch("/api/images/999999", json={"rating": 1}).status_code == 404
    assert client.patch(f"/api/images/{ids[0]}", json={"rating": 9}).status_code == 400
    assert client.patch(f"/api/images/{ids[0]}", json={"colour": "red"}).status_code == 400
    b = client.post(
        "/api/images/batch",
        json={"ids": [*ids[1:3], 424242], "changes": {"albums": ["Best of"], "remove_tags": ["holiday"]}},
    )
    assert b.json() == {"updated": sorted(ids[1:3]), "missing": [424242]}
    assert client.get(f"/api/images/{ids[1]}").json()["albums"] == ["Best of"]
    assert client.get(f"/api/images/{ids[1]}").json()["tags"] == []

    page = get_filtered(client, {"tags": {"any": ["holiday"]}}, limit=2)
    assert page["total"] == 4 and len(page["images"]) == 2 and page["next_cursor"]
    rest = get_filtered(client, {"tags": {"any": ["holiday"]}}, limit=2, cursor=page["next_cursor"])
    assert not {i["id"] for i in page["images"]} & {i["id"] for i in rest["images"]}
    by_name = get_filtered(client, {"albums": {"any": ["Summer 2024", "Best of"]}}, sort="name", limit=50)
    assert [i["original_name"] for i in by_name["images"]] == sorted(f"p{i}.png" for i in range(6))
    starred = get_filtered(client, {"starred": True, "rating": {"min": 5}})
    assert [i["id"] for i in starred["images"]] == [ids[0]]
    # Edits reach the vector store's payload too: a filtered search agrees.
    hits = client.post(
        "/api/search", json={"query": [{"image_id": ids[3]}], "filters": {"tags": {"all": ["best"]}}}
    ).json()["hits"]
    assert [h["id"] for h in hits] == [ids[0]]

    facets = client.get("/api/images/facets").json()
    assert facets["total"] == 6
    assert {"value": "holiday", "count": 4} in facets["tags"]
    assert {"value": "Summer 2024", "count": 4} in facets["albums"] and {
        "value": "PNG",
        "count": 6,
    } in facets["formats"]
    narrowed = client.get(
        "/api/images/facets", params={"filters": json.dumps({"albums": {"any": ["Best of"]}})}
    ).json()
    assert narrowed["total"] == 2 and narrowed["tags"] == []


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"colour": "red"}, "filters.colour"),
        ({"taken": {"from": "not a date"}}, "filters.taken.from"),
        ({"tags": {"some": ["x"]}}, "filters.tags.some"),
        ({"near": {"lat": 95, "lon": 0, "radius_m": 10}}, "filters.near.lat"),
        ({}, "filters"),
    ],
)
def test_bad_filters_are_400_naming_the_field(api, filters: dict, field: str):
    client, _ = api
    res = client.get("/api/images", params={"filters": json.dumps(filters)})
    assert res.status_code == 400 and res.json()["error"]["code"] == "bad_filter"
    assert field in res.json()["error"]["detail"]["fields"], res.json()
    res = client.post("/api/search", json={"query": [{"text": "x"}], "filters": filters})
    assert res.status_code == 400
    assert client.get("/api/images", params={"filters": "{nope"}).json()["error"]["code"] == "bad_filter"


def test_exists_says_which_hashes_are_stored(api):
    import hashlib

    client, _ = api
    data = mk.noise_png(77, 32)
    image_id = upload(client, [("x.png", data)]).json()["files"][0]["id"]
    stored, other = hashlib.sha256(data).hexdigest(), "0" * 64
    res = client.post("/api/images/exists", json={"sha256": [stored.upper(), other]})
    assert res.json() == {"existing": {stored: image_id}}
    assert client.post("/api/images/exists", json={"sha256": ["xyz"]}).status_code == 400


def test_near_duplicates_by_perceptual_hash(api):
    client, rt = api
    base = Image.open(io.BytesIO(text_free_picture(5, (256, 256))))
    original = mk.encode(base, "PNG")
    smaller = mk.encode(base.resize((180, 180)), "JPEG", quality=70)  # resized and recompressed: new bytes
    other = mk.noise_png(6, 256)
    ids = [
        o["id"]
        for o in upload(client, [("a.png", original), ("b.jpg", smaller), ("c.png", other)]).json()["files"]
    ]
    rt.ingest.drain()
    dups = client.get(f"/api/images/{ids[0]}/duplicates").json()["duplicates"]
    assert [d["id"] for d in dups] == [ids[1]] and dups[0]["distance"] <= 6
    assert client.get(f"/api/images/{ids[2]}/duplicates").json()["duplicates"] == []
    by_clip = client.get(f"/api/images/{ids[0]}/duplicates", params={"by": "clip", "min_cosine": 0.97}).json()
    assert [d["id"] for d in by_clip["duplicates"]][:1] == [ids[1]] and by_clip["duplicates"][0][
        "cosine"
    ] >= 0.97


def test_duplicate_groups_across_the_library_and_collapsed_search_results(api):
    client, rt = api
    base = Image.open(io.BytesIO(text_free_picture(8, (256, 256))))
    files = [
        ("a.png", mk.encode(base, "PNG")),
        ("a-small.jpg", mk.encode(base.resize((200, 200)), "JPEG", quality=75)),
        ("a-tiny.jpg", mk.encode(base.resize((120, 120)), "JPEG", quality=60)),
        ("b.png", mk.noise_png(9, 256)),
    ]
    ids = {o["filename"]: o["id"] for o in upload(client, files).json()["files"]}
    rt.ingest.drain()
    groups = client.get("/api/duplicates").json()["groups"]
    assert [sorted(m["id"] for m in g) for g in groups] == [
        sorted([ids["a.png"], ids["a-small.jpg"], ids["a-tiny.jpg"]])
    ]
    body = {"query": [{"image_id": ids["a.png"]}], "limit": 10}
    full = client.post("/api/search", json=body).json()["hits"]
    collapsed = client.post("/api/search", json={**body, "collapse_duplicates": True}).json()["hits"]
    assert len(full) == 4 and len(collapsed) == 2
    assert {h["id"] for h in collapsed} == {ids["a.png"], ids["b.png"]}
