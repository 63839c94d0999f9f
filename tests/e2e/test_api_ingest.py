"""Upload over HTTP on SQLite and PostgreSQL: per-file outcomes, duplicates, bad files, the worker, delete."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from loupe.runtime import Runtime
from tests.e2e.conftest import upload
from tests.fixtures import images as mk


def files_on_disk(rt: Runtime) -> int:
    return sum(1 for _ in rt.blobs.iter_originals())


def test_a_few_hundred_uploads_with_duplicates_and_bad_files(api):
    client, rt = api
    shapes = mk.shape_set(per_class=7, seed=11)  # 210 pictures
    bad = [
        ("empty.png", b"", "empty_file"),
        ("notes.txt", b"just some text", "not_an_image"),
        ("half.png", mk.truncated(mk.noise_png(3, 96), 0.5), "corrupt_image"),
        ("bomb.png", mk.png_bomb(), "too_many_pixels"),
        ("picture.ppm", mk.ppm(), "unsupported_format"),
    ]
    accepted: dict[str, int] = {}
    batches = [shapes[i : i + 50] for i in range(0, len(shapes), 50)]
    for n, batch in enumerate(batches):
        files = [(s.name, s.data) for s in batch]
        files.append(bad[n % len(bad)][:2])
        if n > 0:  # the same bytes again, under another name
            files.append(("again-" + batches[0][n].name, batches[0][n].data))
        res = upload(client, files, tags="batch,shapes")
        assert res.status_code == 200, res.text
        out = res.json()["files"]
        for (name, _), o in zip(files, out, strict=True):
            if name.startswith("again-"):
                assert o["status"] == "duplicate" and o["id"] == accepted[name.removeprefix("again-")]
            elif o["status"] == "accepted":
                accepted[name] = o["id"]
            else:
                assert o["status"] == "rejected"
                assert o["error"]["code"] == dict((b[0], b[2]) for b in bad)[name]
                assert o["error"]["message"]
    assert len(accepted) == len(shapes)
    # Rejected files left nothing behind: one stored original per accepted image.
    assert files_on_disk(rt) == len(shapes)
    assert rt.repo.counts_by_state()["pending"] == len(shapes)

    assert rt.ingest.drain() == len(shapes)
    health = client.get("/api/health").json()
    assert health["counts"] == {"pending": 0, "processing": 0, "ready": len(shapes), "failed": 0}
    assert health["stores"]["vectors"] == "qdrant-edge" and health["stores"]["mirror"]["vectors"] == len(
        shapes
    )
    assert rt.vectors.count(rt.collection) == len(shapes)

    some = accepted[shapes[0].name]
    detail = client.get(f"/api/images/{some}").json()
    assert detail["state"] == "ready" and detail["tags"] == ["batch", "shapes"]
    assert (detail["width"], detail["height"]) == (112, 112) and detail["format"] == "PNG"
    original = client.get(f"/api/images/{some}/file")
    assert original.status_code == 200 and original.content == shapes[0].data
    assert original.headers["content-type"] == "image/png"
    thumb = client.get(f"/api/images/{some}/thumbnail")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    assert thumb.headers["content-type"] == "image/jpeg"


def test_a_request_whose_files_are_all_rejected_answers_4xx(api):
    client, rt = api
    one = upload(client, [("x.ppm", mk.ppm())])
    assert one.status_code == 415
    assert one.json()["error"]["code"] == "unsupported_format"
    many = upload(client, [("a.txt", b"nope"), ("b.png", b"")])
    assert many.status_code == 400
    body = many.json()["error"]
    assert body["code"] == "all_rejected"
    assert [f["error"]["code"] for f in body["detail"]["files"]] == ["not_an_image", "empty_file"]
    assert files_on_disk(rt) == 0 and sum(rt.repo.counts_by_state().values()) == 0


def test_requests_without_files_or_not_multipart_are_400(api):
    client, _ = api
    assert client.post("/api/images", json={"file": "x"}).json()["error"]["code"] == "not_multipart"
    res = client.post("/api/images", files=[("other", ("a.png", mk.png(), "image/png"))])
    assert res.status_code == 400 and res.json()["error"]["code"] == "no_files"


def test_awkward_but_valid_pictures_all_become_ready(api):
    client, rt = api
    files = [
        ("cmyk.jpg", mk.cmyk_jpeg()),
        ("grey16.png", mk.png16()),
        ("alpha.png", mk.rgba_png()),
        ("palette.png", mk.palette_png_with_transparency()),
        ("rotated.jpg", mk.exif_rotated_jpeg(80, 40, 6)),
        ("anim.gif", mk.animated_gif(3)),
        ("tiny.webp", mk.encode(Image.new("RGB", (3, 2), (5, 6, 7)), "WEBP")),
        ("../../../../etc/evil.png", mk.png(12, 12)),
    ]
    res = upload(client, files)
    assert res.json()["accepted"] == len(files), res.text
    rt.ingest.drain()
    assert rt.repo.counts_by_state()["ready"] == len(files)
    by_name = {o["filename"]: o["id"] for o in res.json()["files"]}
    rotated = client.get(f"/api/images/{by_name['rotated.jpg']}").json()
    assert (rotated["width"], rotated["height"]) == (40, 80)
    assert client.get(f"/api/images/{by_name['anim.gif']}").json()["frames"] == 3
    evil = client.get(f"/api/images/{by_name['evil.png']}").json()
    assert evil["original_name"] == "evil.png"
    assert not (rt.settings.data_dir.parent / "etc").exists()


def test_what_only_the_full_decode_finds_ends_as_failed_with_a_code(api):
    client, rt = api
    res = upload(client, [("ok.png", mk.noise_png(5, 64))])
    image_id = res.json()["files"][0]["id"]
    sha = rt.repo.get_image(image_id).sha256
    # The stored bytes go bad between upload and processing (disk fault): the worker records why.
    rt.blobs.original_path(sha).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rt.ingest.drain()
    detail = client.get(f"/api/images/{image_id}").json()
    assert detail["state"] == "failed"
    assert detail["error"]["code"] in {"corrupt_image", "not_an_image", "decode_error"}
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 409
    assert rt.vectors.count(rt.collection) == 0


def test_a_whole_jpeg_is_decoded_by_the_worker_alone_and_one_cut_short_at_upload(api):
    """A JPEG that ends in its end-of-image marker is not decoded at upload (the worker's decode is the one that
    counts): one that no decoder can read is accepted, then marked failed with a code and its original kept. The same
    bytes cut short are refused at upload by the reduced decode, as any truncated JPEG is."""
    client, rt = api
    bad = mk.jpeg_bad_scan()
    assert bad.endswith(b"\xff\xd9")
    res = upload(client, [("whole.jpg", bad), ("cut.jpg", mk.truncated(bad, 0.6))])
    whole, cut = res.json()["files"]
    assert whole["status"] == "accepted"
    assert (cut["status"], cut["error"]["code"]) == ("rejected", "corrupt_image")
    rt.ingest.drain()
    detail = client.get(f"/api/images/{whole['id']}").json()
    assert (detail["state"], detail["error"]["code"]) == ("failed", "decode_error")
    assert rt.blobs.original_path(rt.repo.get_image(whole["id"]).sha256).read_bytes() == bad
    assert rt.vectors.count(rt.collection) == 0


def test_embedding_failures_are_retried_with_backoff_then_fail(api, monkeypatch):
    client, rt = api
    image_id = upload(client, [("p.png", mk.noise_png(9, 48))]).json()["files"][0]["id"]
    rt.settings.ingest.retry_base_s = 0.0

    def broken(*args, **kwargs):
        raise RuntimeError("GPU fell off the bus")

    monkeypatch.setattr(rt.ingest.clip, "embed_uint8", broken)
    rt.ingest.process_batch()
    row = rt.repo.get_image(image_id)
    assert (row.state, row.error_code, row.attempts) == ("pending", "index_error", 1)
    rt.ingest.drain()
    row = rt.repo.get_image(image_id)
    assert row.state == "failed" and row.attempts == rt.settings.ingest.max_attempts
    monkeypatch.undo()


def test_delete_removes_the_image_from_every_store(api):
    client, rt = api
    res = upload(client, [(f"n{i}.png", mk.noise_png(i, 40)) for i in range(3)])
    ids = [o["id"] for o in res.json()["files"]]
    rt.ingest.drain()
    sha = rt.repo.get_image(ids[0]).sha256
    assert client.delete(f"/api/images/{ids[0]}").status_code == 204
    assert client.get(f"/api/images/{ids[0]}").status_code == 404
    assert client.get(f"/api/images/{ids[0]}/file").json()["error"]["code"] == "not_found"
    assert not rt.blobs.original_path(sha).exists() and not rt.blobs.thumbnail_path(sha).exists()
    assert rt.vectors.retrieve(rt.collection, [ids[0]]) == {}
    assert rt.mirror.vector(ids[0]) is None and rt.mirror.live_count == 2
    assert client.delete(f"/api/images/{ids[0]}").status_code == 404


def test_browse_pages_newest_first_without_gaps(api):
    client, _rt = api
    res = upload(client, [(f"n{i}.png", mk.noise_png(100 + i, 32)) for i in range(7)])
    ids = [o["id"] for o in res.json()["files"]]
    seen, cursor = [], None
    while True:
        page = client.get("/api/images", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen.extend(i["id"] for i in page["images"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(ids, reverse=True)
    assert client.get("/api/images", params={"state": "ready"}).json()["images"] == []
    assert (
        client.get("/api/images", params={"cursor": "forged.cursor"}).json()["error"]["code"] == "bad_cursor"
    )
    assert client.get("/api/images", params={"limit": 0}).status_code == 400


def test_add_vectors_writes_what_the_worker_writes(api):
    _, rt = api
    vecs = np.random.default_rng(0).normal(size=(5, rt.clip.dim)).astype(np.float32)
    ids = rt.ingest.add_vectors(vecs)
    assert rt.repo.counts_by_state()["ready"] == 5
    assert set(rt.vectors.retrieve(rt.collection, ids)) == set(ids)
    assert [c.image_id for c in rt.repo.changes_since(rt.mirror.model_version_id, 0, 10)] == ids
    assert rt.mirror.live_count == 5
