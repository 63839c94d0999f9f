"""Schemathesis generates requests from Loupe's own OpenAPI schema: no request may get a 5xx, and every
response must match the schema's status codes."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from loupe.app import create_app
from loupe.runtime import Runtime
from tests.fixtures import images as mk


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir):
    from loupe.config import Settings

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        clip_model=str(tiny_clip_dir),
        ocr={"enabled": False},  # type: ignore[arg-type]
    )
    rt = Runtime.open(settings)
    rt.ingest.upload([(f"{i}.png", mk.noise_png(500 + i, 32)) for i in range(5)], ["fuzz"])
    rt.ingest.drain()
    yield create_app(settings, runtime=rt)
    rt.close()


def test_no_generated_request_gets_a_server_error(fuzz_app):
    # Driven by hand with Hypothesis: schemathesis' pytest plugin does not load under pytest 9.
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/api/docs/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])

        run()
