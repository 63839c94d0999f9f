"""The metadata repository: every query Loupe makes of the relational database, on SQLite and Postgres alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Engine, bindparam, delete, event, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col

from loupe.storage.metadata.engine import is_sqlite
from loupe.storage.metadata.tables import (
    ChangeLog,
    ChangeOp,
    Image,
    ImageAlbum,
    ImageState,
    ImageTag,
    ImageText,
    ModelVersion,
    utcnow,
)


@dataclass(frozen=True)
class NewImage:
    sha256: str
    original_name: str
    format: str
    mime: str
    size_bytes: int
    width: int
    height: int
    frames: int
    tags: tuple[str, ...] = ()
    albums: tuple[str, ...] = ()


def _image_row(n: NewImage, now: datetime) -> dict[str, Any]:
    """A pending image's column values for a Core INSERT (the ORM's defaults do not apply there)."""
    return {
        "sha256": n.sha256,
        "original_name": n.original_name,
        "format": n.format,
        "mime": n.mime,
        "size_bytes": n.size_bytes,
        "width": n.width,
        "height": n.height,
        "frames": n.frames,
        "state": ImageState.pending,
        "attempts": 0,
        "starred": False,
        "created_at": now,
        "updated_at": now,
    }


class HitRow(NamedTuple):
    id: int
    state: str
    width: int
    height: int


# Built once: the page's ids go in as one expanding parameter, so SQLAlchemy compiles the statement once per
# dialect and reuses it (building and compiling an IN clause on every search cost about a third of the join).
_HIT_ROWS = select(col(Image.id), col(Image.state), col(Image.width), col(Image.height)).where(
    col(Image.id).in_(bindparam("ids", expanding=True))
)


@dataclass(frozen=True)
class Change:
    seq: int
    image_id: int
    op: ChangeOp


class MetadataRepo:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        # Bumped by every commit through this engine: caches of query results (the search's filter id sets)
        # are valid while it is unchanged. Writes by other processes (many API nodes on Postgres) do not bump
        # it; such caches also expire by age.
        self.generation = 0
        event.listen(engine, "commit", self._bump)

    def _bump(self, _conn: Any) -> None:
        self.generation += 1

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------ images

    def insert_image(self, new: NewImage) -> tuple[Image, bool]:
        """Insert a pending image. Returns (image, created); the same bytes twice return the existing row."""
        [(image_id, created)] = self.insert_images([new])
        image = self.get_image(image_id)
        assert image is not None
        return image, created

    def insert_images(
        self,
        news: Sequence[NewImage],
        then: Callable[[Session, list[tuple[int, bool]]], None] | None = None,
    ) -> list[tuple[int, bool]]:
        """Insert pending images in one transaction (an upload request's files, a bulk job's step). Returns
        (id, created) in the order of `news`: bytes already stored, by an earlier upload or one racing this,
        or given twice in `news`, answer the stored row's id and False. `then(session, result)` runs in the
        same transaction before it commits (a bulk job's progress), so both land or neither does."""
        firsts: dict[str, NewImage] = {}
        for n in news:
            firsts.setdefault(n.sha256, n)
        now = utcnow()
        with self.session() as s:
            ids: dict[str, int] = {}
            created: set[str] = set()
            if firsts:
                # ON CONFLICT DO NOTHING: a row another upload of the same bytes committed first is not an error
                # (its id is read below), and the rest of the request still goes in.
                stmt = (
                    (sqlite_insert if self._sqlite else pg_insert)(Image)
                    .on_conflict_do_nothing(index_elements=["sha256"])
                    .returning(col(Image.id), col(Image.sha256))
                )
                # In SHA-256 order: two requests that share new files take their row locks in the same order
                # (on Postgres, opposite orders could deadlock), so a request's ids follow its files' hashes.
                rows = [_image_row(firsts[sha], now) for sha in sorted(firsts)]
                for image_id, sha in s.execute(stmt, rows).all():
                    ids[sha] = int(image_id)
                created = set(ids)
                if missing := [sha for sha in firsts if sha not in ids]:
                    found = s.execute(
                        select(col(Image.sha256), col(Image.id)).where(col(Image.sha256).in_(missing))
                    ).all()
                    ids.update((sha, int(i)) for sha, i in found)
                self._add_labels(s, [(ids[sha], firsts[sha]) for sha in firsts if sha in created])
            result: list[tuple[int, bool]] = []
            for n in news:
                result.append((ids[n.sha256], n.sha256 in created))
                created.discard(n.sha256)  # the same bytes again in this call: a duplicate of the first
            if then is not None:
                then(s, result)
            s.commit()
            return result

    @staticmethod
    def _add_labels(s: Session, rows: Sequence[tuple[int, NewImage]]) -> None:
        """The tags and albums of newly inserted images (each once, in the order given)."""
        tags = [{"image_id": i, "tag": t} for i, n in rows for t in dict.fromkeys(n.tags)]
        albums = [{"image_id": i, "album": a} for i, n in rows for a in dict.fromkeys(n.albums)]
        if tags:
            s.execute(insert(ImageTag), tags)
        if albums:
            s.execute(insert(ImageAlbum), albums)

    def insert_images_bulk(self, news: Sequence[NewImage]) -> list[int]:
        """Insert many new images in one transaction (vectors without pictures: tests, benchmarks). Core
        multi-row INSERT ... RETURNING in parameter order: ~10x faster than building ORM objects."""
        if not news:
            return []
        now = utcnow()
        with self.session() as s:
            result = s.execute(
                insert(Image).returning(col(Image.id), sort_by_parameter_order=True),
                [_image_row(n, now) for n in news],
            )
            ids = [int(r[0]) for r in result.all()]
            self._add_labels(s, list(zip(ids, news, strict=True)))
            s.commit()
            return ids

    def get_image(self, image_id: int) -> Image | None:
        with self.session() as s:
            return s.get(Image, image_id)

    def get_images(self, ids: Sequence[int]) -> dict[int, Image]:
        """One round trip for a page of hits."""
        if not ids:
            return {}
        with self.session() as s:
            rows = s.execute(select(Image).where(col(Image.id).in_(list(ids)))).scalars().all()
            return {r.id: r for r in rows}

    def hit_rows(self, ids: Sequence[int]) -> dict[int, HitRow]:
        """What a page of search hits needs (state and size), by primary key in one round trip: a plain column
        select, without building ORM objects for every row."""
        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(_HIT_ROWS, {"ids": list(ids)})
            return {r[0]: HitRow(r[0], r[1], r[2], r[3]) for r in rows}  # type: ignore[misc,arg-type]

    def ready_ids(self, ids: Sequence[int]) -> set[int]:
        if not ids:
            return set()
        with self.session() as s:
            rows = s.execute(
                select(col(Image.id)).where(
                    col(Image.id).in_(list(ids)), col(Image.state) == ImageState.ready
                )
            ).all()
            return {r[0] for r in rows}

    def existing_hashes(self, hashes: Iterable[str]) -> dict[str, int]:
        hs = list(dict.fromkeys(hashes))
        if not hs:
            return {}
        with self.session() as s:
            rows = s.execute(select(col(Image.sha256), col(Image.id)).where(col(Image.sha256).in_(hs))).all()
            return {sha: i for sha, i in rows}

    def _labels_for(self, table: Any, column: str, ids: Sequence[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {i: [] for i in ids}
        if not ids:
            return out
        value = col(getattr(table, column))
        with self.session() as s:
            rows = s.execute(
                select(col(table.image_id), value).where(col(table.image_id).in_(list(ids))).order_by(value)
            ).all()
            for image_id, label in rows:
                out.setdefault(image_id, []).append(label)
        return out

    def tags_for(self, ids: Sequence[int]) -> dict[int, list[str]]:
        return self._labels_for(ImageTag, "tag", ids)

    def albums_for(self, ids: Sequence[int]) -> dict[int, list[str]]:
        return self._labels_for(ImageAlbum, "album", ids)

    def has_text_for(self, ids: Sequence[int]) -> set[int]:
        if not ids:
            return set()
        with self.session() as s:
            rows = s.execute(
                select(col(ImageText.image_id)).where(
                    col(ImageText.image_id).in_(list(ids)), col(ImageText.has_text)
                )
            ).all()
            return {int(r[0]) for r in rows}

    def edit(
        self,
        ids: Sequence[int],
        fields: Mapping[str, Any],
        *,
        tags_add: Sequence[str] = (),
        tags_remove: Sequence[str] = (),
        tags_set: Sequence[str] | None = None,
        albums_add: Sequence[str] = (),
        albums_remove: Sequence[str] = (),
        albums_set: Sequence[str] | None = None,
    ) -> list[int]:
        """Change user fields of images in one transaction; returns the ids that exist."""
        with self.session() as s:
            found = [
                int(r[0]) for r in s.execute(select(col(Image.id)).where(col(Image.id).in_(list(ids)))).all()
            ]
            if not found:
                return []
            if fields:
                s.execute(update(Image).where(col(Image.id).in_(found)).values(**fields, updated_at=utcnow()))
            plan: list[tuple[Any, str, Sequence[str], Sequence[str], Sequence[str] | None]] = [
                (ImageTag, "tag", tags_add, tags_remove, tags_set),
                (ImageAlbum, "album", albums_add, albums_remove, albums_set),
            ]
            for table, column, add, remove, replace in plan:
                image_col = col(table.image_id)
                value_col = col(getattr(table, column))
                if replace is not None:
                    s.execute(delete(table).where(image_col.in_(found)))
                    add = replace
                if remove:
                    s.execute(delete(table).where(image_col.in_(found), value_col.in_(list(remove))))
                if add:
                    have = {
                        (int(a), b)
                        for a, b in s.execute(
                            select(image_col, value_col).where(image_col.in_(found), value_col.in_(list(add)))
                        ).all()
                    }
                    s.add_all(
                        [
                            table(image_id=i, **{column: v})
                            for i in found
                            for v in dict.fromkeys(add)
                            if (i, v) not in have
                        ]
                    )
            s.commit()
            return found

    # ------------------------------------------------------------ filtered queries (where: a compiled filter)

    def count_where(self, where: Any) -> int:
        with self.session() as s:
            return int(s.execute(select(func.count()).select_from(Image).where(where)).scalar_one())

    def ids_where(self, where: Any, limit: int | None = None) -> np.ndarray:
        stmt = select(col(Image.id)).where(where).order_by(col(Image.id))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            # The driver's rows as they come, without SQLAlchemy's per-row processing: a filter matching 1M
            # pictures took 4.8 s through .scalars(), 2.5 s this way (the SQL itself about 2.2 s).
            rows = conn.execute(stmt).cursor.fetchall()
            return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def browse_where(self, where: Any, *, sort: str, offset: int, limit: int) -> list[Image]:
        """A page of images matching `where`, sorted by added (newest first), taken (newest first, undated
        last) or name (A-Z); ties on id."""
        order: list[Any]
        if sort == "taken":
            order = [col(Image.taken_at).is_(None), col(Image.taken_at).desc(), col(Image.id).desc()]
        elif sort == "name":
            order = [func.lower(col(Image.original_name)), col(Image.id)]
        else:
            order = [col(Image.id).desc()]
        with self.session() as s:
            stmt = select(Image).where(where).order_by(*order).offset(offset).limit(limit)
            return list(s.execute(stmt).scalars().all())

    def facets(self, where: Any, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
        """Counts of tags, albums, capture years, cameras and formats among the images matching `where`."""
        matching = select(col(Image.id)).where(where).scalar_subquery()
        out: dict[str, list[dict[str, Any]]] = {}
        with self.session() as s:
            for name, key_col, table in (
                ("tags", col(ImageTag.tag), ImageTag),
                ("albums", col(ImageAlbum.album), ImageAlbum),
            ):
                rows = s.execute(
                    select(key_col, func.count())
                    .where(col(table.image_id).in_(matching))
                    .group_by(key_col)
                    .order_by(func.count().desc(), key_col)
                    .limit(limit)
                ).all()
                out[name] = [{"value": v, "count": int(n)} for v, n in rows]
            year = func.extract("year", col(Image.taken_at))
            for name, expr in (
                ("years", year),
                ("cameras", col(Image.camera_model)),
                ("formats", col(Image.format)),
            ):
                rows = s.execute(
                    select(expr, func.count())
                    .where(where, expr.is_not(None))
                    .group_by(expr)
                    .order_by(func.count().desc(), expr)
                    .limit(limit)
                ).all()
                out[name] = [{"value": int(v) if name == "years" else v, "count": int(n)} for v, n in rows]
        return out

    def duplicate_groups(self, max_distance: int, limit: int) -> list[list[tuple[int, int]]]:
        """Library-wide groups of near-duplicates by perceptual hash: (id, distance to the group's first image).
        Multi-index hashing finds candidate pairs: hashes within d bits agree exactly on at least one of d + 1
        blocks, so only same-block buckets are compared."""
        from loupe.ingest.exif import hamming

        with self.session() as s:
            rows = [
                (int(i), int(h))
                for i, h in s.execute(
                    select(col(Image.id), col(Image.phash))
                    .where(col(Image.phash).is_not(None), col(Image.state) == ImageState.ready)
                    .order_by(col(Image.id))
                )
            ]
        blocks = max_distance + 1
        width = 64 // blocks
        parent = {i: i for i, _ in rows}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        phash_of = dict(rows)
        for b in range(blocks):
            shift = b * width
            mask = (1 << (width if b < blocks - 1 else 64 - shift)) - 1
            buckets: dict[int, list[int]] = {}
            for i, h in rows:
                buckets.setdefault(((h & ((1 << 64) - 1)) >> shift) & mask, []).append(i)
            for members in buckets.values():
                if (
                    len(members) < 2 or len(members) > 2000
                ):  # a huge bucket is a degenerate hash (flat images)
                    continue
                for x in range(len(members)):
                    for y in range(x + 1, len(members)):
                        a, c = members[x], members[y]
                        if hamming(phash_of[a], phash_of[c]) <= max_distance:
                            ra, rc = find(a), find(c)
                            if ra != rc:
                                parent[max(ra, rc)] = min(ra, rc)
        groups: dict[int, list[int]] = {}
        for i, _ in rows:
            groups.setdefault(find(i), []).append(i)
        out = [[(i, hamming(phash_of[g[0]], phash_of[i])) for i in g] for g in groups.values() if len(g) > 1]
        out.sort(key=lambda g: (-len(g), g[0][0]))
        return out[:limit]

    def near_duplicates(
        self, phash: int, exclude: int, max_distance: int, limit: int
    ) -> list[tuple[int, int]]:
        """Images whose perceptual hash is within `max_distance` bits (a scan of the hashes: fast enough for
        libraries of a few hundred thousand; a BK-tree or multi-index hashing would be next)."""
        from loupe.ingest.exif import hamming

        out: list[tuple[int, int]] = []
        with self.session() as s:
            rows = s.execute(
                select(col(Image.id), col(Image.phash)).where(
                    col(Image.phash).is_not(None),
                    col(Image.id) != exclude,
                    col(Image.state) == ImageState.ready,
                )
            )
            for image_id, ph in rows:
                d = hamming(phash, ph)
                if d <= max_distance:
                    out.append((int(image_id), d))
        out.sort(key=lambda x: (x[1], x[0]))
        return out[:limit]

    def browse(
        self, *, before_id: int | None, limit: int, states: Sequence[str] | None = None
    ) -> list[Image]:
        """Newest first (ids are assigned in insertion order), keyset-paged by id."""
        stmt = select(Image).order_by(col(Image.id).desc())
        if before_id is not None:
            stmt = stmt.where(col(Image.id) < before_id)
        if states:
            stmt = stmt.where(col(Image.state).in_(list(states)))
        with self.session() as s:
            return list(s.execute(stmt.limit(limit)).scalars().all())

    def pending_count(self) -> int:
        """Pictures waiting to be processed (an index range on `state`: cheap while the backlog is small)."""
        with self.session() as s:
            query = select(func.count()).select_from(Image).where(col(Image.state) == ImageState.pending)
            return int(s.execute(query).scalar_one())

    def counts_by_state(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(col(Image.state), func.count()).group_by(col(Image.state))).all()
        counts = {st.value: 0 for st in ImageState}
        counts.update({state: n for state, n in rows})
        return counts

    def delete_image(self, image_id: int, model_version_id: int | None) -> Image | None:
        """Remove the row and log the deletion in one transaction. Returns the deleted row."""
        with self.session() as s:
            image = s.get(Image, image_id)
            if image is None:
                return None
            s.execute(delete(ImageTag).where(col(ImageTag.image_id) == image_id))
            s.execute(delete(ImageAlbum).where(col(ImageAlbum.image_id) == image_id))
            s.execute(delete(ImageText).where(col(ImageText.image_id) == image_id))
            s.delete(image)
            if model_version_id is not None and image.state == ImageState.ready:
                s.add(ChangeLog(image_id=image_id, model_version_id=model_version_id, op=ChangeOp.delete))
            s.commit()
            return image

    # ------------------------------------------------------------ text read in images

    def get_texts(self, ids: Sequence[int]) -> dict[int, ImageText]:
        if not ids:
            return {}
        with self.session() as s:
            rows = s.execute(select(ImageText).where(col(ImageText.image_id).in_(list(ids)))).scalars().all()
            return {r.image_id: r for r in rows}

    def keyword_candidates(self, tokens: Sequence[str], limit: int) -> list[int]:
        """Images whose text has one of the tokens as a word (stemmed), a word prefix, or (3+ characters) a
        substring, found through the full-text indexes (FTS5 on SQLite, tsvector + pg_trgm on Postgres)."""
        tokens = [t for t in tokens if t]
        if not tokens:
            return []
        found: dict[int, None] = {}
        with self.session() as s:
            if self._sqlite:
                fts = " OR ".join(f'"{t}"*' for t in tokens)
                rows = s.execute(
                    text(
                        "SELECT rowid FROM image_text_fts WHERE image_text_fts MATCH :q ORDER BY rank LIMIT :n"
                    ),
                    {"q": fts, "n": limit},
                ).all()
                found.update((int(r[0]), None) for r in rows)
                subs = [t for t in tokens if len(t) >= 3]
                if subs:
                    tri = " OR ".join(f'"{t}"' for t in subs)
                    rows = s.execute(
                        text(
                            "SELECT rowid FROM image_text_trigram WHERE image_text_trigram MATCH :q LIMIT :n"
                        ),
                        {"q": tri, "n": limit},
                    ).all()
                    found.update((int(r[0]), None) for r in rows)
            else:
                tsq = " | ".join(f"{t}:*" for t in tokens)
                rows = s.execute(
                    text(
                        "SELECT image_id FROM image_text WHERE tsv @@ to_tsquery('english', :q) "
                        "ORDER BY ts_rank_cd(tsv, to_tsquery('english', :q)) DESC LIMIT :n"
                    ),
                    {"q": tsq, "n": limit},
                ).all()
                found.update((int(r[0]), None) for r in rows)
                for t in (t for t in tokens if len(t) >= 3):
                    rows = s.execute(
                        text("SELECT image_id FROM image_text WHERE content ILIKE :p LIMIT :n"),
                        {
                            "p": "%" + t.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
                            "n": limit,
                        },
                    ).all()
                    found.update((int(r[0]), None) for r in rows)
        return list(found)

    # ------------------------------------------------------------ the ingest queue

    def claim_pending(self, limit: int, lease_s: float) -> list[Image]:
        """Claim up to `limit` due pending images (or stale claims) for this worker, in id order.

        One UPDATE ... WHERE id IN (SELECT ... [FOR UPDATE SKIP LOCKED]) RETURNING the claimed rows: on Postgres
        several workers never claim the same row; SQLite serializes writers, so the single statement is enough
        there. (Returning the rows, not their ids and a second SELECT: 1.99 -> 1.20 ms a batch of 8 on SQLite,
        4.21 -> 2.91 ms on Postgres; the GIL is held for most of it, beside the other lanes' pictures.)
        """
        now = utcnow()
        due = or_(
            (col(Image.state) == ImageState.pending)
            & (or_(col(Image.next_attempt_at).is_(None), col(Image.next_attempt_at) <= now)),
            (col(Image.state) == ImageState.processing)
            & (col(Image.claimed_at) < now - timedelta(seconds=lease_s)),
        )
        sub = select(col(Image.id)).where(due).order_by(col(Image.id)).limit(limit)
        if not self._sqlite:
            sub = sub.with_for_update(skip_locked=True)
        stmt = (
            update(Image)
            .where(col(Image.id).in_(sub.scalar_subquery()))
            .values(
                state=ImageState.processing, claimed_at=now, attempts=col(Image.attempts) + 1, updated_at=now
            )
            .returning(Image)
            .execution_options(synchronize_session=False)  # a new session: nothing loaded to synchronize
        )
        with self.session() as s:
            rows = list(s.scalars(stmt).all())
            s.commit()
        return sorted(rows, key=lambda image: int(image.id or 0))

    def release(self, ids: Sequence[int], *, retry_in_s: float) -> None:
        """Put claimed images back in the queue without spending an attempt (the failure was not theirs)."""
        if not ids:
            return
        with self.session() as s:
            s.execute(
                update(Image)
                .where(col(Image.id).in_(list(ids)), col(Image.state) == ImageState.processing)
                .values(
                    state=ImageState.pending,
                    claimed_at=None,
                    attempts=func.max(col(Image.attempts) - 1, 0)
                    if self._sqlite
                    else func.greatest(col(Image.attempts) - 1, 0),
                    next_attempt_at=utcnow() + timedelta(seconds=retry_in_s),
                )
            )
            s.commit()

    def release_claims(self) -> int:
        """At the start of an embedded (single-process) server every `processing` row is an interrupted claim."""
        with self.session() as s:
            result = s.execute(
                update(Image)
                .where(col(Image.state) == ImageState.processing)
                .values(state=ImageState.pending, claimed_at=None, next_attempt_at=None)
            )
            s.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def mark_ready(
        self,
        image_ids: Sequence[int],
        model_version_id: int,
        updates: dict[int, dict[str, Any]],
        texts: Sequence[ImageText] = (),
    ) -> None:
        """Mark embedded images ready, store what OCR read, and append the upserts to the change log: atomically.
        Images deleted meanwhile are skipped (nothing is logged for them)."""
        if not image_ids:
            return
        now = utcnow()
        done = {
            "state": ImageState.ready,
            "ready_at": now,
            "updated_at": now,
            "claimed_at": None,
            "error_code": None,
            "error_message": None,
        }
        with self.session() as s:
            if updates:
                # One executemany per set of columns written (pictures with and without EXIF differ), on the
                # table rather than through the ORM's bulk update: 4.23 -> 0.63 ms a batch of 8 on SQLite, 7.02
                # -> 2.30 ms on Postgres. The rows that exist are read after the updates, which hold their
                # write locks (SQLite's database lock, Postgres' row locks), so a delete cannot slip between.
                table = Image.__table__  # type: ignore[attr-defined]
                groups: dict[tuple[str, ...], list[dict[str, object]]] = {}
                for image_id in image_ids:
                    values: dict[str, object] = {**done, **updates.get(image_id, {})}
                    groups.setdefault(tuple(values), []).append(
                        {"b_id": image_id, **{f"v_{k}": v for k, v in values.items()}}
                    )
                for keys, rows in groups.items():
                    s.execute(
                        update(table)
                        .where(table.c.id == bindparam("b_id"))
                        .values({k: bindparam(f"v_{k}") for k in keys}),
                        rows,
                    )
                live = sorted(
                    int(r[0]) for r in s.execute(select(table.c.id).where(table.c.id.in_(list(image_ids))))
                )
            else:  # the bulk case (vectors without pictures): one statement
                res = s.execute(
                    update(Image)
                    .where(col(Image.id).in_(list(image_ids)))
                    .values(**done)
                    .returning(col(Image.id))
                )
                live = sorted(int(r[0]) for r in res.all())
            kept = set(live)
            if texts:
                # A retried image replaces what an interrupted attempt may have written.
                s.execute(delete(ImageText).where(col(ImageText.image_id).in_([t.image_id for t in texts])))
                s.add_all([t for t in texts if t.image_id in kept])
            if live:
                s.execute(
                    insert(ChangeLog.__table__),  # type: ignore[attr-defined]
                    [
                        {
                            "image_id": i,
                            "model_version_id": model_version_id,
                            "op": ChangeOp.upsert,
                            "created_at": now,
                        }
                        for i in live
                    ],
                )
            s.commit()

    def mark_failed(self, image_id: int, code: str, message: str, *, retry_at: datetime | None) -> None:
        """A failure: back to pending with a retry time, or `failed` for good when retry_at is None."""
        now = utcnow()
        with self.session() as s:
            s.execute(
                update(Image)
                .where(col(Image.id) == image_id)
                .values(
                    state=ImageState.pending if retry_at else ImageState.failed,
                    next_attempt_at=retry_at,
                    claimed_at=None,
                    error_code=code,
                    error_message=message[:1000],
                    updated_at=now,
                )
            )
            s.commit()

    # ------------------------------------------------------------ change log

    def changes_since(self, model_version_id: int, after_seq: int, limit: int) -> list[Change]:
        with self.session() as s:
            rows = s.execute(
                select(col(ChangeLog.seq), col(ChangeLog.image_id), col(ChangeLog.op))
                .where(col(ChangeLog.model_version_id) == model_version_id, col(ChangeLog.seq) > after_seq)
                .order_by(col(ChangeLog.seq))
                .limit(limit)
            ).all()
        return [Change(seq, image_id, ChangeOp(op)) for seq, image_id, op in rows]

    def count_changes_since(self, model_version_id: int, after_seq: int) -> int:
        with self.session() as s:
            return int(
                s.execute(
                    select(func.count()).where(
                        col(ChangeLog.model_version_id) == model_version_id,
                        col(ChangeLog.seq) > after_seq,
                    )
                ).one()[0]
            )

    def last_seq(self) -> int:
        with self.session() as s:
            return int(s.execute(select(func.coalesce(func.max(col(ChangeLog.seq)), 0))).one()[0])

    def ready_count(self) -> int:
        with self.session() as s:
            return int(s.execute(select(func.count()).where(col(Image.state) == ImageState.ready)).one()[0])

    # ------------------------------------------------------------ model versions

    def active_model(self, channel: str) -> ModelVersion | None:
        with self.session() as s:
            return (
                s.execute(
                    select(ModelVersion).where(col(ModelVersion.channel) == channel, col(ModelVersion.active))
                )
                .scalars()
                .first()
            )

    def activate_first_model(
        self, channel: str, name: str, fingerprint: str, dim: int, is_demo: bool
    ) -> ModelVersion:
        """Record the model of a new library (the first start). Returns the active version."""
        with self.session() as s:
            current = (
                s.execute(
                    select(ModelVersion).where(col(ModelVersion.channel) == channel, col(ModelVersion.active))
                )
                .scalars()
                .first()
            )
            if current is not None:
                return current
            version = ModelVersion(
                channel=channel, name=name, fingerprint=fingerprint, dim=dim, is_demo=is_demo, active=True
            )
            s.add(version)
            s.commit()
            return version

    def create_model_version(
        self, channel: str, name: str, fingerprint: str, dim: int, is_demo: bool
    ) -> ModelVersion:
        """A new, inactive version (its vectors are being written)."""
        with self.session() as s:
            version = ModelVersion(
                channel=channel, name=name, fingerprint=fingerprint, dim=dim, is_demo=is_demo, active=False
            )
            s.add(version)
            s.commit()
            return version

    def activate_model(self, version_id: int) -> ModelVersion:
        """Make this version the active one of its channel, in one transaction."""
        with self.session() as s:
            version = s.get(ModelVersion, version_id)
            if version is None:
                raise KeyError(version_id)
            s.execute(
                update(ModelVersion)
                .where(col(ModelVersion.channel) == version.channel, col(ModelVersion.id) != version_id)
                .values(active=False)
            )
            version.active = True
            s.add(version)
            s.commit()
            return version

    def model_versions(self, channel: str) -> list[ModelVersion]:
        with self.session() as s:
            return list(
                s.execute(
                    select(ModelVersion)
                    .where(col(ModelVersion.channel) == channel)
                    .order_by(col(ModelVersion.id))
                ).scalars()
            )

    def all_ready_ids(self) -> np.ndarray:
        return self.ids_where(col(Image.state) == ImageState.ready)
