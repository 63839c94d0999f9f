"""Pictures prepared in worker processes (ingest.prepare_processes, the default on a GPU): the same vectors,
thumbnails, metadata and OCR text as the decode threads give; a picture that cannot be decoded or whose original is
gone fails alone, with the same codes; and the workers end with the runtime."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np

from loupe.ingest.prepare_pool import prepare_processes
from tests.fixtures import images as mk
from tests.fixtures.text_images import text_picture


def ingest(rt, files):  # type: ignore[no-untyped-def]
    ids = [o.id for o in rt.ingest.upload(files)]
    rt.ingest.drain()
    return ids


def test_workers_give_what_the_decode_threads_give(make_settings, runtime_factory, tmp_path):
    shapes = mk.shape_set(per_class=1, seed=11)[:9]
    words = text_picture(["QUARTERLY BUDGET", "MEETING NOTES"], seed=4)
    files = [
        *((s.name, s.data) for s in shapes),
        ("photo.jpg", mk.jpeg(640, 480)),
        ("turned.jpg", mk.exif_rotated_jpeg()),
        (words.name, words.data),
    ]
    seen = {}
    for processes in (0, 2):
        rt = runtime_factory(
            make_settings(
                data_dir=tmp_path / f"p{processes}",
                ocr={"enabled": True},
                ingest={"model_workers": 1, "prepare_processes": processes, "batch_size": 8},
            )
        )
        ids = ingest(rt, files)
        rows = rt.repo.get_images(ids)
        assert all(rows[i].state == "ready" for i in ids), [(rows[i].state, rows[i].error_code) for i in ids]
        texts = rt.repo.get_texts(ids)
        seen[processes] = (
            np.stack([rt.mirror.vector(i) for i in ids]),
            [rt.blobs.thumbnail_path(rows[i].sha256).read_bytes() for i in ids],
            [(rows[i].phash, rows[i].width, rows[i].height) for i in ids],
            {k: t.content for k, t in texts.items() if t.content},
        )
    (v0, thumbs0, meta0, text0), (v2, thumbs2, meta2, text2) = seen[0], seen[2]
    assert np.allclose(v0, v2, atol=1e-6)
    assert thumbs0 == thumbs2 and meta0 == meta2
    assert len(text2) == 1 and "BUDGET" in next(iter(text2.values())).upper()
    assert list(text0.values()) == list(text2.values())


def test_a_picture_that_fails_in_a_worker_fails_alone_and_the_workers_end_with_the_runtime(
    make_settings, runtime_factory
):
    settings = make_settings(ingest={"model_workers": 1, "prepare_processes": 2, "retry_base_s": 0})
    rt = runtime_factory(settings)
    shapes = mk.shape_set(per_class=1, seed=12)[:4]
    bad = mk.jpeg_bad_scan()  # passes the upload's check, fails the full decode
    outcomes = rt.ingest.upload([*((s.name, s.data) for s in shapes), ("bad.jpg", bad)])
    ids = [o.id for o in outcomes]
    assert all(o.status == "accepted" for o in outcomes)
    gone = rt.repo.get_image(ids[1])
    rt.blobs.original_path(gone.sha256).unlink()

    rt.ingest.drain()
    rows = rt.repo.get_images(ids)
    assert [rows[i].state for i in ids] == ["ready", "failed", "ready", "ready", "failed"]
    assert rows[ids[1]].error_code == "blob_missing"
    assert rows[ids[4]].error_code == "decode_error"
    assert rt.mirror.live_count == 3

    workers = multiprocessing.active_children()
    assert len(workers) == 2
    rt.close()
    assert not any(w.is_alive() for w in workers)


def test_a_worker_that_dies_fails_its_batch_for_a_retry_and_a_new_pool_takes_over(
    make_settings, runtime_factory
):
    rt = runtime_factory(
        make_settings(ingest={"model_workers": 1, "prepare_processes": 1, "retry_base_s": 0, "batch_size": 4})
    )
    shapes = mk.shape_set(per_class=1, seed=13)[:4]
    ids = ingest(rt, [(s.name, s.data) for s in shapes[:2]])
    assert all(r.state == "ready" for r in rt.repo.get_images(ids).values())
    (worker,) = multiprocessing.active_children()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)

    more = ingest(rt, [(s.name, s.data) for s in shapes[2:]])
    rows = rt.repo.get_images(more)
    assert all(r.state == "ready" for r in rows.values()), [(r.state, r.error_code) for r in rows.values()]


def test_the_workers_start_before_the_first_batch_asks_for_them(make_settings, runtime_factory):
    """A server's ingest workers or an import start them first (a spawned worker takes seconds to import torch),
    so that the first batch does not wait for them."""
    rt = runtime_factory(make_settings(ingest={"model_workers": 1, "prepare_processes": 2}))
    assert multiprocessing.active_children() == []
    rt.ingest.start_prepare_pool()
    rt.ingest.start_prepare_pool()  # once
    assert len(multiprocessing.active_children()) == 2
    shapes = mk.shape_set(per_class=1, seed=14)[:2]
    ids = ingest(rt, [(s.name, s.data) for s in shapes])
    assert all(r.state == "ready" for r in rt.repo.get_images(ids).values())
    assert len(multiprocessing.active_children()) == 2  # the same workers served the batch


def test_processes_are_the_default_on_a_gpu_only(make_settings):
    ingest_settings = make_settings().ingest
    assert prepare_processes(ingest_settings, "cpu") == 0
    assert prepare_processes(ingest_settings, "cuda:0") == max(1, min(16, (os.cpu_count() or 1) - 2))
    assert prepare_processes(make_settings(ingest={"prepare_processes": 3}).ingest, "cpu") == 3
    assert prepare_processes(make_settings(ingest={"prepare_processes": 0}).ingest, "cuda") == 0
