"""Bulk uploads as durable jobs: a zip or many files are staged on disk (never held in memory), each member is
ingested through the same checks as a single upload, and progress lives in the database, so a restart resumes
at the next file. Hostile archives (zip-slip names, zip bombs, encrypted or truncated zips) are refused whole.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

from sqlalchemy import select, update
from sqlmodel import Session, col

from loupe.config import IngestSettings
from loupe.errors import BadRequest, NotFound, TooLarge
from loupe.ingest.service import IngestService, UploadOutcome
from loupe.storage.metadata.repo import MetadataRepo
from loupe.storage.metadata.tables import Job, JobFile, JobState, utcnow

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
IGNORED_PREFIXES = ("__MACOSX/",)
# A file's outcome -> the job's counter of it.
COUNTER = {"accepted": "accepted", "duplicate": "duplicates", "rejected": "rejected"}
# A step reads its files into memory until they hold this much (at least one file).
STEP_BYTES = 64 * 1024 * 1024
# What reading a damaged member raises.
DAMAGED = (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError)


def copy_stream(src: IO[bytes], dest: Path, max_bytes: int) -> int:
    """Copy a file object to `dest` in chunks; refuse past max_bytes."""
    written = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise TooLarge(f"the upload is larger than {max_bytes:,} bytes", code="file_too_large")
            out.write(chunk)
    return written


def archive_members(path: Path, settings: IngestSettings) -> list[str]:
    """The picture candidates in a zip, after the archive-level checks."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BadRequest(
            "the archive is not a readable zip (truncated or corrupt?)", code="bad_archive"
        ) from exc
    members: list[str] = []
    total = 0
    for info in infos:
        name = info.filename
        if info.is_dir() or name.startswith(IGNORED_PREFIXES) or PurePosixPath(name).name.startswith("."):
            continue
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise BadRequest(f"the archive has an unsafe path {name!r} (zip-slip)", code="zip_slip")
        if info.flag_bits & 0x1:
            raise BadRequest("the archive is encrypted; Loupe cannot read it", code="encrypted_archive")
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1024 * 1024 and ratio > settings.max_zip_ratio:
            raise TooLarge(
                f"{name!r} expands {ratio:.0f}-fold (a zip bomb?); the limit is {settings.max_zip_ratio}",
                code="zip_bomb",
            )
        members.append(name)
    if len(members) > settings.max_zip_entries:
        raise TooLarge(
            f"the archive holds {len(members):,} files, over the limit of {settings.max_zip_entries:,}",
            code="too_many_entries",
        )
    if total > settings.max_zip_uncompressed_mb * 1024 * 1024:
        raise TooLarge(
            f"the archive expands to {total:,} bytes, over the limit of {settings.max_zip_uncompressed_mb:,} MiB "
            "(a zip bomb?)",
            code="zip_bomb",
        )
    if not members:
        raise BadRequest("the archive holds no files", code="empty_archive")
    return members


class BulkService:
    def __init__(
        self, settings: IngestSettings, repo: MetadataRepo, ingest: IngestService, staging: Path
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.ingest = ingest
        self.staging = staging
        self.work_available = threading.Event()
        self._zips: dict[str, zipfile.ZipFile] = {}

    # ------------------------------------------------------------ creating jobs

    def _create(
        self, job_id: str, source: str, names: Sequence[str], tags: Sequence[str], albums: Sequence[str]
    ) -> Job:
        job = Job(id=job_id, source=source, total=len(names), tags=list(tags), albums=list(albums))
        with self.repo.session() as s:
            s.add(job)
            s.flush()
            s.add_all([JobFile(job_id=job_id, seq=i, name=n[:1000]) for i, n in enumerate(names)])
            s.commit()
        self.work_available.set()
        return job

    def from_zip(self, src: IO[bytes], tags: Sequence[str] = (), albums: Sequence[str] = ()) -> Job:
        job_id = uuid.uuid4().hex
        folder = self.staging / job_id
        try:
            copy_stream(src, folder / "archive.zip", self.settings.max_zip_mb * 1024 * 1024)
            members = archive_members(folder / "archive.zip", self.settings)
            return self._create(job_id, "zip", members, tags, albums)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def from_files(
        self,
        files: Sequence[tuple[str | None, IO[bytes]]],
        tags: Sequence[str] = (),
        albums: Sequence[str] = (),
    ) -> Job:
        job_id = uuid.uuid4().hex
        folder = self.staging / job_id
        try:
            names = []
            for i, (name, fh) in enumerate(files):
                copy_stream(fh, folder / "files" / str(i), self.settings.max_file_mb * 1024 * 1024)
                names.append(name or f"file-{i}")
            return self._create(job_id, "files", names, tags, albums)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    # ------------------------------------------------------------ reading progress

    def get(self, job_id: str, offset: int = 0, limit: int = 1000) -> tuple[Job, list[JobFile]]:
        with self.repo.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} does not exist")
            files = (
                s.execute(
                    select(JobFile)
                    .where(col(JobFile.job_id) == job_id)
                    .order_by(col(JobFile.seq))
                    .offset(offset)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            return job, list(files)

    # ------------------------------------------------------------ the worker's step

    def _member(self, job: Job, jf: JobFile) -> bytes:
        folder = self.staging / job.id
        if job.source == "files":
            return (folder / "files" / str(jf.seq)).read_bytes()
        zf = self._zips.get(job.id)
        if zf is None:
            zf = self._zips[job.id] = zipfile.ZipFile(folder / "archive.zip")
        with zf.open(jf.name) as fh:
            data = fh.read(self.settings.max_file_mb * 1024 * 1024 + 1)
        return data

    def step(self, batch: int = 16) -> int:
        """Ingest up to `batch` queued files of the oldest unfinished job, as one upload: their rows and the job's
        progress commit together, so a restart resumes at the first file not recorded. Returns how many were
        handled."""
        batch = min(batch, self.settings.max_files_per_request)
        with self.repo.session() as s:
            job = (
                s.execute(
                    select(Job)
                    .where(col(Job.state).in_([JobState.queued, JobState.running]))
                    .order_by(col(Job.created_at))
                    .limit(1)
                )
                .scalars()
                .first()
            )
            if job is None:
                return 0
            pending = (
                s.execute(
                    select(JobFile)
                    .where(col(JobFile.job_id) == job.id, col(JobFile.status) == "queued")
                    .order_by(col(JobFile.seq))
                    .limit(batch)
                )
                .scalars()
                .all()
            )
        if not pending:
            self._finish(job, JobState.done, None)
            return 0
        unreadable: dict[int, UploadOutcome] = {}
        readable: list[tuple[JobFile, bytes]] = []
        held = 0
        for jf in pending:
            if held >= STEP_BYTES:  # large pictures: the rest wait for the next step
                break
            try:
                readable.append((jf, self._member(job, jf)))
                held += len(readable[-1][1])
            except DAMAGED as exc:
                unreadable[jf.seq] = UploadOutcome(
                    jf.name,
                    "rejected",
                    error={
                        "code": "corrupt_entry",
                        "message": f"cannot read this entry: {type(exc).__name__}",
                    },
                )

        def record(s: Session, outcomes: list[UploadOutcome]) -> None:
            by_seq = unreadable | {jf.seq: o for (jf, _), o in zip(readable, outcomes, strict=True)}
            s.execute(  # the ORM's bulk UPDATE by primary key: one executemany
                update(JobFile),
                [
                    {
                        "job_id": job.id,
                        "seq": seq,
                        "status": o.status,
                        "image_id": o.id,
                        "error_code": o.error["code"] if o.error else None,
                        "error_message": o.error["message"][:1000] if o.error else None,
                    }
                    for seq, o in by_seq.items()
                ],
            )
            counts = Counter(COUNTER[o.status] for o in by_seq.values())
            s.execute(
                update(Job)
                .where(col(Job.id) == job.id)
                .values(
                    state=JobState.running,
                    processed=col(Job.processed) + len(by_seq),
                    updated_at=utcnow(),
                    **{name: getattr(Job, name) + n for name, n in counts.items()},
                )
            )

        self.ingest.upload(
            [(PurePosixPath(jf.name).name, data) for jf, data in readable], job.tags, job.albums, then=record
        )
        return len(readable) + len(unreadable)

    def _finish(self, job: Job, state: JobState, error: str | None) -> None:
        zf = self._zips.pop(job.id, None)
        if zf is not None:
            zf.close()
        with self.repo.session() as s:
            s.execute(
                update(Job)
                .where(col(Job.id) == job.id)
                .values(state=state, error=error, finished_at=utcnow(), updated_at=utcnow())
            )
            s.commit()
        shutil.rmtree(self.staging / job.id, ignore_errors=True)
        log.info("bulk job %s %s", job.id, state)

    def drain(self) -> int:
        done = 0
        while True:
            n = self.step()
            if n == 0 and not self._has_active():
                return done
            done += n

    def _has_active(self) -> bool:
        with self.repo.session() as s:
            return (
                s.execute(
                    select(col(Job.id))
                    .where(col(Job.state).in_([JobState.queued, JobState.running]))
                    .limit(1)
                ).first()
                is not None
            )


class BulkWorker:
    def __init__(self, service: BulkService, poll_s: float) -> None:
        self.service = service
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loupe-bulk", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.service.step()
            except Exception:
                log.exception("bulk job step failed; retrying shortly")
                n = 0
            if n == 0:
                self.service.work_available.wait(self.poll_s)
                self.service.work_available.clear()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.service.work_available.set()
        self._thread.join(timeout)


def job_dict(job: Job, files: list[JobFile]) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state,
        "source": job.source,
        "total": job.total,
        "processed": job.processed,
        "accepted": job.accepted,
        "duplicates": job.duplicates,
        "rejected": job.rejected,
        "error": job.error,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "files": [
            {
                "seq": f.seq,
                "name": f.name,
                "status": f.status,
                "id": f.image_id,
                "error": {"code": f.error_code, "message": f.error_message} if f.error_code else None,
            }
            for f in files
        ],
    }
