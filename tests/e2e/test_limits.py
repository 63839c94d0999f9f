"""Limits answer with clear errors: a search that runs past its timeout (504), more files than allowed in one
request (413), more terms than allowed (400), a page larger than allowed (400)."""

from __future__ import annotations

from litestar.testing import TestClient

from loupe.app import create_app
from loupe.runtime import Runtime
from tests.e2e.conftest import upload
from tests.fixtures import images as mk


def test_limits_have_clear_errors(make_settings):
    settings = make_settings(
        search={"timeout_s": 0.000001, "max_terms": 2}, ingest={"max_files_per_request": 3}
    )
    rt = Runtime.open(settings)
    try:
        with TestClient(create_app(settings, runtime=rt)) as client:
            res = client.post("/api/search", json={"query": [{"text": "a red circle"}]})
            assert res.status_code == 504 and res.json()["error"]["code"] == "search_timeout"
            assert "LOUPE_SEARCH__TIMEOUT_S" in res.json()["error"]["message"]
            res = upload(client, [(f"{i}.png", mk.noise_png(i, 16)) for i in range(4)])
            assert res.status_code == 413 and res.json()["error"]["code"] == "too_many_files"
            assert sum(rt.repo.counts_by_state().values()) == 0  # nothing half-written
            rt.settings.search.timeout_s = 30
            res = client.post("/api/search", json={"query": [{"text": "a"}, {"text": "b"}, {"text": "c"}]})
            assert res.status_code == 400 and "limit of 2" in res.json()["error"]["message"]
            assert (
                client.post("/api/search", json={"query": [{"text": "a"}], "limit": 5000}).status_code == 400
            )
            assert client.get("/api/images", params={"limit": 10_000}).status_code == 400
    finally:
        rt.close()
