"""Restarts and crashes: nothing acknowledged is lost, nothing deleted comes back, the model choice sticks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loupe.config import Settings
from loupe.errors import ConfigError, DataDirLocked
from loupe.models.clip import DEMO_MODEL_NAME, demo_model_dir
from loupe.runtime import Runtime
from tests.fixtures import images as mk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Only the settings given here: nothing leaks in from the environment running the tests.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
        full_env = {**inherited, "LOUPE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", **env}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loupe.cli", "serve", "--port", str(self.port)],
            env=full_env,
            stdout=open(log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        # One client: httpx.get builds one, TLS context and all, per call.
        with httpx.Client(timeout=2) as poll:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                    )
                try:
                    res = poll.get(self.url + "/api/health")
                    if res.status_code == 200:
                        return res.json()
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"server not healthy in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.mark.slow
def test_kill_9_during_ingest_then_restart_every_accepted_image_becomes_ready(
    tmp_path: Path, tiny_clip_dir: Path
):
    data = tmp_path / "data"
    env = {
        "LOUPE_CLIP_MODEL": str(tiny_clip_dir),
        "LOUPE_INGEST__BATCH_SIZE": "4",
        "LOUPE_OCR__ENABLED": "false",
    }
    server = Server(data, env, tmp_path / "server.log")
    accepted: set[int] = set()
    try:
        server.wait_healthy()
        # Large noisy PNGs make decoding and thumbnails slow enough that the kill lands mid-ingest.
        for batch in range(4):
            files = [
                ("file", (f"b{batch}-{i}.png", mk.noise_png(batch * 100 + i, 900), "image/png"))
                for i in range(15)
            ]
            res = httpx.post(server.url + "/api/images", files=files, timeout=60)
            assert res.status_code == 200
            accepted |= {f["id"] for f in res.json()["files"] if f["status"] == "accepted"}
        server.kill9()
    finally:
        server.stop()
    assert len(accepted) == 60
    with sqlite3.connect(data / "loupe.db") as db:
        ready_at_kill = db.execute("select count(*) from images where state='ready'").fetchone()[0]
    assert ready_at_kill < len(accepted), "the kill came too late to test anything"

    server = Server(data, env, tmp_path / "server2.log")
    try:
        server.wait_healthy()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = httpx.get(server.url + "/api/health").json()["counts"]
            if counts["ready"] == len(accepted):
                break
            time.sleep(0.5)
        health = httpx.get(server.url + "/api/health").json()
        assert health["counts"] == {"pending": 0, "processing": 0, "ready": 60, "failed": 0}
        assert health["stores"]["mirror"]["vectors"] == 60
        ids = {
            h["id"]
            for h in httpx.post(
                server.url + "/api/search", json={"query": [{"text": "noise"}], "limit": 100}
            ).json()["hits"]
        }
        assert ids == accepted
    finally:
        server.stop()
    rt = Runtime.open(Settings(data_dir=data, clip_model=str(tiny_clip_dir), ocr={"enabled": False}))  # type: ignore[arg-type]
    try:
        # No orphans: one original and one vector per image.
        assert sum(1 for _ in rt.blobs.iter_originals()) == 60
        assert rt.vectors.count(rt.collection) == 60
    finally:
        rt.close()


def test_a_deleted_image_never_comes_back_also_after_a_crash_and_restart(make_settings, runtime_factory):
    settings = make_settings(qdrant_edge_compact=3)  # the restart also compacts the embedded store
    rt = runtime_factory(settings)
    ids = [o.id for o in rt.ingest.upload([(f"{i}.png", mk.noise_png(i, 48)) for i in range(6)])]
    rt.ingest.drain()
    assert rt.health()["stores"]["vectors_uncompacted"] == 6  # held on the heap until the next start
    rt.mirror.save()  # the saved mirror still holds the image deleted below
    rt.ingest.delete(ids[2])
    q = {"query": [{"image_id": ids[1]}], "limit": 10}
    from loupe.search.query import SearchRequest

    assert ids[2] not in [h.id for h in rt.search.search(SearchRequest(**q)).hits]
    # Crash: no orderly close, so the mirror on disk is stale. The next start replays the delete.
    rt.lock.release()
    rt.vectors.close()
    rt.closed = True
    rt2 = runtime_factory(settings)
    assert rt2.vectors.uncompacted_count(rt2.collection) == 0 and rt2.vectors.count(rt2.collection) == 5
    assert rt2.health()["stores"]["vectors_uncompacted"] == 0
    assert rt2.mirror.vector(ids[2]) is None
    assert ids[2] not in [h.id for h in rt2.search.search(SearchRequest(**q)).hits]
    assert len(rt2.search.search(SearchRequest(**q)).hits) == 5


def test_a_second_process_on_the_same_data_dir_is_refused(make_settings, runtime_factory):
    settings = make_settings()
    runtime_factory(settings)
    with pytest.raises(DataDirLocked, match="in use by another Loupe process"):
        Runtime.open(settings)


def test_offline_with_the_default_model_starts_on_the_demo_model(tmp_path: Path, tiny_clip_dir: Path):
    data = tmp_path / "data"
    # The demo model is trained once into the data directory; seed it from the test cache (same recipe).
    shutil.copytree(tiny_clip_dir, demo_model_dir(data))
    rt = Runtime.open(Settings(data_dir=data))  # type: ignore[call-arg]
    try:
        health = rt.health()
        assert health["model"]["demo"] is True and health["model"]["name"] == DEMO_MODEL_NAME
        assert health["status"] == "degraded"
        assert [w["code"] for w in health["warnings"]] == ["demo_model"]
    finally:
        rt.close()
    # The next start keeps the library on the demo model (its version lives in the database).
    rt = Runtime.open(Settings(data_dir=data))  # type: ignore[call-arg]
    try:
        assert rt.model_version.is_demo and rt.model_version.id == 1
    finally:
        rt.close()


def test_the_demo_fallback_is_loud_in_the_server_log_and_health(tmp_path: Path, tiny_clip_dir: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_clip_dir, demo_model_dir(data))
    server = Server(data, {}, tmp_path / "server.log")  # no LOUPE_CLIP_MODEL: the default, offline
    try:
        health = server.wait_healthy()
        assert health["model"]["demo"] is True and health["warnings"][0]["code"] == "demo_model"
    finally:
        server.stop()
    assert "OFFLINE DEMO MODEL" in (tmp_path / "server.log").read_text()


def test_a_configured_model_that_cannot_load_stops_the_start_naming_the_setting(tmp_path: Path):
    with pytest.raises(ConfigError, match="LOUPE_CLIP_MODEL"):
        Runtime.open(Settings(data_dir=tmp_path / "d", clip_model="someone/not-a-real-model"))  # type: ignore[arg-type]
    bad_dir = tmp_path / "not-a-checkpoint"
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="LOUPE_CLIP_MODEL"):
        Runtime.open(Settings(data_dir=tmp_path / "d2", clip_model=str(bad_dir)))  # type: ignore[arg-type]
    proc = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "serve", "--port", str(free_port())],
        env={
            **os.environ,
            "LOUPE_DATA_DIR": str(tmp_path / "d3"),
            "LOUPE_CLIP_MODEL": "someone/not-a-real-model",
            "HF_HUB_OFFLINE": "1",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "LOUPE_CLIP_MODEL" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_different_model_for_an_existing_library_is_refused(
    make_settings, runtime_factory, tmp_path: Path, tiny_clip_dir: Path
):
    settings = make_settings()
    runtime_factory(settings).close()
    other = tmp_path / "other-model"
    shutil.copytree(tiny_clip_dir, other)
    with pytest.raises(ConfigError, match="loupe model use"):
        Runtime.open(settings.model_copy(update={"clip_model": str(other)}))


@pytest.mark.slow
def test_kill_9_during_a_bulk_job_loses_nothing_acknowledged_and_leaves_no_orphans(
    tmp_path: Path, tiny_clip_dir: Path
):
    import io
    import zipfile

    data = tmp_path / "data"
    env = {
        "LOUPE_CLIP_MODEL": str(tiny_clip_dir),
        "LOUPE_OCR__ENABLED": "false",
        "LOUPE_INGEST__BATCH_SIZE": "4",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(40):
            zf.writestr(f"big/{i}.png", mk.noise_png(700 + i, 700))
    server = Server(data, env, tmp_path / "bulk1.log")
    try:
        server.wait_healthy()
        res = httpx.post(
            server.url + "/api/images/bulk",
            files=[("archive", ("a.zip", buf.getvalue(), "application/zip"))],
            timeout=120,
        )
        assert res.status_code == 202
        job_id = res.json()["job_id"]
        server.kill9()  # right after the 202: the job's files and the images' embeddings are still under way
    finally:
        server.stop()
    with sqlite3.connect(data / "loupe.db") as db:
        processed = db.execute("select processed from jobs where id=?", (job_id,)).fetchone()[0]
        ready = db.execute("select count(*) from images where state='ready'").fetchone()[0]
    assert processed < 40 or ready < 40, "the kill came too late to test anything"

    server = Server(data, env, tmp_path / "bulk2.log")
    try:
        server.wait_healthy()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
            counts = httpx.get(server.url + "/api/health").json()["counts"]
            if job["state"] == "done" and counts["ready"] == 40:
                break
            time.sleep(0.5)
        assert job["state"] == "done" and job["processed"] == 40
        # A step's rows commit with the job's progress: no file the kill interrupted comes back as a duplicate.
        assert (job["accepted"], job["duplicates"], job["rejected"]) == (40, 0, 0)
        assert counts == {"pending": 0, "processing": 0, "ready": 40, "failed": 0}
    finally:
        server.stop()
    assert not (data / "staging" / job_id).exists()  # the archive is gone once the job is done
    rt = Runtime.open(Settings(data_dir=data, clip_model=str(tiny_clip_dir), ocr={"enabled": False}))  # type: ignore[arg-type]
    try:
        from loupe.ingest.reindex import check

        report = check(rt)
        assert report.clean, report.to_dict()  # no orphan files or vectors
    finally:
        rt.close()


def test_sigterm_finishes_in_flight_work_and_a_restart_resumes(tmp_path: Path, tiny_clip_dir: Path):
    data = tmp_path / "data"
    env = {
        "LOUPE_CLIP_MODEL": str(tiny_clip_dir),
        "LOUPE_OCR__ENABLED": "false",
        "LOUPE_INGEST__BATCH_SIZE": "2",
    }
    server = Server(data, env, tmp_path / "term1.log")
    try:
        server.wait_healthy()
        files = [("file", (f"{i}.png", mk.noise_png(800 + i, 600), "image/png")) for i in range(20)]
        assert httpx.post(server.url + "/api/images", files=files, timeout=60).json()["accepted"] == 20
        server.proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal: -15 is the clean exit for SIGTERM.
        assert server.proc.wait(60) in (0, -15)
        assert "Application shutdown complete" in server.log.read_text()
    finally:
        server.stop()
    server = Server(data, env, tmp_path / "term2.log")
    try:
        server.wait_healthy()
        for _ in range(240):
            if httpx.get(server.url + "/api/health").json()["counts"]["ready"] == 20:
                break
            time.sleep(0.5)
        assert httpx.get(server.url + "/api/health").json()["counts"]["ready"] == 20
    finally:
        server.stop()
