"""The retrieval metrics of `loupe eval`, checked against values worked out by hand, and the query-set parser."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loupe.config import Settings
from loupe.errors import InvalidQuery
from loupe.search.evaluate import apply_overrides, metrics_at_k, parse_queries


def test_perfect_and_empty_rankings():
    assert metrics_at_k([1, 2, 3], {1, 2, 3}, 3) == {"recall": 1.0, "precision": 1.0, "map": 1.0, "ndcg": 1.0}
    assert metrics_at_k([7, 8, 9], {1, 2}, 3) == {"recall": 0.0, "precision": 0.0, "map": 0.0, "ndcg": 0.0}


def test_worked_example():
    # relevant {a, b, c}; ranking: a x b y z, k=5 -> hits at ranks 1 and 3
    m = metrics_at_k([1, 10, 2, 11, 12], {1, 2, 3}, 5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["map"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg"] == pytest.approx((1 + 1 / math.log2(4)) / idcg)


def test_more_relevant_than_k_caps_the_ideal():
    # 20 relevant, k=5, all five returned are relevant: AP and NDCG are perfect, recall is 5/20
    m = metrics_at_k(list(range(5)), set(range(20)), 5)
    assert m == {"recall": 0.25, "precision": 1.0, "map": 1.0, "ndcg": 1.0}


def test_order_matters_for_map_and_ndcg_not_recall():
    good = metrics_at_k([1, 2, 9, 8], {1, 2}, 4)
    late = metrics_at_k([9, 8, 1, 2], {1, 2}, 4)
    assert good["recall"] == late["recall"] == 1.0
    assert late["map"] < good["map"] and late["ndcg"] < good["ndcg"]


def test_short_result_lists_count_missing_ranks_as_misses():
    assert metrics_at_k([1], {1, 2}, 10)["recall"] == 0.5


def resolve(f):
    return np.array([100, 101, 102]) if f.tags and f.tags.all == ["red"] else np.array([], dtype=np.int64)


def test_parse_text_image_and_label_queries():
    qs = parse_queries(
        [
            '{"text": "a red circle", "relevant": [1, 2]}',
            "# a comment",
            "",
            '{"id": "img", "image_id": 100, "relevant_tags": ["red"]}',
            '{"terms": [{"text": "x"}, {"image_id": 5, "weight": -1}], "relevant_where": {"tags": {"all": ["red"]}}}',
        ],
        resolve,
    )
    assert [q.kind for q in qs] == ["text", "image", "mixed"]
    assert qs[1].qid == "img" and qs[1].relevant == {101, 102} and qs[1].exclude == (100,)  # itself excluded
    assert qs[2].relevant == {100, 101, 102}


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "JSON object"),
        ('{"relevant": [1]}', "one of text, image_id or terms"),
        ('{"text": "a", "relevant": [1], "relevant_tags": ["x"]}', "exactly one of relevant"),
        ('{"text": "a"}', "exactly one of relevant"),
        ('{"text": "a", "relevant_tags": ["nothing"]}', "no relevant image"),
        ('{"text": "", "relevant": [1]}', "line 1"),
        ('{"text": "a", "relevant_where": {"colour": "red"}}', "line 1"),
    ],
)
def test_bad_query_lines_name_the_line(line, words):
    with pytest.raises(InvalidQuery) as err:
        parse_queries([line], resolve)
    assert words in err.value.message and err.value.code == "bad_eval_query"


def test_empty_query_set_is_refused():
    with pytest.raises(InvalidQuery, match="empty"):
        parse_queries(["", "# only comments"], resolve)


def test_overrides_apply_to_a_copy_and_are_validated(tmp_path):
    base = Settings(data_dir=tmp_path)
    new = apply_overrides(base, ["index.nprobe=8", "index.factory=IVF{nlist},Flat", "search.prf_k=5"])
    assert (new.index.nprobe, new.index.factory, new.search.prf_k) == (8, "IVF{nlist},Flat", 5)
    assert base.index.nprobe == 0 and base.search.prf_k == 0
    assert apply_overrides(base, ['search.prompt_templates=["a photo of {}"]']).search.prompt_templates == [
        "a photo of {}"
    ]
    for bad, words in (
        ("index.nprobe", "area.name=value"),
        ("indx.nprobe=3", "no settings area"),
        ("index.nprob=3", "no setting"),
        ("index.nprobe=-1", "index.nprobe"),
    ):
        with pytest.raises(InvalidQuery, match=words):
            apply_overrides(base, [bad])
