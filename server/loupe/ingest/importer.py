"""`loupe import`: the files of a folder sent in requests of IMPORT_REQUEST, those already stored (same SHA-256)
skipped before they are sent, so an interrupted import simply runs again; either through a running server's API
or straight into an open runtime, whose model then embeds what is stored while the rest is still being read and
stored (import_direct)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import Progress

from loupe.ingest.service import BatchReport

if TYPE_CHECKING:
    from loupe.runtime import Runtime

# Files in one upload request (the web UI sends 20, a bulk job's step 16).
IMPORT_REQUEST = 32
# Requests an import sends at once: half the cores, at most 4 (the other half prepares and embeds). On 2 cores,
# 0.5 MP JPEGs uploaded straight into a runtime at 610-880 a second from one thread, 820-1,120 from two and
# 1,100-1,290 from four; but with the model embedding beside them the cores are full, and two senders imported at
# 0.95x one (bench/RESULTS.md, "A/B: pictures prepared in worker processes"), so one there. Several are for a
# large machine, where one sender would bound a GPU's import near its upload rate (unmeasured there).
IMPORT_SENDERS = max(1, min(4, (os.cpu_count() or 1) // 2))

# (file name, bytes) of a request's files, its albums, the files' SHA-256s -> each file's outcome ({"status",
# "error"})
Send = Callable[[list[tuple[str, bytes]], tuple[str, ...], list[str]], list[dict[str, Any]]]


def send_groups(
    groups: Mapping[tuple[str, ...], Sequence[Path]],
    existing_of: Callable[[list[str]], Mapping[str, int]],
    send: Send,
    progress: Progress,
    on_accepted: Callable[[int], None] | None = None,
    senders: int = 1,
) -> dict[str, int]:
    """Send each group's files (keyed by their albums) in requests of IMPORT_REQUEST, skipping the stored ones, from
    `senders` threads at once (each reads, hashes and sends whole requests; with several, at most two requests a
    thread are read ahead, so a large folder is never held in memory); counts by outcome, and rejected files named
    on the progress console. An error in one request is raised once the requests in flight have ended."""
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "skipped": 0}
    task = progress.add_task("importing", total=sum(len(g) for g in groups.values()))

    def request(
        albums: tuple[str, ...], chunk: Sequence[Path]
    ) -> tuple[int, list[str], list[dict[str, Any]]]:
        blobs = [(p, p.read_bytes()) for p in chunk]
        hashes = [hashlib.sha256(d).hexdigest() for _, d in blobs]
        stored = existing_of(hashes)
        new = [k for k, h in enumerate(hashes) if h not in stored]
        todo = [(blobs[k][0].name, blobs[k][1]) for k in new]
        outcomes = send(todo, albums, [hashes[k] for k in new]) if todo else []
        return len(chunk) - len(todo), [name for name, _ in todo], outcomes

    def account(done: Future[tuple[int, list[str], list[dict[str, Any]]]], size: int) -> None:
        skipped, names, outcomes = done.result()
        counts["skipped"] += skipped
        for name, o in zip(names, outcomes, strict=True):
            counts[str(o["status"])] += 1
            if o["status"] == "rejected" and o.get("error"):
                progress.console.print(f"[yellow]rejected[/] {name}: {o['error']['message']}")
        if on_accepted is not None and outcomes:
            on_accepted(sum(o["status"] == "accepted" for o in outcomes))
        progress.advance(task, size)

    requests = (
        (albums, group[start : start + IMPORT_REQUEST])
        for albums, group in groups.items()
        for start in range(0, len(group), IMPORT_REQUEST)
    )
    senders = max(1, senders)
    # One sender sends one request after the other, as it always did.
    ahead = 1 if senders == 1 else 2 * senders
    in_flight: deque[tuple[Future[tuple[int, list[str], list[dict[str, Any]]]], int]] = deque()
    with ThreadPoolExecutor(senders, thread_name_prefix="loupe-import-send") as pool:
        try:
            for albums, chunk in requests:
                if len(in_flight) >= ahead:
                    account(*in_flight.popleft())
                in_flight.append((pool.submit(request, albums, chunk), len(chunk)))
            while in_flight:
                account(*in_flight.popleft())
        except BaseException:
            for fut, _ in in_flight:
                fut.cancel()
            raise
    return counts


def import_direct(
    runtime: Runtime,
    groups: Mapping[tuple[str, ...], Sequence[Path]],
    tags: Sequence[str],
    progress: Progress,
    senders: int = IMPORT_SENDERS,
) -> dict[str, int]:
    """Import into an open runtime: the files are read, checked and stored by `senders` threads while the model
    embeds what is stored on another (IngestService.drain beside the uploads), so reading the folder and writing the
    originals (their fsyncs wait on the disk) overlap the model instead of preceding it; on a GPU, whose model
    outruns the uploads, the import takes the uploads' time rather than the sum of both. Returns the counts once
    every stored picture is embedded (or failed) and the FAISS mirror has caught up.

    An error in the uploads stops the embedding after the batches in hand and is raised; what was stored stays
    pending for the next import or server start. An error in the embedding is raised after the uploads end."""
    service = runtime.ingest
    service.start_prepare_pool()  # its workers start while the first files are read and stored
    to_embed = runtime.repo.counts_by_state().get("pending", 0)
    embedding = progress.add_task("embedding", total=to_embed)

    def embedded(reports: list[BatchReport]) -> None:
        progress.advance(embedding, sum(r.ready + r.failed for r in reports))

    def accepted(n: int) -> None:
        nonlocal to_embed
        to_embed += n
        progress.update(embedding, total=to_embed)

    feeding, stop = threading.Event(), threading.Event()
    feeding.set()
    with ThreadPoolExecutor(1, thread_name_prefix="loupe-import-embed") as pool:
        drained = pool.submit(
            service.drain,
            None,
            feeding=feeding,
            coming=sum(len(g) for g in groups.values()),
            stop=stop,
            on_reports=embedded,
            max_batches=16,
        )
        try:
            counts = send_groups(
                groups,
                runtime.repo.existing_hashes,
                lambda files, albums, hashes: [
                    {"status": o.status, "error": o.error}
                    for o in service.upload(files, tags, albums, sha256s=hashes)
                ],
                progress,
                accepted,
                senders,
            )
        except BaseException:
            stop.set()
            raise
        finally:
            feeding.clear()
            service.work_available.set()
        drained.result()
    runtime.sync_mirror()
    return counts
