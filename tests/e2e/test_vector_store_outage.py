"""A Qdrant server that goes away and comes back (LOUPE_QDRANT_URL: a closed loopback port, then the
qdrant-client stand-in): searches keep working from the FAISS mirror, what needs Qdrant answers 503, uploads
are queued without burning their attempts, and everything catches up when it returns."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from litestar.testing import TestClient

from loupe.app import create_app
from loupe.runtime import Runtime
from tests.e2e.conftest import upload
from tests.fixtures.images import shape_set


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_qdrant_down_then_back(make_settings, tmp_path: Path):
    up = make_settings(qdrant_url=f"local:{tmp_path / 'qdrant'}", ingest={"retry_base_s": 0})
    down = up.model_copy(update={"qdrant_url": f"http://127.0.0.1:{closed_port()}"})
    first, later = shape_set(per_class=1, seed=61)[:10], shape_set(per_class=1, seed=62)[10:13]

    rt = Runtime.open(up)
    with TestClient(create_app(up, runtime=rt)) as client:
        ids = [o["id"] for o in upload(client, [(s.name, s.data) for s in first]).json()["files"]]
        rt.ingest.drain()
        assert client.get("/api/health").json()["stores"]["vectors_status"] == "ok"
    rt.close()

    # Qdrant is down: Loupe starts anyway and serves searches from the mirror.
    rt = Runtime.open(down)
    with TestClient(create_app(down, runtime=rt)) as client:
        assert client.get("/api/health").json()["stores"]["vectors_status"] == "unavailable"
        hits = client.post("/api/search", json={"query": [{"text": "a red circle"}], "limit": 20}).json()[
            "hits"
        ]
        assert {h["id"] for h in hits} == set(ids)
        similar = client.get(f"/api/images/{ids[0]}/similar").json()["hits"]
        assert ids[0] not in {h["id"] for h in similar} and len(similar) == len(ids) - 1
        filtered = client.post(
            "/api/search", json={"query": [{"text": "a square"}], "filters": {"format": ["PNG"]}}
        ).json()
        assert len(filtered["hits"]) == len(ids)
        # Uploads are accepted and wait: no attempt is spent while the store is unreachable.
        new = [o["id"] for o in upload(client, [(s.name, s.data) for s in later]).json()["files"]]
        report = rt.ingest.process_batch()
        assert report.unavailable and report.claimed == 0
        rows = rt.repo.get_images(new)
        assert {r.state for r in rows.values()} == {"pending"} and {r.attempts for r in rows.values()} == {0}
        # What only Qdrant could answer is a clear 503, not a 500.
        res = client.post("/api/search", json={"query": [{"image_id": new[0]}]})
        assert res.status_code == 503 and res.json()["error"]["code"] == "vector_store_unavailable"
        assert client.delete(f"/api/images/{ids[1]}").status_code == 204
    rt.close()

    # Back up: the queued images are embedded, the mirror catches up, reindex cleans the stray vector.
    rt = Runtime.open(up)
    try:
        time.sleep(1.2)  # released images wait out their short back-off
        rt.ingest.drain()
        assert rt.repo.counts_by_state()["ready"] == len(ids) - 1 + len(later)
        assert rt.mirror.live_count == len(ids) - 1 + len(later)
        from loupe.ingest.reindex import check

        assert check(rt).orphan_vectors == [ids[1]]
        assert check(rt, repair=True).repaired and check(rt).clean
    finally:
        rt.close()
