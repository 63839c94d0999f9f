"""One long-lived thread for the process's multi-threaded torch work on the CPU: one OpenMP team.

torch's CPU builds use GNU OpenMP, which gives every thread that starts a parallel region its own team of worker
threads, kept for as long as that thread lives. Once the teams' threads outnumber the cores, libgomp stops its
workers spinning between parallel regions (its "throttled" spin count), so each of the hundreds of operators in a
forward pass waits for a sleeping worker to wake. On 2 cores a one-query pass of the bf16 text tower took 14.8 ms
on a second thread, 5.8 ms where it was the only team (bench/RESULTS.md, "Text tower under load"). A server has many
threads (request workers, ingest, a model switch), so its passes on more than one torch thread (and the model's
loading and start-up checks, which form a team too) run here. Single-threaded passes (ingest's model workers) form
no team and run where they are called; ONNX Runtime has its own thread pool, outside OpenMP.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]]] = (
    queue.SimpleQueue()
)
_start = threading.Lock()
_ident: list[int] = []
_default: list[int] = []
_setting = threading.local()


def default_threads() -> int:
    """torch's intra-op threads for a pass that asks for none: LOUPE_MODEL__TORCH_THREADS, else torch's own count
    as first read in this process. Read once: torch reports, per thread, whatever count was set there last (and a
    thread's first torch call inherits the count set last anywhere), so a later reading can be a caller's choice."""
    if not _default:
        import torch

        _default.append(torch.get_num_threads())
    return _default[0]


def set_default_threads(n: int) -> None:
    _default[:] = [n]
    use_threads(n)


def use_threads(n: int) -> None:
    """Run this thread's torch work on `n` intra-op threads. torch keeps the count per thread (OpenMP's and
    MKL's), but a thread's first torch call seeds it from whatever count any thread set last, so every caller
    states its own: once per thread and count."""
    if getattr(_setting, "n", None) != n:
        import torch

        torch.set_num_threads(n)
        _setting.n = n


def _serve() -> None:
    while True:
        fn, args, kwargs, done = _jobs.get()
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller gets it
                done.set_exception(exc)


def _ensure_started() -> None:
    with _start:
        if not _ident:
            # A daemon thread: Ctrl-C while a long pass runs (the demo model's first training) still exits.
            thread = threading.Thread(target=_serve, name="loupe-torch", daemon=True)
            thread.start()
            assert thread.ident is not None
            _ident.append(thread.ident)


def on_torch_thread() -> bool:
    return bool(_ident) and threading.get_ident() == _ident[0]


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the torch thread, waiting for it (directly when already there); calls from several
    threads run one after another, as they would on the cores anyway."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    _ensure_started()
    done: Future[T] = Future()
    _jobs.put((fn, args, kwargs, done))
    return done.result()
