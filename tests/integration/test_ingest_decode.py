"""The worker's decode stage runs in threads: one picture that fails there in an unexpected way (here its
thumbnail path is taken by a directory, a real OSError from the file system) is retried on its own, and the rest
of its batch is indexed."""

from __future__ import annotations

import shutil

from tests.fixtures import images as mk


def test_an_unexpected_failure_in_a_decode_thread_retries_only_that_picture(make_settings, runtime_factory):
    settings = make_settings(ingest={"decode_threads": 4, "retry_base_s": 0, "batch_size": 16})
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
