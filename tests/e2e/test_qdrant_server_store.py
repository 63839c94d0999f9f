"""The same app on the Qdrant server protocol (LOUPE_QDRANT_URL; qdrant-client's local mode stands in)."""

from __future__ import annotations

import shutil
from pathlib import Path

from litestar.testing import TestClient

from loupe.app import create_app
from loupe.runtime import Runtime
from tests.e2e.conftest import upload
from tests.fixtures.images import shape_set


def test_ingest_search_delete_and_rebuild_over_the_server_protocol(make_settings, tmp_path: Path):
    settings = make_settings(qdrant_url=f"local:{tmp_path / 'qdrant-local'}")
    shapes = shape_set(per_class=2, seed=21)
    rt = Runtime.open(settings)
    try:
        assert rt.vectors.kind == "qdrant-server"
        with TestClient(create_app(settings, runtime=rt)) as client:
            res = upload(client, [(s.name, s.data) for s in shapes])
            ids = {o["id"]: s for o, s in zip(res.json()["files"], shapes, strict=True)}
            rt.ingest.drain()
            assert rt.vectors.count(rt.collection) == len(shapes)
            hits = client.post("/api/search", json={"query": [{"text": "a blue square"}], "limit": 2}).json()[
                "hits"
            ]
            assert [(ids[h["id"]].colour, ids[h["id"]].shape) for h in hits] == [("blue", "square")] * 2
            gone = hits[0]["id"]
            assert client.delete(f"/api/images/{gone}").status_code == 204
            before = client.post(
                "/api/search", json={"query": [{"text": "a blue square"}], "limit": 10}
            ).json()["hits"]
            assert gone not in [h["id"] for h in before]
    finally:
        rt.close()
    # Lose the mirror: it is rebuilt from the Qdrant server's points.
    shutil.rmtree(settings.data_dir / "mirror")
    rt = Runtime.open(settings)
    try:
        assert rt.mirror.live_count == len(shapes) - 1
        with TestClient(create_app(settings, runtime=rt)) as client:
            after = client.post(
                "/api/search", json={"query": [{"text": "a blue square"}], "limit": 10}
            ).json()["hits"]
        assert [h["id"] for h in after] == [h["id"] for h in before]
    finally:
        rt.close()
