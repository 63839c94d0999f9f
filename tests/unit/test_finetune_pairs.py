"""Training pairs for `loupe finetune`: the JSONL reader's errors name the line, the held-out split keeps each
image on one side and is reproducible, pseudo-captions are phrased through several templates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loupe.errors import BadRequest
from loupe.models.finetune import PSEUDO_TEMPLATES, Pair, jsonl_pairs, split_pairs, text_of


def test_jsonl_pairs_reads_ids_and_paths(tmp_path: Path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '{"image_id": 3, "caption": "a red bicycle"}\n\n# note\n{"path": "~/x.jpg", "caption": "a dog"}\n'
    )
    pairs = jsonl_pairs(f)
    assert pairs[0] == Pair("id:3", "a red bicycle")
    assert pairs[1].key.endswith("/x.jpg") and not pairs[1].key.startswith("~")


@pytest.mark.parametrize(
    "line",
    [
        '{"caption": "x"}',
        '{"image_id": 1}',
        "not json",
        '{"image_id": "a", "caption": "x"}',
        '{"image_id": 1, "caption": " "}',
    ],
)
def test_bad_pair_lines_name_the_line(tmp_path: Path, line: str):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"image_id": 1, "caption": "fine"}\n' + line + "\n")
    with pytest.raises(BadRequest, match="line 2") as err:
        jsonl_pairs(f)
    assert err.value.code == "bad_pairs"


def test_split_keeps_each_image_on_one_side_and_is_reproducible():
    pairs = [Pair(f"id:{i}", c) for i in range(100) for c in (f"caption {i % 7}", "a photo")]
    train, held = split_pairs(pairs, 0.2, seed=4)
    assert {p.key for p in train}.isdisjoint({p.key for p in held})
    assert len({p.key for p in held}) == 20 and len(train) + len(held) == len(pairs)
    assert split_pairs(pairs, 0.2, seed=4) == (train, held)
    assert split_pairs(pairs, 0.2, seed=5) != (train, held)


def test_pseudo_captions_use_several_templates_and_captions_stay_as_written():
    rng = random.Random(0)
    said = {text_of(Pair("id:1", "red bicycle", pseudo=True), rng) for _ in range(200)}
    assert said == {t.format("red bicycle") for t in PSEUDO_TEMPLATES}
    assert text_of(Pair("id:1", "A bicycle, leaning.")) == "A bicycle, leaning."
    assert text_of(Pair("id:1", "cat", pseudo=True)) == "a photo of cat"  # evaluation: one fixed phrasing


def test_image_phase_positives_are_caption_mates_and_near_duplicates():
    from loupe.models.finetune import positives

    pairs = [Pair("id:1", "red bicycle", True), Pair("id:2", "red bicycle", True), Pair("id:3", "a dog")]
    by_caption: dict[str, list[Pair]] = {}
    for p in pairs:
        by_caption.setdefault(p.caption, []).append(p)
    dups = {"id:3": ["id:9"], "id:1": ["id:2", "id:7"]}
    assert positives(pairs[0], by_caption, dups) == ["id:2", "id:7"]  # no repeats
    assert positives(pairs[2], by_caption, dups) == ["id:9"]  # a near-duplicate when no caption is shared
    assert positives(Pair("id:5", "alone"), by_caption, dups) == []  # augmentations of itself
