"""The command line for models: `loupe finetune` on a library imported with `loupe import`, `loupe model use` to
switch to its result, `loupe model list`; clear one-line errors for what cannot work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loupe.runtime import DataDirLock
from tests.fixtures.images import shape_set


def loupe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loupe.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_finetune_then_model_use_then_list(tmp_path: Path, tiny_clip_dir: Path):
    root = tmp_path / "photos"
    for s in shape_set(3, seed=21):
        (root / f"{s.colour} {s.shape}").mkdir(parents=True, exist_ok=True)
        (root / f"{s.colour} {s.shape}" / s.name).write_bytes(s.data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(
        LOUPE_DATA_DIR=str(tmp_path / "data"), LOUPE_CLIP_MODEL=str(tiny_clip_dir), LOUPE_OCR__ENABLED="false"
    )
    assert loupe(env, "import", str(root), "--album-per-folder").returncode == 0

    out = loupe(env, "finetune", "--set", "steps=20", "--set", "max_regression=1.0")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["accepted"] and Path(report["output"]).is_dir() and report["steps"] == 40
    assert "loupe model use" in out.stderr

    bad = loupe(env, "finetune", "--set", "steps=zero")
    assert bad.returncode == 2 and "finetune.steps" in bad.stderr and "Traceback" not in bad.stderr

    out = loupe(env, "model", "use", report["output"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["state"] == "done"

    env["LOUPE_CLIP_MODEL"] = report["output"]  # what the switch tells the user to set
    held = DataDirLock(tmp_path / "data")  # as a running server holds it: listing reads the database only
    held.acquire()
    try:
        listed = loupe(env, "model", "list")
    finally:
        held.release()
    assert listed.returncode == 0, listed.stderr
    versions = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [v["active"] for v in versions] == [False, True] and versions[1]["name"] == report["output"]

    again = loupe(env, "model", "use", report["output"])
    assert again.returncode == 2 and "current model" in again.stderr and "Traceback" not in again.stderr


def test_model_list_of_a_library_not_created_yet_is_empty_and_creates_nothing(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(LOUPE_DATA_DIR=str(tmp_path / "data"))
    out = loupe(env, "model", "list")
    assert (out.returncode, out.stdout) == (0, "")
    assert not (tmp_path / "data" / "loupe.db").exists()
