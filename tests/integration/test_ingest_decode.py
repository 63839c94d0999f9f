"""The worker's decode stage runs in threads (decode threads before one model, or model workers that each decode
and embed a share of the batch): one picture that fails there in an unexpected way (here its thumbnail path is
taken by a directory, a real OSError from the file system) is retried on its own, and the rest of its batch is
indexed; both ways give the same vectors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.fixtures import images as mk


@pytest.mark.parametrize("model_workers", [1, 3])
def test_an_unexpected_failure_in_a_decode_thread_retries_only_that_picture(
    make_settings, runtime_factory, model_workers
):
    settings = make_settings(
        ingest={"decode_threads": 4, "retry_base_s": 0, "batch_size": 16, "model_workers": model_workers}
    )
    rt = runtime_factory(settings)
    shapes = mk.shape_set(per_class=1, seed=3)[:6]
    outcomes = rt.ingest.upload([(s.name, s.data) for s in shapes])
    ids = [o.id for o in outcomes]
    victim = rt.repo.get_image(ids[2])
    blocked = rt.blobs.thumbnail_path(victim.sha256)
    blocked.mkdir(parents=True)  # the thumbnail cannot be written over a directory

    report = rt.ingest.process_batch()
    assert (report.claimed, report.ready, report.retried, report.failed) == (6, 5, 1, 0)
    row = rt.repo.get_image(ids[2])
    assert (row.state, row.error_code) == ("pending", "decode_error")
    assert all(rt.repo.get_image(i).state == "ready" for i in ids if i != ids[2])
    assert rt.mirror.live_count == 5 and rt.mirror.vector(ids[2]) is None

    shutil.rmtree(blocked)
    assert rt.ingest.drain() == 1  # due again at once (retry_base_s 0), and now it goes through
    assert rt.repo.get_image(ids[2]).state == "ready" and blocked.is_file()
    assert rt.mirror.live_count == 6


def test_model_workers_give_the_vectors_of_one_model(make_settings, runtime_factory, tmp_path):
    """A batch split over model workers, each on its own torch thread, in the order of the batch: the same vectors
    as one model on all threads after the decode threads (and image ids stay paired with their vectors)."""
    shapes = mk.shape_set(per_class=1, seed=5)[:11]
    vectors = {}
    for workers in (1, 3):
        rt = runtime_factory(
            make_settings(
                data_dir=tmp_path / f"w{workers}", ingest={"model_workers": workers, "batch_size": 16}
            )
        )
        assert rt.ingest._model_workers(11)[0] == workers
        ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
        assert rt.ingest.drain() == 11
        vectors[workers] = np.stack([rt.mirror.vector(i) for i in ids])
    assert np.allclose(vectors[1], vectors[3], atol=1e-5)
    # Eleven different pictures, not one repeated.
    assert len({v.tobytes() for v in vectors[3].round(3)}) == 11


def test_the_image_tower_runs_as_a_trace_with_eager_modes_vectors(tiny_clip_dir, monkeypatch, caplog):
    """On the CPU the image tower is a TorchScript trace (one call per pass, the GIL released throughout): the
    vectors of eager mode at any batch size; where tracing fails, eager mode serves and the log says why."""
    import torch

    from loupe.models.clip import load_clip, pooled
    from loupe.models.vectors import normalize

    clip = load_clip(str(tiny_clip_dir))
    assert clip._image_tower is not None
    rng = np.random.default_rng(3)
    side = clip._sizes[1]
    for n in (1, 5):
        batch = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
        with torch.inference_mode():
            eager = normalize(
                pooled(clip.model.get_image_features(pixel_values=clip.pixel_values(batch))).numpy()
            )
        np.testing.assert_allclose(clip.embed_uint8(batch), eager, atol=1e-6)

    def no_trace(*args, **kwargs):
        raise RuntimeError("tracing unsupported here")

    monkeypatch.setattr(torch.jit, "trace", no_trace)
    untraced = load_clip(str(tiny_clip_dir))
    assert untraced._image_tower is None and "image tower could not be traced" in caplog.text
    np.testing.assert_allclose(untraced.embed_uint8(batch), eager, atol=1e-6)


def test_a_pipelined_run_indexes_every_batch_and_gives_way_to_a_waiting_delete(
    make_settings, runtime_factory
):
    """`process_batches` finishes each batch (upsert, commit, mirror) beside the next one's decoding: every
    picture ends ready with its vector and thumbnail. A delete that waits for the model lock ends the run after
    the batch in hand, and the deleted picture (still pending then) is not brought back by a later batch."""
    import threading

    rt = runtime_factory(make_settings(ingest={"batch_size": 2}))
    shapes = mk.shape_set(per_class=1, seed=5)[:12]
    ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
    victim = ids[-1]  # claimed last: still pending when the delete gets the lock
    deleted = threading.Event()
    deleter = threading.Thread(target=lambda: (rt.ingest.delete(victim), deleted.set()))

    def stop() -> bool:  # called by the run, lock held, after each batch is handed to the finishing thread
        if not deleter.is_alive() and not deleted.is_set():
            deleter.start()
            while not rt.ingest.model_lock.contended:
                threading.Event().wait(0.001)
        return False

    reports = rt.ingest.process_batches(stop=stop)
    deleter.join(30)
    assert deleted.is_set()
    assert len(reports) == 1 and reports[0].ready == 2  # the run gave way after its first batch
    assert rt.repo.get_image(victim) is None

    assert rt.ingest.drain() == 9
    rows = [rt.repo.get_image(i) for i in ids[:-1]]
    assert all(r.state == "ready" for r in rows)
    assert all(rt.blobs.thumbnail_path(r.sha256).is_file() for r in rows)
    assert rt.vectors.count(rt.collection) == 11 and rt.mirror.live_count == 11
    assert rt.mirror.vector(victim) is None and rt.repo.counts_by_state().get("pending", 0) == 0


def test_model_workers_are_lanes_that_do_not_wait_for_each_other(make_settings, runtime_factory, monkeypatch):
    """With model workers, `process_batches` runs each as a lane of its own (claim a share of a batch, prepare and
    embed it, hand it to the finishing thread): while one lane waits on a slow read of one picture, the other
    lane goes on claiming and indexing the rest. (Split into shares of one batch, nothing would be indexed until
    the slow picture arrived.) Then the held lane finishes and the run reports that nothing is left."""
    import threading
    import time

    rt = runtime_factory(make_settings(ingest={"batch_size": 4, "model_workers": 2}))
    assert rt.ingest._model_workers(4) == (2, max(1, rt.clip.threads // 2))
    shapes = mk.shape_set(per_class=1, seed=5)[:12]
    ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
    held = rt.repo.get_image(ids[0]).sha256  # in the first share claimed (ids are claimed in order)
    release = threading.Event()
    read = rt.blobs.read_original

    def slow_read(sha256: str) -> bytes:  # a slow disk under one picture
        if sha256 == held:
            assert release.wait(60)
        return read(sha256)

    monkeypatch.setattr(rt.blobs, "read_original", slow_read)
    got: dict[str, list] = {}
    runner = threading.Thread(target=lambda: got.setdefault("reports", rt.ingest.process_batches()))
    runner.start()
    deadline = time.monotonic() + 60
    while rt.repo.counts_by_state().get("ready", 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    ready_while_held = rt.repo.counts_by_state().get("ready", 0)
    assert rt.repo.get_image(ids[0]).state == "processing"
    release.set()
    runner.join(60)
    assert ready_while_held == 10  # all but the held share of 2
    reports = got["reports"]
    assert sum(r.ready for r in reports) == 12 and all(r.claimed <= 2 for r in reports)
    assert reports[-1].claimed == 0  # every lane ended on an empty claim: nothing is due
    assert all(rt.repo.get_image(i).state == "ready" for i in ids) and rt.mirror.live_count == 12


def test_a_lane_that_fails_ends_the_run_and_loses_no_picture(make_settings, runtime_factory, monkeypatch):
    """A lane whose claim fails (the database gone for a moment) ends the run with that error, but only after
    every batch in hand, its own and the other lane's, is finished: no picture is left `processing` to wait for
    its lease, and the next run indexes the rest."""
    rt = runtime_factory(make_settings(ingest={"batch_size": 4, "model_workers": 2}))
    shapes = mk.shape_set(per_class=1, seed=5)[:12]
    ids = [o.id for o in rt.ingest.upload([(s.name, s.data) for s in shapes])]
    claim = rt.repo.claim_pending
    calls = iter(range(10**6))

    def failing_claim(*args, **kwargs):
        if next(calls) == 2:  # the first lane back from its first share
            raise RuntimeError("database connection lost")
        return claim(*args, **kwargs)

    monkeypatch.setattr(rt.repo, "claim_pending", failing_claim)
    with pytest.raises(RuntimeError, match="connection lost"):
        rt.ingest.process_batches()
    states = rt.repo.counts_by_state()
    assert states.get("processing", 0) == 0
    assert 4 <= states.get("ready", 0) < 12 and states["ready"] + states.get("pending", 0) == 12
    assert rt.mirror.live_count == states["ready"]
    monkeypatch.setattr(rt.repo, "claim_pending", claim)
    assert rt.ingest.drain() == 12 - states["ready"]
    assert all(rt.repo.get_image(i).state == "ready" for i in ids) and rt.mirror.live_count == 12


def test_a_query_picture_is_prepared_as_ingest_prepares_it(make_settings, runtime_factory):
    """A 1 MP JPEG (decoded at a reduced DCT scale, thumbnailed, resized from the thumbnail) uploaded to the
    library and the same bytes prepared as a query picture (POST /api/search/image) give the same vector."""
    import io

    from PIL import Image

    from loupe.ingest.service import query_pixels

    rt = runtime_factory(make_settings())
    shape = mk.shape_set(per_class=1, seed=9)[4]
    big = Image.open(io.BytesIO(shape.data)).convert("RGB").resize((1152, 864), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    [outcome] = rt.ingest.upload([("big.jpg", buf.getvalue())])
    assert rt.ingest.drain() == 1
    query = rt.clip.embed_uint8(query_pixels(buf.getvalue(), rt.clip, rt.settings.ingest)[None])[0]
    np.testing.assert_allclose(query, rt.mirror.vector(outcome.id), atol=1e-5)


def test_a_read_only_picture_array_embeds_without_a_torch_warning(tiny_clip_dir):
    """np.asarray of a Pillow image is read-only; torch.from_numpy warns on those (once per process, in a
    server's log at its first image query), so pixel_values copies them and leaves the caller's array alone."""
    import warnings

    from PIL import Image

    from loupe.models.clip import load_clip

    clip = load_clip(str(tiny_clip_dir))
    side = clip.input_side
    pixels = np.asarray(Image.new("RGB", (side, side), (200, 30, 30)))[None]
    assert not pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = clip.pixel_values(pixels)
    assert tuple(got.shape) == (1, 3, side, side) and not pixels.flags.writeable
