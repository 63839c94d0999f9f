"""`loupe import` straight into the data directory (ingest/importer.py): the model embeds what is stored while
the rest of the folder is still read and stored, every picture ends ready, and an import that fails midway stops
the embedding, keeps what it stored and runs again from there."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from rich.progress import Progress

from loupe.ingest import importer
from tests.fixtures import images as mk


def folder(root: Path, n: int, seed: int) -> list[Path]:
    root.mkdir(parents=True)
    paths = []
    for shape in mk.shape_set(per_class=2, seed=seed)[:n]:
        path = root / shape.name
        path.write_bytes(shape.data)
        paths.append(path)
    return paths


def counted(rt) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {state: n for state, n in rt.repo.counts_by_state().items() if n}


def test_a_direct_import_embeds_while_it_still_stores(make_settings, runtime_factory, tmp_path, monkeypatch):
    rt = runtime_factory(make_settings(ingest={"batch_size": 2}))
    paths = folder(tmp_path / "photos", 12, seed=7)
    monkeypatch.setattr(importer, "IMPORT_REQUEST", 4)
    upload = rt.ingest.upload
    ready_before: list[int] = []

    def watched_upload(files, tags=(), albums=(), **kwargs):  # type: ignore[no-untyped-def]
        if ready_before:  # from the second request on: the first request's pictures get embedded meanwhile
            deadline = time.monotonic() + 60
            while not rt.repo.counts_by_state().get("ready") and time.monotonic() < deadline:
                time.sleep(0.01)
        ready_before.append(rt.repo.counts_by_state().get("ready", 0))
        return upload(files, tags, albums, **kwargs)

    monkeypatch.setattr(rt.ingest, "upload", watched_upload)
    with Progress(disable=True) as progress:
        counts = importer.import_direct(rt, {("trip",): paths}, ["imported"], progress, senders=1)
    assert counts == {"accepted": 12, "duplicate": 0, "rejected": 0, "skipped": 0}
    assert ready_before[0] == 0 and ready_before[1] > 0, (
        ready_before
    )  # embedding began before the last request
    assert counted(rt) == {"ready": 12}
    assert rt.mirror.live_count == 12 and rt.vectors.count(rt.collection) == 12
    ids = list(rt.repo.existing_hashes(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths).values())
    assert all(
        rt.repo.tags_for(ids)[i] == ["imported"] and rt.repo.albums_for(ids)[i] == ["trip"] for i in ids
    )


def test_an_import_that_fails_midway_keeps_what_it_stored_and_runs_again(
    make_settings, runtime_factory, tmp_path, monkeypatch
):
    rt = runtime_factory(make_settings(ingest={"batch_size": 2}))
    paths = folder(tmp_path / "photos", 10, seed=8)
    monkeypatch.setattr(importer, "IMPORT_REQUEST", 4)
    gone = paths[5].rename(tmp_path / "elsewhere.png")  # in the second request: the folder changed under it
    embedding = threading.enumerate()
    with Progress(disable=True) as progress, pytest.raises(FileNotFoundError):
        importer.import_direct(rt, {(): paths}, [], progress, senders=1)
    assert threading.enumerate() == embedding  # the embedding thread ended too
    states = rt.repo.counts_by_state()
    assert states.get("processing", 0) == 0 and states.get("ready", 0) + states.get("pending", 0) == 4, states
    gone.rename(paths[5])
    with Progress(disable=True) as progress:
        counts = importer.import_direct(rt, {(): paths}, [], progress)
    assert counts == {"accepted": 6, "duplicate": 0, "rejected": 0, "skipped": 4}
    assert counted(rt) == {"ready": 10} and rt.mirror.live_count == 10


def test_requests_sent_at_once_store_every_file_once_and_a_failure_stops_the_rest(
    make_settings, runtime_factory, tmp_path, monkeypatch
):
    rt = runtime_factory(make_settings(ingest={"batch_size": 4}))
    paths = folder(tmp_path / "photos", 20, seed=10)
    monkeypatch.setattr(importer, "IMPORT_REQUEST", 2)
    upload = rt.ingest.upload
    at_once, peak, lock = [0], [0], threading.Lock()

    def slow_upload(files, tags=(), albums=(), **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            at_once[0] += 1
            peak[0] = max(peak[0], at_once[0])
        try:
            time.sleep(0.05)
            return upload(files, tags, albums, **kwargs)
        finally:
            with lock:
                at_once[0] -= 1

    monkeypatch.setattr(rt.ingest, "upload", slow_upload)
    gone = paths[13].rename(tmp_path / "elsewhere.png")
    with Progress(disable=True) as progress, pytest.raises(FileNotFoundError):
        importer.import_direct(rt, {("trip",): paths}, ["imported"], progress, senders=3)
    assert peak[0] > 1  # requests did go out side by side
    stored = sum(rt.repo.counts_by_state().values())
    assert (
        12 <= stored < 20
    )  # the requests before the failing one, and at most those already in flight after it
    gone.rename(paths[13])
    with Progress(disable=True) as progress:
        counts = importer.import_direct(rt, {("trip",): paths}, ["imported"], progress, senders=3)
    assert counts == {"accepted": 20 - stored, "duplicate": 0, "rejected": 0, "skipped": stored}
    assert counted(rt) == {"ready": 20} and rt.mirror.live_count == 20
    ids = list(rt.repo.existing_hashes(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths).values())
    assert len(ids) == 20 and all(rt.repo.albums_for(ids)[i] == ["trip"] for i in ids)


def test_pictures_an_import_says_are_coming_count_as_a_backlog(make_settings, runtime_factory):
    """The compiled image lanes start at a backlog (IngestService.when_backlog); an import embeds as it stores, so
    its backlog may never pile up: the pictures it is about to send count instead."""
    rt = runtime_factory(make_settings(ingest={"batch_size": 4, "model_workers": 2}))
    shapes = mk.shape_set(per_class=1, seed=9)[:6]
    fired: list[int] = []
    rt.ingest.when_backlog(10, lambda: fired.append(rt.repo.counts_by_state().get("pending", 0)))
    rt.ingest.upload([(s.name, s.data) for s in shapes[:3]])
    assert rt.ingest.drain() == 3 and fired == []
    rt.ingest.upload([(s.name, s.data) for s in shapes[3:]])
    assert rt.ingest.drain(coming=10) == 3 and fired == [3]


def test_lanes_wait_for_an_imports_uploads_instead_of_ending(make_settings, runtime_factory, monkeypatch):
    """While uploads are still coming (`feeding`), a lane whose claim finds nothing waits for them: both lanes
    embed what comes later, and the run ends only once the uploads have ended and nothing is due. (A lane that
    ended there left its core idle: the import ran 0.93x the rate of uploading first.)"""
    rt = runtime_factory(make_settings(ingest={"batch_size": 4, "model_workers": 2}))
    assert rt.ingest._model_workers(4)[0] == 2
    shapes = mk.shape_set(per_class=2, seed=10)[:16]
    start = rt.ingest._start_batch
    claimed_by: list[str] = []

    def watched_start(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = start(*args, **kwargs)
        if started.report.claimed:
            claimed_by.append(threading.current_thread().name)
        return started

    monkeypatch.setattr(rt.ingest, "_start_batch", watched_start)
    feeding = threading.Event()
    feeding.set()
    got: dict[str, list] = {}  # type: ignore[type-arg]
    runner = threading.Thread(
        target=lambda: got.setdefault("reports", rt.ingest.process_batches(feeding=feeding))
    )
    runner.start()

    def ready(n: int) -> None:
        deadline = time.monotonic() + 60
        while rt.repo.counts_by_state().get("ready", 0) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.repo.counts_by_state().get("ready", 0) == n

    rt.ingest.upload([(s.name, s.data) for s in shapes[:2]])  # one share: one lane finds nothing
    ready(2)
    time.sleep(0.2)
    assert runner.is_alive()  # no lane ended the run while uploads may come
    rt.ingest.upload([(s.name, s.data) for s in shapes[2:]])
    ready(16)
    feeding.clear()
    rt.ingest.work_available.set()
    runner.join(60)
    assert not runner.is_alive()
    assert sum(r.ready for r in got["reports"]) == 16 and got["reports"][-1].claimed == 0
    assert len(set(claimed_by)) == 2, claimed_by  # both lanes embedded


def test_a_drain_beside_uploads_ends_as_soon_as_they_end(make_settings, runtime_factory):
    """Once the uploads have ended during a run, the drain looks once more and returns: it does not wait for a
    wake-up (here up to 30 s, poll_s) that no upload will send (an import lost 1 s at its end that way)."""
    rt = runtime_factory(make_settings(ingest={"batch_size": 4, "model_workers": 2, "poll_s": 30}))
    shapes = mk.shape_set(per_class=1, seed=11)[:3]
    feeding = threading.Event()
    feeding.set()
    got: list[int] = []
    runner = threading.Thread(target=lambda: got.append(rt.ingest.drain(None, feeding=feeding)))
    runner.start()
    rt.ingest.upload([(s.name, s.data) for s in shapes])
    deadline = time.monotonic() + 60
    while rt.repo.counts_by_state().get("ready", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    feeding.clear()  # and no upload sets work_available after it
    runner.join(10)
    assert not runner.is_alive() and got == [3]
