"""`loupe eval` on a real library imported with `loupe import` (one album per shape class): the quality floor CI
holds the tiny model to, settings compared side by side, and a model variant that re-embeds the library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from loupe.models.tiny_clip import all_classes
from tests.fixtures.images import shape_set

K = 10
FLOOR = {"text": 0.75, "image": 0.65}  # mAP@10 of the tiny model: measured 0.91 and 0.83 (2026-11-23)


def loupe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loupe.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_eval_floor_variants_and_model_reembed(tmp_path: Path, tiny_clip_dir: Path):
    root = tmp_path / "photos"
    first_of: dict[str, str] = {}
    for s in shape_set(6, seed=11):
        cls = f"{s.colour}-{s.shape}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / s.name).write_bytes(s.data)
        first_of.setdefault(cls, s.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(
        LOUPE_DATA_DIR=str(tmp_path / "data"), LOUPE_CLIP_MODEL=str(tiny_clip_dir), LOUPE_OCR__ENABLED="false"
    )
    out = loupe(env, "import", str(root), "--album-per-folder")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["accepted"] == 180

    # Queries by label: text per class, and image queries by album (the query image excluded from its results).
    lines = [
        json.dumps(
            {"id": f"t:{c}-{s}", "text": f"a {c} {s}", "relevant_where": {"albums": {"any": [f"{c}-{s}"]}}}
        )
        for c, s in all_classes()
    ]
    qfile = tmp_path / "queries.jsonl"
    qfile.write_text("\n".join(lines) + "\n")
    # Image queries need ids: look them up through the relevant sets of the text queries' report.
    first = loupe(env, "eval", str(qfile), "--json", str(tmp_path / "first.json"))
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "first.json").read_text())["reports"][0]
    top_of = {row["id"][2:]: row["top"] for row in report["per_query"]}
    for c, s in all_classes():
        lines.append(
            json.dumps(
                {
                    "id": f"i:{c}-{s}",
                    "image_id": top_of[f"{c}-{s}"][0],
                    "relevant_where": {"albums": {"any": [f"{c}-{s}"]}},
                }
            )
        )
    qfile.write_text("\n".join(lines) + "\n")

    model_copy = tmp_path / "same-model-elsewhere"
    shutil.copytree(tiny_clip_dir, model_copy)
    out = loupe(
        env,
        "eval",
        str(qfile),
        "-k",
        str(K),
        "--json",
        str(tmp_path / "eval.json"),
        "--min-map",
        "0.5",
        "--compare",
        "index.exact_max=0;index.factory=IVF{nlist},Flat;index.nprobe=4",
        "--compare",
        "search.prf_k=3",
        "--compare",
        'search.prompt_templates=["a photo of {}", "a picture of {}"]',
        "--compare",
        f"clip_model={model_copy}",
    )
    assert out.returncode == 0, out.stderr
    print(out.stderr)  # the table, for the record
    reports = {r["name"]: r for r in json.loads((tmp_path / "eval.json").read_text())["reports"]}
    cur = reports["current"]["by_kind"]
    assert cur["text"]["n"] == 30 and cur["image"]["n"] == 30
    for kind, floor in FLOOR.items():
        assert cur[kind]["map"] >= floor, (kind, cur[kind])
    for r in reports.values():
        assert all(0.0 <= r["by_kind"]["all"][m] <= 1.0 for m in ("recall", "precision", "map", "ndcg"))
    # An approximate index was really built for the variant, and it is reported.
    ivf = next(r for n, r in reports.items() if n.startswith("index."))
    assert any("IVF" in note for note in ivf["notes"]), ivf["notes"]
    # The same weights from another path re-embed the originals through the model-switch path: same quality.
    same = reports[f"clip_model={model_copy}"]
    assert any("re-embedded 180 images" in note for note in same["notes"]), same["notes"]
    for kind in ("text", "image"):
        assert abs(same["by_kind"][kind]["map"] - cur[kind]["map"]) < 0.02, (kind, same["by_kind"], cur)

    # A floor the library cannot reach fails the command (what CI relies on).
    out = loupe(env, "eval", str(qfile), "--min-map", "0.999")
    assert out.returncode == 1 and "under the floor" in out.stderr
    # A bad query file is one clear line, exit 2, nothing written.
    qfile.write_text('{"text": "a red circle"}\n')
    out = loupe(env, "eval", str(qfile))
    assert out.returncode == 2 and "line 1" in out.stderr and "Traceback" not in out.stderr
