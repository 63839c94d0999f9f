"""Words inside pictures: read by Tesseract, searched by keyword and by meaning, fused with CLIP.
On SQLite and PostgreSQL; assertions are on top hits, not on scores."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient
from PIL import Image, ImageDraw

from loupe.app import create_app
from loupe.config import Settings
from loupe.runtime import Runtime
from tests.conftest import _pg_create_database
from tests.e2e.conftest import upload
from tests.fixtures.images import encode, shape_set
from tests.fixtures.text_images import busy_background, font, text_free_picture, text_picture

TEXTS = {
    "cars": ["USED CARS FOR SALE", "best prices in town"],
    "birthday": ["Happy birthday Anna"],
    "invoice": ["Invoice 2041", "Total due: 349.00 EUR"],
    "calm": ["Keep calm and carry on"],
    "cat": ["Lost cat", "call 555 0134"],
    "bread": ["Fresh bread daily"],
    "lisbon": ["Welcome to Lisbon"],
    "parking": ["No parking", "tow away zone"],
    "summer": ["Summer music festival"],
    "film": ["Film festival tickets"],
    "redtext": ["red circle"],
}


def circle_with_caption(seed: int) -> bytes:
    """A big red circle with the words "red circle" under it: matches both CLIP and the text channels."""
    rng = random.Random(seed)
    img = busy_background(rng, 640, 400)
    d = ImageDraw.Draw(img)
    d.ellipse([220, 40, 420, 240], fill=(215, 35, 35))
    d.text((200, 290), "red circle", font=font("DejaVuSans-Bold.ttf", 48), fill=(15, 15, 15))
    return encode(img, "PNG")


class OcrLibrary:
    def __init__(self, client: TestClient, rt: Runtime, ids: dict[str, int], free_ids: set[int]) -> None:
        self.client, self.rt, self.ids, self.free_ids = client, rt, ids, free_ids

    def search(self, text: str, channel: str, limit: int = 10, **extra) -> list[dict]:
        res = self.client.post(
            "/api/search", json={"query": [{"text": text, "channel": channel}], "limit": limit, **extra}
        )
        assert res.status_code == 200, res.text
        return res.json()["hits"]

    def top(self, text: str, channel: str) -> int:
        hits = self.search(text, channel)
        assert hits, f"nothing found for {text!r} on {channel}"
        return hits[0]["id"]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def ocr_library(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path
) -> Iterator[OcrLibrary]:
    data = tmp_path_factory.mktemp(f"ocr-{request.param}")
    db_url, drop = None, None
    if request.param == "postgres":
        db_url, drop = _pg_create_database(request.getfixturevalue("pg_admin_url"))
    settings = Settings(data_dir=data, clip_model=str(tiny_clip_dir), database_url=db_url)  # type: ignore[arg-type]
    rt = Runtime.open(settings)
    try:
        with TestClient(create_app(settings, runtime=rt), timeout=120) as client:
            files = [
                (f"{key}.png", text_picture(lines, seed=n + 1).data)
                for n, (key, lines) in enumerate(TEXTS.items())
            ]
            files.append(("both.png", circle_with_caption(5)))
            free = [(s.name, s.data) for s in shape_set(per_class=1, seed=3)]
            free += [(f"free{i}.png", text_free_picture(100 + i)) for i in range(4)]
            res = upload(client, files + free)
            out = res.json()["files"]
            assert all(o["status"] == "accepted" for o in out), out
            ids = {name.removesuffix(".png"): o["id"] for (name, _), o in zip(files, out, strict=False)}
            free_ids = {o["id"] for o in out[len(files) :]}
            rt.ingest.drain()
            yield OcrLibrary(client, rt, ids, free_ids)
    finally:
        rt.close()
        if drop:
            drop()


def test_ocr_reads_words_with_boxes_and_lines(ocr_library: OcrLibrary):
    detail = ocr_library.client.get(f"/api/images/{ocr_library.ids['cars']}").json()
    text = detail["text"]
    assert text["has_text"] and text["checked"]
    assert text["content"].splitlines() == ["USED CARS FOR SALE", "best prices in town"]  # lines stay lines
    words = {w["text"]: w for w in text["words"]}
    assert {"USED", "CARS", "SALE", "prices"} <= set(words)
    for w in text["words"]:
        x, y, bw, bh = w["box"]
        assert 0 <= x < detail["width"] and 0 <= y < detail["height"] and bw > 0 and bh > 0
        assert w["conf"] >= 50
    assert words["USED"]["box"][1] < words["prices"]["box"][1]  # first line above the second
    assert text["ocr_ms"] > 0


def test_text_free_pictures_skip_tesseract_after_the_presence_check(ocr_library: OcrLibrary):
    rows = ocr_library.rt.repo.get_texts(sorted(ocr_library.free_ids))
    assert len(rows) == len(ocr_library.free_ids)
    assert not any(r.has_text for r in rows.values())
    assert sum(not r.checked for r in rows.values()) >= len(rows) - 2


def test_an_exact_word_finds_its_image_first(ocr_library: OcrLibrary):
    for word, key in [
        ("Lisbon", "lisbon"),
        ("invoice", "invoice"),
        ("bread", "bread"),
        ("parking", "parking"),
    ]:
        assert ocr_library.top(word, "keyword") == ocr_library.ids[key], word


def test_a_prefix_and_an_inner_part_of_a_word_find_it(ocr_library: OcrLibrary):
    assert ocr_library.top("Lisb", "keyword") == ocr_library.ids["lisbon"]
    assert ocr_library.top("isbo", "keyword") == ocr_library.ids["lisbon"]
    assert ocr_library.top("thday", "keyword") == ocr_library.ids["birthday"]


def test_a_paraphrase_finds_the_image_by_meaning(ocr_library: OcrLibrary):
    assert ocr_library.top("automobile", "ocr") == ocr_library.ids["cars"]
    assert ocr_library.top("missing pet", "ocr") == ocr_library.ids["cat"]
    assert ocr_library.top("bill payment", "ocr") == ocr_library.ids["invoice"]
    assert ocr_library.search("automobile", "keyword") == []  # no shared word: keyword alone cannot


def test_the_whole_phrase_ranks_above_a_single_word(ocr_library: OcrLibrary):
    hits = [h["id"] for h in ocr_library.search("summer music festival", "keyword")]
    assert hits.index(ocr_library.ids["summer"]) < hits.index(ocr_library.ids["film"])
    assert hits[0] == ocr_library.ids["summer"]


def test_auto_ranks_an_image_matching_in_clip_and_text_above_single_channel_matches(ocr_library: OcrLibrary):
    hits = ocr_library.search("red circle", "auto", limit=20)
    assert hits[0]["id"] == ocr_library.ids["both"], [(h["id"], h["channels"]) for h in hits[:5]]
    assert set(hits[0]["channels"]) == {"clip", "ocr", "keyword"}
    detail = ocr_library.client.get(f"/api/images/{ocr_library.ids['redtext']}").json()
    assert detail["text"]["content"] == "red circle", detail["text"]
    redtext = next(h for h in hits if h["id"] == ocr_library.ids["redtext"])
    assert hits.index(redtext) > 0


def test_hits_carry_the_matched_words_a_snippet_and_boxes(ocr_library: OcrLibrary):
    hit = ocr_library.search("cars sale", "keyword")[0]
    assert hit["id"] == ocr_library.ids["cars"]
    assert set(hit["channels"]) == {"keyword"}
    assert {"CARS", "SALE"} <= set(hit["text"]["matched"])
    assert "<mark>CARS</mark>" in hit["text"]["snippet"]
    assert len(hit["text"]["boxes"]) == len(hit["text"]["matched"])
    sem = ocr_library.search("automobile", "ocr")[0]
    assert "CARS" in sem["text"]["snippet"] and sem["text"]["boxes"]


def test_text_free_images_never_match_ocr_or_keyword_queries(ocr_library: OcrLibrary):
    for channel in ("ocr", "keyword"):
        for query in ("circle", "a red square", "cat", "sale"):
            ids = {h["id"] for h in ocr_library.search(query, channel, limit=100)}
            assert not ids & ocr_library.free_ids, (channel, query)


def test_fusion_options_and_paging_over_fused_results(ocr_library: OcrLibrary):
    body = {
        "query": [{"text": "festival", "channel": "auto"}],
        "limit": 3,
        "fusion": {"method": "rrf", "weights": {"clip": 0}},
    }
    first = ocr_library.client.post("/api/search", json=body).json()
    assert first["plan"]["fusion"] == "rrf" and first["next_cursor"]
    second = ocr_library.client.post("/api/search", json={**body, "cursor": first["next_cursor"]}).json()
    assert not {h["id"] for h in first["hits"]} & {h["id"] for h in second["hits"]}
    assert {h["id"] for h in first["hits"][:2]} == {ocr_library.ids["summer"], ocr_library.ids["film"]}


def test_deleting_an_image_removes_its_text_everywhere(
    ocr_library: OcrLibrary, request: pytest.FixtureRequest
):
    key = "calm"
    image_id = ocr_library.ids[key]
    assert ocr_library.top("calm", "keyword") == image_id
    chunks = ocr_library.rt.repo.get_texts([image_id])[image_id].chunks
    assert ocr_library.client.delete(f"/api/images/{image_id}").status_code == 204
    assert image_id not in {h["id"] for h in ocr_library.search("calm", "keyword")}
    assert image_id not in {h["id"] for h in ocr_library.search("keep calm", "ocr", limit=50)}
    assert ocr_library.rt.repo.get_texts([image_id]) == {}
    text_collection = ocr_library.rt.ingest.text_indexer.collection
    assert (
        ocr_library.rt.vectors.retrieve(text_collection, [image_id * 4096 + k for k in range(chunks)]) == {}
    )


def test_thumbnail_of_a_text_image_is_readable(ocr_library: OcrLibrary):
    res = ocr_library.client.get(f"/api/images/{ocr_library.ids['lisbon']}/thumbnail")
    assert Image.open(io.BytesIO(res.content)).format == "JPEG"
