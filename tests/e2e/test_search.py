"""Search end to end over HTTP with the tiny trained CLIP: text, image, mixed, negative, similar, paging,
and a check that the server ranks exactly as the model does when used directly."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from loupe.models.tiny_clip import COLOURS, SHAPES, all_classes
from tests.e2e.conftest import Library
from tests.fixtures import images as mk
from tests.fixtures.images import shape_set


def search(lib: Library, body: dict) -> dict:
    res = lib.client.post("/api/search", json=body)
    assert res.status_code == 200, res.text
    return res.json()


def labels(lib: Library, hits: list[dict]) -> list[tuple[str, str]]:
    return [lib.label(h["id"]) for h in hits]


def test_text_queries_find_the_right_colour_and_shape(library: Library):
    both, colour, per_class = [], [], {}
    for c, s in all_classes():
        got = labels(library, search(library, {"query": [{"text": f"a {c} {s}"}], "limit": 5})["hits"])
        p = sum(g == (c, s) for g in got) / 5
        per_class[f"{c} {s}"] = p
        both.append(p)
        colour.append(sum(g[0] == c for g in got) / 5)
    print(
        f"\ntext->image precision@5: mean {np.mean(both):.3f}, colour {np.mean(colour):.3f}; per class {per_class}"
    )
    assert np.mean(both) >= 0.8
    assert np.mean(colour) >= 0.95
    assert per_class["a red circle".removeprefix("a ")] >= 0.8


def test_image_queries_return_the_same_class(library: Library):
    held_out = shape_set(per_class=2, seed=999)
    precisions = []
    for item in held_out:
        res = library.client.post(
            "/api/search/image",
            files=[("image", (item.name, item.data, "image/png"))],
            data={"query": json.dumps({"limit": 5})},
        )
        assert res.status_code == 200, res.text
        got = labels(library, res.json()["hits"])
        precisions.append(sum(g == (item.colour, item.shape) for g in got) / 5)
    print(f"image->image precision@5 on held-out renders: {np.mean(precisions):.3f}")
    assert np.mean(precisions) >= 0.6


def test_a_negative_weight_moves_results_away(library: Library):
    plain = labels(library, search(library, {"query": [{"text": "a red circle"}], "limit": 16})["hits"])
    pushed = labels(
        library,
        search(
            library,
            {"query": [{"text": "a red circle"}, {"text": "a red square", "weight": -0.8}], "limit": 16},
        )["hits"],
    )
    assert Counter(plain)[("red", "square")] > Counter(pushed)[("red", "square")]
    assert pushed[0][1] == "circle"  # still a search for circles, just away from red squares


def test_an_uploaded_copy_of_a_library_picture_queries_with_its_stored_vector(library: Library):
    """POST /api/search/image prepares the picture as ingest did (the same decode scale, thumbnail and resize), so
    the same bytes give the vector stored for the picture: it comes first, at cosine 1."""
    image_id, shape = next(iter(library.shapes.items()))
    res = library.client.post(
        "/api/search/image", files=[("image", ("copy.png", shape.data, "image/png"))], data={"query": "{}"}
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["hits"][0]["id"] == image_id and body["hits"][0]["score"] >= 0.9999
    stored = library.runtime.mirror.vector(image_id)
    np.testing.assert_allclose(np.asarray(body["query_term"]["vector"]), stored, atol=1e-4)


def test_mixed_image_and_text_query(library: Library):
    blue_star = next(s for s in shape_set(per_class=1, seed=555) if (s.colour, s.shape) == ("blue", "star"))
    query = {"query": [{"text": "a green star", "weight": 0.7}], "image_weights": [0.3], "limit": 8}
    res = library.client.post(
        "/api/search/image",
        files=[("image", ("q.png", blue_star.data, "image/png"))],
        data={"query": json.dumps(query)},
    )
    assert res.status_code == 200, res.text
    body = res.json()
    got = labels(library, body["hits"])
    assert Counter(s for _, s in got)["star"] >= 5
    # The composed query comes back as a vector term: page on with POST /api/search and no re-upload.
    term = body["query_term"]
    assert len(term["vector"]) == library.runtime.clip.dim
    again = search(library, {"query": [term], "limit": 8})
    assert [h["id"] for h in again["hits"]] == [h["id"] for h in body["hits"]]
    assert body["next_cursor"]
    nxt = library.client.post(
        "/api/search/image",
        files=[("image", ("q.png", blue_star.data, "image/png"))],
        data={"query": json.dumps({**query, "cursor": body["next_cursor"]})},
    ).json()
    assert not {h["id"] for h in nxt["hits"]} & {h["id"] for h in body["hits"]}


def test_similar_excludes_the_image_itself_and_stays_in_class(library: Library):
    image_id, shape = next(iter(library.shapes.items()))
    res = library.client.get(f"/api/images/{image_id}/similar", params={"limit": 10})
    assert res.status_code == 200
    hits = res.json()["hits"]
    assert image_id not in [h["id"] for h in hits]
    assert sum(lib[0] == shape.colour for lib in labels(library, hits)) >= 8
    assert library.client.get("/api/images/999999/similar").status_code == 404


def test_paging_with_a_cursor_has_no_duplicates_and_no_gaps(library: Library):
    body = {"query": [{"text": "a purple triangle"}], "limit": 7}
    full = search(library, {**body, "limit": len(library.shapes)})
    assert full["next_cursor"] is None and len(full["hits"]) == len(library.shapes)
    pages, cursor = [], None
    while True:
        page = search(library, {**body, **({"cursor": cursor} if cursor else {})})
        pages.extend(h["id"] for h in page["hits"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == [h["id"] for h in full["hits"]]
    other = search(library, {"query": [{"text": "a green cross"}], "limit": 7})
    res = library.client.post("/api/search", json={**body, "cursor": other["next_cursor"]})
    assert res.status_code == 400 and res.json()["error"]["code"] == "bad_cursor"


def test_min_score_cuts_weak_matches(library: Library):
    full = search(library, {"query": [{"text": "an orange square"}], "limit": 50})["hits"]
    cut = full[10]["score"]
    kept = search(library, {"query": [{"text": "an orange square"}], "limit": 50, "min_score": cut})["hits"]
    assert [h["id"] for h in kept] == [h["id"] for h in full if h["score"] >= cut]
    assert all(h["score"] >= cut for h in kept)


def test_the_server_ranks_exactly_as_the_model_does_directly(library: Library):
    """Embed the same files with transformers directly and rank by cosine: ids and scores agree."""
    path = library.settings.clip_model
    model = CLIPModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    proc = CLIPImageProcessorPil.from_pretrained(path)
    ids = sorted(library.shapes)
    with torch.no_grad():
        pics = [Image.open(io.BytesIO(library.shapes[i].data)).convert("RGB") for i in ids]
        iv = model.get_image_features(**proc(images=pics, return_tensors="pt")).pooler_output
        for text in ["a yellow circle", "a blue cross", "the purple star on a plain background"]:
            tv = model.get_text_features(**tok([text], return_tensors="pt")).pooler_output
            scores = torch.nn.functional.cosine_similarity(iv, tv).numpy()
            order = np.lexsort((np.asarray(ids), -scores))[:20]
            hits = search(library, {"query": [{"text": text}], "limit": 20})["hits"]
            assert [h["id"] for h in hits] == [ids[k] for k in order]
            assert np.allclose([h["score"] for h in hits], scores[order], atol=1e-4)


def test_long_text_is_truncated_not_an_error(library: Library):
    words = " ".join(["a red circle"] * 300)  # ~900 tokens, far past the model's context
    res = library.client.post("/api/search", json={"query": [{"text": words}], "limit": 5})
    assert res.status_code == 200
    assert labels(library, res.json()["hits"])[0][0] == "red"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": []}, "query"),
        ({}, "query"),
        ({"query": [{"text": ""}]}, "query.0.text"),
        ({"query": [{"text": "x", "weight": "heavy"}]}, "query.0.weight"),
        ({"query": [{"text": "x", "image_id": 3}]}, "query.0"),
        ({"query": [{"text": "x"}], "limit": 0}, "limit"),
        ({"query": [{"text": "x"}], "colour": "red"}, "colour"),
        ({"query": [{"vector": [0.1, 0.2]}]}, "query[0].vector"),
        ({"query": [{"text": "a cat"}, {"text": "a cat", "weight": -1}]}, "query"),
    ],
)
def test_malformed_queries_are_400_naming_the_field(library: Library, body: dict, field: str):
    res = library.client.post("/api/search", json=body)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["message"]
    named = json.dumps(err.get("detail") or {}) + err["message"]
    assert field in named, err


def test_unknown_image_id_is_404_and_bad_json_is_400(library: Library):
    res = library.client.post("/api/search", json={"query": [{"image_id": 987654}]})
    assert res.status_code == 404 and res.json()["error"]["code"] == "not_found"
    res = library.client.post(
        "/api/search", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert res.status_code == 400
    res = library.client.post("/api/search/image", files=[("image", ("x.txt", b"text", "text/plain"))])
    assert res.status_code == 400 and res.json()["error"]["detail"]["field"] == "image[0]"
    # A whole JPEG is first decoded for the query itself: what no decoder can read is refused there, by name.
    res = library.client.post(
        "/api/search/image", files=[("image", ("x.jpg", mk.jpeg_bad_scan(), "image/jpeg"))]
    )
    error = res.json()["error"]
    assert res.status_code == 400 and (error["code"], error["detail"]["field"]) == (
        "decode_error",
        "image[0]",
    )
    res = library.client.post(
        "/api/search/image",
        files=[("image", ("x.png", library.shapes[next(iter(library.shapes))].data, "image/png"))],
        data={"query": "{bad"},
    )
    assert res.status_code == 400 and res.json()["error"]["detail"]["field"] == "query"


def test_responses_report_timing_and_plan(library: Library):
    body = search(library, {"query": [{"text": "a green circle"}], "limit": 3})
    assert set(body["timing_ms"]) == {"embed", "search", "join", "total"}
    assert body["plan"]["candidates"] == "faiss-mirror" and body["plan"]["index"] == "flat"
    assert body["hits"][0]["channels"]["clip"] == body["hits"][0]["score"]
    assert body["hits"][0]["thumbnail_url"].endswith("/thumbnail")


def test_query_text_embeddings_are_cached(library: Library):
    cache = library.runtime.search.text_cache
    search(library, {"query": [{"text": "a unique yellow star query"}]})
    misses = cache.misses
    search(library, {"query": [{"text": "a unique yellow star query"}]})
    assert cache.misses == misses and cache.hits >= 1


def test_every_colour_and_shape_word_is_known_to_the_tokenizer(library: Library):
    tok = library.runtime.clip.tokenizer
    for word in [*COLOURS, *SHAPES]:
        assert len(tok.tokenize(word)) == 1, word
    assert len(tok("日本語 émoji 🙂")["input_ids"]) > 2  # any text tokenizes (byte-level)


def test_concurrent_image_searches_share_image_tower_passes(library: Library):
    """Image searches that arrive while a pass runs are encoded together in the next one, and each gets the
    vector of its own picture (the vector it gets when searched alone)."""
    search_service = library.runtime.search
    batcher = search_service.picture_encode
    pictures = shape_set(per_class=1, seed=4242)[:5]

    def query_term(item) -> list[float]:
        res = library.client.post(
            "/api/search/image", files=[("image", (item.name, item.data, "image/png"))], data={"query": "{}"}
        )
        assert res.status_code == 200, res.text
        return res.json()["query_term"]["vector"]

    alone = [query_term(p) for p in pictures]
    real, held, release = batcher.encode, threading.Event(), threading.Event()

    def held_first(pixels):
        if not held.is_set():
            held.set()
            assert release.wait(10)
        return real(pixels)

    before = library.runtime.health()["model"]["image_query_encodes"]
    batcher.encode = held_first
    try:
        with ThreadPoolExecutor(len(pictures)) as pool:
            first = pool.submit(query_term, pictures[0])
            assert held.wait(10)
            rest = [pool.submit(query_term, p) for p in pictures[1:]]
            deadline = time.monotonic() + 10
            while batcher._waiting < len(rest):
                assert time.monotonic() < deadline, "the searches did not queue"
                time.sleep(0.01)
            release.set()
            together = [first.result(30)] + [f.result(30) for f in rest]
    finally:
        batcher.encode = real
    after = library.runtime.health()["model"]["image_query_encodes"]
    assert after["passes"] - before["passes"] == 2  # the held pass, then the four queued searches in one
    assert after["pictures"] - before["pictures"] == 5
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_request_with_more_pictures_than_a_pass_holds_runs_in_several(library: Library):
    from loupe.ingest.service import query_pixels
    from loupe.search.service import IMAGE_QUERY_BATCH

    search_service = library.runtime.search
    pixels = [
        query_pixels(s.data, search_service.clip, library.settings.ingest)
        for s in shape_set(per_class=1, seed=77)[: IMAGE_QUERY_BATCH + 3]
    ]
    passes = search_service.picture_encode.batches
    vecs = search_service.embed_query_pictures(pixels)
    assert search_service.picture_encode.batches - passes == 2
    np.testing.assert_allclose(vecs, search_service.clip.embed_uint8(np.stack(pixels)), atol=1e-5)
