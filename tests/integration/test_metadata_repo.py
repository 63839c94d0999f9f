"""The metadata repository on SQLite and PostgreSQL: identity, the ingest queue, the change log."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from loupe.storage.metadata.engine import create_db_engine, upgrade
from loupe.storage.metadata.repo import MetadataRepo, NewImage
from loupe.storage.metadata.tables import ChangeOp, ImageState, utcnow


@pytest.fixture
def repo(db_url: str):
    engine = create_db_engine(db_url)
    upgrade(engine)
    yield MetadataRepo(engine)
    engine.dispose()


def new(n: int, tags: tuple[str, ...] = ()) -> NewImage:
    return NewImage(
        sha256=f"{n:064x}",
        original_name=f"{n}.png",
        format="PNG",
        mime="image/png",
        size_bytes=10,
        width=4,
        height=3,
        frames=1,
        tags=tags,
    )


def test_same_bytes_twice_are_one_image(repo: MetadataRepo):
    first, created = repo.insert_image(new(1, ("a", "b", "a")))
    again, created_again = repo.insert_image(new(1))
    assert created and not created_again
    assert again.id == first.id
    assert repo.tags_for([first.id]) == {first.id: ["a", "b"]}


def test_many_images_in_one_transaction_answer_in_order_with_duplicates(repo: MetadataRepo):
    [(stored, _)] = repo.insert_images([new(1)])
    batch = [new(2, ("x",)), new(1, ("ignored",)), new(3), new(2, ("y",))]
    result = repo.insert_images(batch)
    assert [created for _, created in result] == [True, False, True, False]
    assert result[1][0] == stored and result[3][0] == result[0][0]
    assert len({i for i, _ in result}) == 3
    # Tags come with the first copy of new bytes only; a duplicate leaves the stored row as it was.
    assert repo.tags_for([stored, result[0][0]]) == {stored: [], result[0][0]: ["x"]}
    assert repo.pending_count() == 3


def test_what_runs_in_the_insert_transaction_lands_with_it_or_neither_does(repo: MetadataRepo):
    seen: list[list[tuple[int, bool]]] = []

    def fail(_s, result):
        seen.append(result)
        raise RuntimeError("the caller's own bookkeeping failed")

    with pytest.raises(RuntimeError):
        repo.insert_images([new(5), new(6)], then=fail)
    assert [created for _, created in seen[0]] == [True, True]
    assert repo.existing_hashes([new(5).sha256, new(6).sha256]) == {} and repo.pending_count() == 0
    result = repo.insert_images([new(5), new(6)], then=lambda s, r: seen.append(r))
    assert seen[-1] == result and [c for _, c in result] == [True, True]


def test_racing_inserts_of_the_same_bytes_make_one_row(repo: MetadataRepo):
    barrier = threading.Barrier(4)
    results: dict[int, list[tuple[int, bool]]] = {}

    def worker(k: int) -> None:
        barrier.wait()
        files = [new(100 + k), new(200), new(300)]  # two of them shared, in opposite orders
        results[k] = repo.insert_images(files if k % 2 else files[::-1])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    names: dict[int, tuple[object, ...]] = {0: (300, 200, "own"), 1: ("own", 200, 300)}
    by_sha = [dict(zip(names[k % 2], r, strict=True)) for k, r in results.items()]
    for shared in (200, 300):
        assert len({r[shared][0] for r in by_sha}) == 1  # every caller got the one row's id
        assert sum(r[shared][1] for r in by_sha) == 1  # and exactly one of them created it
    assert all(r["own"][1] for r in by_sha) and repo.pending_count() == 6


def test_ids_are_increasing_integers_and_browse_is_newest_first(repo: MetadataRepo):
    ids = [repo.insert_image(new(i))[0].id for i in range(1, 8)]
    assert ids == sorted(ids)
    page = repo.browse(before_id=None, limit=3)
    assert [p.id for p in page] == ids[::-1][:3]
    page2 = repo.browse(before_id=page[-1].id, limit=10)
    assert [p.id for p in page2] == ids[::-1][3:]


def test_concurrent_claims_never_hand_out_the_same_image(repo: MetadataRepo):
    for i in range(1, 61):
        repo.insert_image(new(i))
    claimed: list[list[int]] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        mine: list[int] = []
        while batch := repo.claim_pending(5, lease_s=600):
            mine.extend(int(b.id) for b in batch)
        claimed.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for part in claimed for i in part]
    assert len(flat) == 60 and len(set(flat)) == 60
    assert repo.counts_by_state()["processing"] == 60


def test_pending_count_counts_only_what_waits(repo: MetadataRepo):
    for i in range(1, 8):
        repo.insert_image(new(i))
    assert repo.pending_count() == 7
    assert len(repo.claim_pending(3, lease_s=600)) == 3
    assert repo.pending_count() == 4 == repo.counts_by_state()["pending"]


def test_a_stale_claim_is_taken_back_after_the_lease(repo: MetadataRepo):
    image, _ = repo.insert_image(new(1))
    assert [i.id for i in repo.claim_pending(10, lease_s=600)] == [image.id]
    assert repo.claim_pending(10, lease_s=600) == []
    # With a lease of zero seconds the claim is already stale: another worker may take it.
    again = repo.claim_pending(10, lease_s=0)
    assert [i.id for i in again] == [image.id]
    assert again[0].attempts == 2


def test_release_claims_puts_interrupted_work_back_in_the_queue(repo: MetadataRepo):
    for i in range(1, 4):
        repo.insert_image(new(i))
    repo.claim_pending(10, lease_s=600)
    assert repo.release_claims() == 3
    assert repo.counts_by_state()["pending"] == 3


def test_failures_wait_for_their_retry_time_then_fail_for_good(repo: MetadataRepo):
    image, _ = repo.insert_image(new(1))
    repo.claim_pending(1, 600)
    repo.mark_failed(image.id, "decode_error", "boom", retry_at=utcnow() + timedelta(hours=1))
    assert repo.claim_pending(1, 600) == []  # not due yet
    assert repo.get_image(image.id).state == ImageState.pending
    repo.mark_failed(image.id, "decode_error", "boom", retry_at=utcnow() - timedelta(seconds=1))
    assert [i.id for i in repo.claim_pending(1, 600)] == [image.id]
    repo.mark_failed(image.id, "decode_error", "boom", retry_at=None)
    row = repo.get_image(image.id)
    assert (row.state, row.error_code) == (ImageState.failed, "decode_error")


def test_ready_and_delete_are_logged_in_order(repo: MetadataRepo):
    a, _ = repo.insert_image(new(1))
    b, _ = repo.insert_image(new(2))
    repo.mark_ready([a.id, b.id], model_version_id=1, updates={a.id: {"width": 30, "height": 20}})
    assert repo.get_image(a.id).width == 30
    repo.delete_image(a.id, model_version_id=1)
    changes = repo.changes_since(1, 0, 100)
    assert [(c.image_id, c.op) for c in changes] == [
        (a.id, ChangeOp.upsert),
        (b.id, ChangeOp.upsert),
        (a.id, ChangeOp.delete),
    ]
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    assert repo.count_changes_since(1, changes[0].seq) == 2
    assert repo.changes_since(2, 0, 100) == []  # another model version's log is separate
    assert repo.get_image(a.id) is None and repo.tags_for([a.id]) == {a.id: []}


def test_a_batch_is_claimed_in_id_order_and_marked_ready_with_each_pictures_own_metadata(repo: MetadataRepo):
    images = [repo.insert_image(new(n))[0] for n in range(1, 5)]
    claimed = repo.claim_pending(10, lease_s=600)
    assert [i.id for i in claimed] == [i.id for i in images]
    assert all(i.state == ImageState.processing and i.attempts == 1 for i in claimed)
    a, b, c, gone = (int(i.id) for i in claimed)  # type: ignore[arg-type]
    repo.delete_image(gone, model_version_id=None)  # deleted while its batch was being embedded
    taken = utcnow().replace(microsecond=0) - timedelta(days=400)
    updates = {
        # Pictures of one batch write different columns (EXIF or none): each keeps its own.
        a: {"phash": 1234567890123, "taken_at": taken, "camera_make": "Acme", "exif": {"Make": "Acme"}},
        b: {"phash": -42},
        gone: {"phash": 7},
    }
    repo.mark_ready([a, b, c, gone], model_version_id=3, updates=updates)
    rows = {i: repo.get_image(i) for i in (a, b, c)}
    assert all(r.state == ImageState.ready and r.ready_at and r.claimed_at is None for r in rows.values())
    assert (rows[a].phash, rows[a].camera_make, rows[a].exif) == (1234567890123, "Acme", {"Make": "Acme"})
    assert rows[a].taken_at is not None and rows[a].taken_at.timestamp() == taken.timestamp()
    assert (rows[b].phash, rows[b].camera_make, rows[b].taken_at) == (-42, None, None)
    assert rows[c].phash is None
    assert repo.get_image(gone) is None
    # Only the pictures that still exist are logged for the mirror.
    assert [(ch.image_id, ch.op) for ch in repo.changes_since(3, 0, 100)] == [
        (a, ChangeOp.upsert),
        (b, ChangeOp.upsert),
        (c, ChangeOp.upsert),
    ]


def test_first_model_is_recorded_once(repo: MetadataRepo):
    v1 = repo.activate_first_model("clip", "m1", "f1", 64, False)
    v2 = repo.activate_first_model("clip", "m2", "f2", 32, True)
    assert v2.id == v1.id and repo.active_model("clip").name == "m1"
