"""runtime_choice.fastest_interleaved: how `auto` times contenders against each other."""

from __future__ import annotations

import time

from loupe.models.runtime_choice import fastest_interleaved


def test_contenders_are_timed_in_turn_and_each_keeps_its_fastest_run():
    calls: list[str] = []
    slow = iter([0.0, 0.03, 0.0, 0.0])  # "b": the warm-up, then a slow first round, then fast ones

    def a() -> None:
        calls.append("a")
        time.sleep(0.005)

    def b() -> None:
        calls.append("b")
        time.sleep(next(slow, 0.0))

    took = fastest_interleaved({"a": a, "b": b}, rounds=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # a warm-up each, then round after round
    assert 0.005 <= took["a"] < 0.02
    assert took["b"] < 0.005  # the slow round does not count
