"""Bulk uploads as durable jobs, on SQLite and PostgreSQL: zips of hundreds of files with duplicates and bad
files, many-file uploads, hostile archives refused whole, and a restart in the middle that resumes."""

from __future__ import annotations

import io
import zipfile

import pytest
from litestar.testing import TestClient

import loupe.ingest.bulk as bulk_module
from loupe.runtime import Runtime
from tests.fixtures import images as mk
from tests.fixtures.images import shape_set


def make_zip(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def encrypted_zip() -> bytes:
    """Python cannot write encrypted zips: set the 'encrypted' flag bit in the local and central headers."""
    raw = bytearray(make_zip([("a.png", mk.png())], zipfile.ZIP_STORED))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.find(sig)
        raw[i + flag_at] |= 0x01
    return bytes(raw)


def post_zip(client: TestClient, data: bytes, **form: str):
    return client.post(
        "/api/images/bulk", files=[("archive", ("photos.zip", data, "application/zip"))], data=form
    )


def staged(rt: Runtime) -> list:
    root = rt.settings.data_dir / "staging"
    return list(root.iterdir()) if root.exists() else []


def test_a_zip_of_hundreds_with_duplicates_and_bad_files(api):
    client, rt = api
    shapes = shape_set(per_class=7, seed=41)  # 210 pictures
    entries = [(f"holiday/day{i % 3}/{s.name}", s.data) for i, s in enumerate(shapes)]
    entries += [(f"copies/{s.name}", s.data) for s in shapes[:10]]  # the same bytes again
    entries += [
        ("notes.txt", b"not a picture"),
        ("broken.png", mk.truncated(mk.noise_png(1, 96), 0.4)),
        ("empty.jpg", b""),
        ("__MACOSX/._x.png", b"junk"),
        ("holiday/.DS_Store", b"junk"),
    ]
    res = post_zip(client, make_zip(entries), tags="bulk", albums="Holiday")
    assert res.status_code == 202, res.text
    body = res.json()
    assert body["total"] == 210 + 10 + 3  # macOS junk and hidden files are skipped
    rt.bulk.drain()
    job = client.get(body["status_url"]).json()
    assert job["state"] == "done"
    assert (job["processed"], job["accepted"], job["duplicates"], job["rejected"]) == (223, 210, 10, 3)
    rejected = {f["name"]: f["error"]["code"] for f in job["files"] if f["status"] == "rejected"}
    assert rejected == {"notes.txt": "not_an_image", "broken.png": "corrupt_image", "empty.jpg": "empty_file"}
    first = {f["name"]: f["id"] for f in job["files"]}
    assert first[f"copies/{shapes[0].name}"] == first[f"holiday/day0/{shapes[0].name}"]
    assert staged(rt) == []  # the archive is removed once the job is done
    rt.ingest.drain()
    assert rt.repo.counts_by_state()["ready"] == 210
    detail = client.get(f"/api/images/{first[f'holiday/day1/{shapes[1].name}']}").json()
    assert (
        detail["tags"] == ["bulk"]
        and detail["albums"] == ["Holiday"]
        and detail["original_name"] == shapes[1].name
    )


def test_many_files_as_a_job(api):
    client, rt = api
    files = [("file", (f"n{i}.png", mk.noise_png(i, 32), "image/png")) for i in range(12)]
    res = client.post("/api/images/bulk", files=files)
    assert res.status_code == 202
    rt.bulk.drain()
    job = client.get(res.json()["status_url"]).json()
    assert (job["state"], job["accepted"]) == ("done", 12)
    assert client.get("/api/jobs/nope").status_code == 404


def test_a_step_that_fails_in_its_bookkeeping_records_none_of_its_files(api, monkeypatch):
    """A step's image rows and the job's progress commit together: a failure between them (here the job's
    update) leaves neither, so the retry accepts every file once instead of counting some as duplicates."""
    client, rt = api
    shapes = shape_set(per_class=1, seed=44)[:20]
    job_id = post_zip(client, make_zip([(s.name, s.data) for s in shapes])).json()["job_id"]

    def broken() -> None:
        raise RuntimeError("the database went away")

    with monkeypatch.context() as m:
        m.setattr(bulk_module, "utcnow", broken)
        with pytest.raises(RuntimeError):
            rt.bulk.step(batch=8)
    job, files = rt.bulk.get(job_id)
    assert job.processed == 0 and {f.status for f in files} == {"queued"}
    assert sum(rt.repo.counts_by_state().values()) == 0
    rt.bulk.drain()
    job, files = rt.bulk.get(job_id)
    assert (job.state, job.processed, job.accepted, job.duplicates) == ("done", 20, 20, 0)
    assert len({f.image_id for f in files}) == 20 and rt.repo.pending_count() == 20


def test_a_step_holds_its_files_in_memory_up_to_a_budget(api, monkeypatch):
    client, rt = api
    files = [("file", (f"b{i}.png", mk.noise_png(60 + i, 64), "image/png")) for i in range(5)]
    job_id = client.post("/api/images/bulk", files=files).json()["job_id"]
    monkeypatch.setattr(bulk_module, "STEP_BYTES", len(mk.noise_png(60, 64)) + 1)  # a little over one file
    assert [rt.bulk.step(batch=16) for _ in range(4)] == [2, 2, 1, 0]
    job, _ = rt.bulk.get(job_id)
    assert (job.state, job.accepted) == ("done", 5)


def test_a_disk_error_in_a_bulk_step_is_retried_not_blamed_on_the_file(api, monkeypatch):
    """Writing an original can fail for reasons of the machine (a full disk): the step fails whole and the
    next one takes its files again, none of them rejected as a corrupt entry."""
    client, rt = api
    shapes = shape_set(per_class=1, seed=45)[:12]
    job_id = post_zip(client, make_zip([(s.name, s.data) for s in shapes])).json()["job_id"]
    put = rt.ingest.blobs.put_original
    calls = 0

    def full_disk(sha256: str, data: bytes):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        return put(sha256, data)

    monkeypatch.setattr(rt.ingest.blobs, "put_original", full_disk)
    with pytest.raises(OSError):
        rt.bulk.step(batch=8)
    job, _ = rt.bulk.get(job_id)
    assert job.processed == 0 and sum(rt.repo.counts_by_state().values()) == 0
    rt.bulk.drain()
    job, _ = rt.bulk.get(job_id)
    assert (job.state, job.accepted, job.duplicates, job.rejected) == ("done", 12, 0, 0)


@pytest.mark.parametrize(
    ("name", "archive", "status", "code"),
    [
        ("zip-slip", make_zip([("../../outside.png", mk.png())]), 400, "zip_slip"),
        ("absolute", make_zip([("/etc/evil.png", mk.png())]), 400, "zip_slip"),
        ("bomb", make_zip([("huge.png", b"\0" * 60_000_000)]), 413, "zip_bomb"),
        ("encrypted", encrypted_zip(), 400, "encrypted_archive"),
        ("truncated", make_zip([("a.png", mk.noise_png(1, 64))])[:-40], 400, "bad_archive"),
        ("not-a-zip", b"PK but not really", 400, "bad_archive"),
        ("empty", make_zip([]), 400, "empty_archive"),
    ],
)
def test_hostile_archives_are_refused_whole(api, name, archive, status, code):
    client, rt = api
    res = post_zip(client, archive)
    assert res.status_code == status, res.text
    assert res.json()["error"]["code"] == code
    assert staged(rt) == []
    assert sum(rt.repo.counts_by_state().values()) == 0
    assert not (rt.settings.data_dir.parent / "outside.png").exists()


def test_a_restart_in_the_middle_of_a_bulk_job_resumes_and_finishes(api, make_settings, db_url):
    client, rt = api
    shapes = shape_set(per_class=2, seed=43)  # 60 files
    res = post_zip(client, make_zip([(s.name, s.data) for s in shapes]))
    job_id = res.json()["job_id"]
    rt.bulk.step(batch=25)
    job, _ = rt.bulk.get(job_id)
    assert (job.state, job.processed) == ("running", 25)
    # A crash: no orderly shutdown, the job stays running with its archive staged. (What the dying process
    # held goes with it: its lock and the embedded store's files.)
    rt.lock.release()  # type: ignore[union-attr]
    rt.vectors.close()
    rt.closed = True
    rt2 = Runtime.open(make_settings(database_url=db_url))
    try:
        rt2.bulk.drain()
        job, files = rt2.bulk.get(job_id)
        assert (job.state, job.processed, job.accepted) == ("done", 60, 60)
        assert all(f.status == "accepted" for f in files)
        rt2.ingest.drain()
        assert rt2.repo.counts_by_state()["ready"] == 60
    finally:
        rt2.close()
