"""The `auto` runtime choices remembered per model and machine (models/runtime_choice.py): a later start reuses
them without timing, still checks a reused runtime against torch, and times again when the machine, the model
or the file says it must."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from loupe.models import bf16_text, image_runtime, runtime_choice
from loupe.models.clip import load_clip
from loupe.models.runtime_choice import ChoiceMemory

NEVER, ALWAYS = 1e9, 0.0


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check what is remembered, whatever else the machine running them does meanwhile: the CPU
    time of other processes reads as unknown (quiet). The TimingWindow tests below measure it for real."""
    monkeypatch.setattr(runtime_choice, "cpu_ticks", lambda *_: None)


def untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any timing at start fail the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("timed, though the choice was remembered")

    monkeypatch.setattr(image_runtime, "_rates", refuse)
    monkeypatch.setattr(bf16_text, "best_of", refuse)


def test_an_image_runtime_timed_once_is_reused_checked_and_timed_again_when_the_machine_changes(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    clip = load_clip(str(tiny_clip_dir))
    memory = ChoiceMemory(tmp_path / "models")

    def attach(**gains: float) -> str:
        return image_runtime.attach(clip, "auto", tmp_path / "onnx", gains=gains, memory=memory)

    # Timed: the gains make bf16 win whatever the rates, and the verdict is written with the rates seen.
    assert attach(onnx=NEVER, bf16=ALWAYS) == "bf16" and clip.runtime_choices["image"] == "timed at start"
    (entry,) = json.loads(memory.path.read_text()).values()
    assert entry["choice"] == "bf16" and set(entry["rates"]) == {"torch", "onnx", "bf16"}

    with monkeypatch.context() as m:
        untimed(m)
        built: list[str] = []
        real = image_runtime._build
        m.setattr(image_runtime, "_build", lambda c, name, *a: built.append(name) or real(c, name, *a))
        assert attach(onnx=NEVER, bf16=ALWAYS) == "bf16" and clip.image_tower_bf16 is not None
        assert built == ["bf16"]  # only the runtime chosen is built (and checked), nothing timed
        assert clip.runtime_choices["image"].startswith("remembered from ")
    # The gains are part of what decided: other gains are another question, timed.
    assert attach(onnx=NEVER, bf16=NEVER) == "torch" and clip.runtime_choices["image"] == "timed at start"
    assert len(json.loads(memory.path.read_text())) == 2

    # A reused runtime that no longer keeps its floor is not trusted: the towers are timed again.
    with monkeypatch.context() as m:
        m.setitem(image_runtime.FLOORS, "bf16", 1.01)
        assert attach(onnx=NEVER, bf16=ALWAYS) == "torch"  # timed: bf16 fails its floor there too
    # Another machine (or another torch) does not reuse this one's verdict.
    runtime_choice.machine.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(runtime_choice.platform, "machine", lambda: "riscv64")
        assert attach(onnx=NEVER, bf16=ALWAYS) == "bf16" and clip.runtime_choices["image"] == "timed at start"
        runtime_choice.machine.cache_clear()
    # Too old: timed again.
    data = json.loads(memory.path.read_text())
    for v in data.values():
        v["at"] = time.time() - (runtime_choice.MAX_AGE_DAYS + 1) * 86400
    memory.path.write_text(json.dumps(data))
    assert attach(onnx=NEVER, bf16=ALWAYS) == "bf16" and clip.runtime_choices["image"] == "timed at start"


def test_the_text_batch_verdict_is_reused_and_a_rejected_copy_is_not_even_built(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    clip = load_clip(str(tiny_clip_dir))
    memory = ChoiceMemory(tmp_path / "models")
    assert bf16_text.attach(clip, "auto", gain_needed=ALWAYS, memory=memory) == "bf16 from 1 query"
    assert bf16_text.attach(clip, "auto", gain_needed=NEVER, memory=memory) == ""
    with monkeypatch.context() as m:
        untimed(m)
        assert bf16_text.attach(clip, "auto", gain_needed=ALWAYS, memory=memory) == "bf16 from 1 query"
        assert clip.text_batch_tower is not None and clip.text_batch_min == 1
        m.setattr(bf16_text, "Bf16TextTower", lambda *_: pytest.fail("built, though remembered as slower"))
        assert bf16_text.attach(clip, "auto", gain_needed=NEVER, memory=memory) == ""
        assert clip.text_batch_tower is None
        assert clip.runtime_choices["text_batches"].startswith("remembered from ")
    # `on` and `off` never consult it.
    assert bf16_text.attach(clip, "on", memory=memory) == "bf16 from 2 queries"


def test_an_unreadable_file_is_timed_again_and_rewritten(tiny_clip_dir: Path, tmp_path: Path):
    clip = load_clip(str(tiny_clip_dir))
    memory = ChoiceMemory(tmp_path / "models")
    memory.path.parent.mkdir(parents=True)
    memory.path.write_text("{not json")
    assert bf16_text.attach(clip, "auto", gain_needed=NEVER, memory=memory) == ""
    assert clip.runtime_choices["text_batches"] == "timed at start"
    assert [v["start"] for v in json.loads(memory.path.read_text()).values()] == [0]


def test_a_restart_reuses_what_the_first_start_timed_and_health_says_so(
    make_settings, runtime_factory, monkeypatch: pytest.MonkeyPatch
):
    settings = make_settings(model={"image_runtime": "auto"})
    first = runtime_factory(settings)
    choices = first.health()["model"]["runtime_choices"]
    image = first.health()["model"]["image_runtime"]
    assert choices["image"] == "timed at start"
    assert choices.get("text_batches", "timed at start") == "timed at start"  # absent where no bf16 kernels
    first.close()
    untimed(monkeypatch)
    again = runtime_factory(settings).health()["model"]
    assert again["image_runtime"] == image and again["runtime_choices"]["image"].startswith(
        "remembered from "
    )
    assert set(again["runtime_choices"]) == set(choices)


def _spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def _window_beside_spinners(where: list[set[int] | None], threads: int) -> runtime_choice.TimingWindow:
    """A 0.6 s timing window that needs `threads` cores, taken while a real spinner process runs for each entry
    of `where`, pinned to those CPUs (None: anywhere)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    spinners = [ctx.Process(target=_spin, args=(time.monotonic() + 30,)) for _ in where]
    try:
        for spinner, cpus in zip(spinners, where, strict=True):
            spinner.start()
            if cpus is not None:
                os.sched_setaffinity(spinner.pid, cpus)  # type: ignore[arg-type]
        time.sleep(1.0)  # started and spinning
        with runtime_choice.TimingWindow(threads) as window:
            time.sleep(0.6)
    finally:
        for spinner in spinners:
            if spinner.pid is not None:
                spinner.terminate()
                spinner.join()
    return window


def test_a_timing_window_sees_other_processes_take_the_cores(monkeypatch: pytest.MonkeyPatch):
    """Real CPU time from /proc/stat: while other processes spin on every core, a window that needs them all is
    contended; the same window with nothing of ours running reads far less. Whether it reads as contended too
    depends on what else the machine runs (a CI box's own work once took 0.28 of a core for a while, a test run
    under a half-core spinner 0.5-0.57), so that threshold is checked on set figures instead."""
    monkeypatch.undo()  # the real cpu_ticks
    cores = os.cpu_count() or 1
    busy = _window_beside_spinners([None] * cores, cores)
    assert busy.others > cores * 0.7 and busy.contended, busy.others
    with runtime_choice.TimingWindow(cores) as quiet:
        time.sleep(0.6)
    assert quiet.others < busy.others - cores * 0.35, (quiet.others, busy.others)
    # Contended: the others took more than the cores the timing leaves free, plus SLACK_CORES.
    window = runtime_choice.TimingWindow(2)
    window.cores = 2
    for others, contended in ((0.0, False), (0.2, False), (0.3, True), (2.0, True)):
        window.others = others
        assert window.contended is contended, others
    # A timing on one core of a machine with others to spare is not contended by one busy neighbour.
    spare = runtime_choice.TimingWindow(1)
    spare.cores, spare.others = 4, 1.0
    assert not spare.contended


def test_a_window_too_short_for_the_clock_ticks_reads_quiet(monkeypatch: pytest.MonkeyPatch):
    """/proc/stat counts whole clock ticks: a window of a millisecond across which each CPU's count and this
    process's own stepped on by one tick is no sign of others' work (such a window once read 29 cores busy
    elsewhere on a quiet 2-core box); both cores held by others over a window of 0.1 s still read as contended."""
    tick = 1 / os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(runtime_choice, "_own_cpu_s", lambda: 0.0)
    for wall, others_ticks, contended in ((0.001, 0, False), (0.1, round(2 * 0.1 / tick), True)):
        ticks = iter((1000, 1003 + others_ticks))  # two CPUs a tick each, and one more, and the others' work
        monkeypatch.setattr(runtime_choice, "cpu_ticks", lambda *_, it=ticks: next(it))
        clock = iter((0.0, wall))
        monkeypatch.setattr(runtime_choice.time, "monotonic", lambda it=clock: next(it))
        window = runtime_choice.TimingWindow(2)
        window.cpus, window.cores = [0, 1], 2
        with window:
            pass
        assert window.contended is contended, (wall, window.others)


def test_a_verdict_timed_on_a_busy_machine_serves_but_is_not_remembered(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    clip = load_clip(str(tiny_clip_dir))
    memory = ChoiceMemory(tmp_path / "models")
    # Every clock tick of the window was busy, none of it this process's: the others held all the cores.
    ticks = iter(range(0, 10**12, 10**6))
    monkeypatch.setattr(runtime_choice, "cpu_ticks", lambda *_: next(ticks))
    assert bf16_text.attach(clip, "auto", gain_needed=ALWAYS, memory=memory) == "bf16 from 1 query"
    assert clip.runtime_choices["text_batches"] == "timed at start on a busy machine: not remembered"
    assert image_runtime.attach(clip, "auto", tmp_path / "onnx", gains={"onnx": NEVER}, memory=memory)
    assert clip.runtime_choices["image"].endswith("not remembered")
    assert not memory.path.exists()
    # Quiet again: the next start times, and remembers, with what it saw of the others.
    monkeypatch.setattr(runtime_choice, "cpu_ticks", lambda *_: None)
    assert bf16_text.attach(clip, "auto", gain_needed=ALWAYS, memory=memory) == "bf16 from 1 query"
    assert clip.runtime_choices["text_batches"] == "timed at start"
    (entry,) = json.loads(memory.path.read_text()).values()
    assert entry["start"] == 1 and entry["busy_elsewhere"] == 0.0


def _pinned_windows(mine: int, other: int) -> dict[int, runtime_choice.TimingWindow]:
    """This process pinned to `mine`; a window timed with a spinner pinned to `other`, then one with it on `mine`."""
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {mine})
        return {where: _window_beside_spinners([{where}], 1) for where in (other, mine)}
    finally:
        os.sched_setaffinity(0, saved)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin on")
def test_a_timing_window_counts_only_the_cpus_this_process_may_run_on(monkeypatch: pytest.MonkeyPatch):
    """A container pinned to some of a host's CPUs: work on the other CPUs does not contend, work on its own
    does. Pinned here with sched_setaffinity, a real spinner on one CPU or the other.

    While the spinner holds the other CPU, whatever else the machine runs (a CI runner, a process an earlier test
    left finishing) can only run on this one, and that is real contention: a CI box once read 0.28 of a core
    there. So the spinner on the other CPU must read well under the spinner on this one (counting the other CPU
    makes them equal), and a pair of readings is taken again, up to three times, until one shows it."""
    monkeypatch.undo()  # the real cpu_ticks
    mine, other = sorted(os.sched_getaffinity(0))[:2]
    readings = []
    for _ in range(3):
        seen = _pinned_windows(mine, other)
        readings.append({"other": round(seen[other].others, 2), "mine": round(seen[mine].others, 2)})
        assert seen[other].cores == 1
        assert seen[mine].others > 0.7 and seen[mine].contended, readings
        if seen[other].others < seen[mine].others - 0.3:
            break
    else:
        pytest.fail(f"the spinner on another CPU read as this CPU's every time: {readings}")
