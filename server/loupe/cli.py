"""`loupe serve | config | import | make-test-model | db upgrade`: the same services as the API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from loupe.config import Settings
from loupe.errors import ConfigError, LoupeError

log = logging.getLogger("loupe")


def _setup_logging(level: str) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        handlers=[
            RichHandler(console=Console(stderr=True), rich_tracebacks=False, show_path=False)
        ],  # stdout: results
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_settings() -> Settings:
    from pydantic import ValidationError

    from loupe.config import unknown_settings

    for name in unknown_settings():
        log.warning("%s is not a Loupe setting and is ignored (`loupe config` lists them)", name)
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"LOUPE_{'__'.join(str(p).upper() for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loupe.app import create_app
    from loupe.runtime import Runtime

    settings = _load_settings()
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    settings.server.host, settings.server.port = host, port  # LOUPE_AUTH__MODE=auto decides by the address
    if settings.server.blas_threads:
        from threadpoolctl import threadpool_limits

        # Process-wide: requests run in parallel threads, each numpy product on one core (no oversubscription).
        threadpool_limits(limits=settings.server.blas_threads, user_api="blas")
    # Open the stores and the model before the server: a bad setting is one clear line, not a traceback.
    runtime = Runtime.open(settings)
    log.info("Loupe on http://%s:%d  (data: %s)", host, port, settings.data_dir)
    if not settings.auth_required and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s with LOUPE_AUTH__MODE=off: anyone who can reach it can change the library", host
        )
    app = create_app(settings, runtime, owns_runtime=True)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), timeout_graceful_shutdown=30)
    return 0


def cmd_config(_: argparse.Namespace) -> int:
    print(json.dumps(_load_settings().public_dict(), indent=2, default=str))
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from loupe.models import tiny_clip

    recipe = tiny_clip.Recipe(steps=args.steps) if args.steps else tiny_clip.Recipe()
    out = Path(args.dir).expanduser().resolve()
    if (out / "loupe_recipe.json").exists() and not args.force:
        data = json.loads((out / "loupe_recipe.json").read_text())
        if data.get("fingerprint") == recipe.fingerprint():
            print(f"{out}: already built with this recipe ({data.get('metrics')})")
            return 0
    metrics = tiny_clip.train(
        recipe, out, progress=lambda s, n, loss: log.info("step %d/%d  loss %.3f", s, n, loss)
    )
    print(
        f"saved to {out}: text->image precision@5 {metrics['text_p5']:.2f} "
        f"(colour {metrics['colour_p5']:.2f}, shape {metrics['shape_p5']:.2f})"
    )
    return 0


def cmd_db_upgrade(_: argparse.Namespace) -> int:
    from loupe.storage.metadata.engine import create_db_engine, upgrade

    settings = _load_settings()
    engine = create_db_engine(settings.effective_database_url)
    upgrade(engine)
    print(f"database at {settings.public_dict()['database_url']} is at the latest schema")
    return 0


def _collect(paths: list[str], include: list[str], exclude: list[str]) -> list[tuple[Path, Path]]:
    """(file, root it was found under), recursively, filtered by globs on the path relative to its root."""
    from fnmatch import fnmatch

    found: list[tuple[Path, Path]] = []
    for p in paths:
        root = Path(p)
        if root.is_file():
            found.append((root, root.parent))
            continue
        if not root.is_dir():
            raise ConfigError(f"not found: {p}")
        for f in sorted(x for x in root.rglob("*") if x.is_file()):
            rel = f.relative_to(root).as_posix()
            if any(part.startswith(".") for part in f.relative_to(root).parts):
                continue
            if include and not any(fnmatch(rel, g) or fnmatch(f.name, g) for g in include):
                continue
            if any(fnmatch(rel, g) or fnmatch(f.name, g) for g in exclude):
                continue
            found.append((f, root))
    return found


def cmd_import(args: argparse.Namespace) -> int:
    """Add every picture under PATHS: directly into the data directory (taking its lock: refused while a server
    runs; the model embeds what is stored while the rest is read and stored) or, with --server, through a running
    server's API. Files already stored (same SHA-256) are skipped before they are sent, so an interrupted import
    simply runs again."""
    from rich.console import Console
    from rich.progress import Progress

    from loupe.ingest.importer import IMPORT_SENDERS, import_direct, send_groups

    files = _collect(args.paths, args.include or [], args.exclude or [])
    if args.senders is not None and args.senders < 1:
        print("loupe import: --senders must be at least 1", file=sys.stderr)
        return 2
    senders = args.senders or IMPORT_SENDERS

    def album_for(f: Path, root: Path) -> list[str]:
        albums = list(args.album or [])
        if args.album_per_folder and f.parent != root:
            albums.append(f.parent.relative_to(root).as_posix())
        return albums

    groups: dict[tuple[str, ...], list[Path]] = {}
    for f, root in files:
        groups.setdefault(tuple(album_for(f, root)), []).append(f)

    with Progress(console=Console(stderr=True)) as progress:  # stdout: the JSON result
        if args.server:
            import httpx

            client = httpx.Client(base_url=args.server.rstrip("/"), timeout=300)

            def existing_of(hashes: list[str]) -> dict[str, int]:
                res = client.post("/api/images/exists", json={"sha256": hashes}).raise_for_status()
                return dict(res.json()["existing"])

            def send(
                batch: list[tuple[str, bytes]], albums: tuple[str, ...], _: list[str]
            ) -> list[dict[str, Any]]:
                # The server hashes what it receives itself.
                res = client.post(
                    "/api/images",
                    files=[("file", (n, d, "application/octet-stream")) for n, d in batch],
                    data={"tags": ",".join(args.tag or []), "albums": ",".join(albums)},
                )
                body = res.json()
                return body["files"] if "files" in body else body["error"]["detail"]["files"]  # type: ignore[no-any-return]

            counts = send_groups(groups, existing_of, send, progress, senders=senders)
        else:
            from loupe.runtime import Runtime

            runtime = Runtime.open(_load_settings())
            try:
                counts = import_direct(runtime, groups, args.tag or [], progress, senders)
            finally:
                runtime.close()
    print(json.dumps(counts))
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Compare the database with Qdrant, the FAISS mirror and the files; with --repair, fix what differs."""
    from loupe.ingest.reindex import check
    from loupe.runtime import Runtime

    rt = Runtime.open(_load_settings())
    try:
        report = check(rt, repair=args.repair)
        if args.repair and report.repaired:
            rt.ingest.drain()  # re-embed what went back to pending
            rt.sync_mirror()
    finally:
        rt.close()
    print(json.dumps(report.to_dict(), indent=2))
    return 0 if report.clean or report.repaired else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """Retrieval quality of a labelled query set: the running configuration, then each --compare variant."""
    from rich.console import Console
    from rich.table import Table

    from loupe.runtime import Runtime
    from loupe.search.evaluate import load_queries, run_eval

    variants = [(v, [o.strip() for o in v.split(";") if o.strip()]) for v in args.compare or []]
    rt = Runtime.open(_load_settings())
    try:
        queries = load_queries(Path(args.queries), rt)
        reports = run_eval(rt, queries, args.k, variants)
    finally:
        rt.close()
    table = Table(title=f"{len(queries)} queries from {args.queries}, K={args.k}")
    for col in (
        "variant",
        "kind",
        "n",
        f"Recall@{args.k}",
        f"P@{args.k}",
        f"mAP@{args.k}",
        f"NDCG@{args.k}",
        "ms p50",
    ):
        table.add_column(col, justify="left" if col in ("variant", "kind") else "right")
    legend: list[str] = []
    for n, r in enumerate(reports):
        label = "current" if n == 0 else f"#{n}"
        if n:
            legend.append(f"#{n} = {r.name}" + "".join(f"\n     {note}" for note in r.notes))
        for kind, m in r.by_kind.items():
            table.add_row(
                label,
                kind,
                str(int(m["n"])),
                *(f"{m[x]:.3f}" for x in ("recall", "precision", "map", "ndcg")),
                f"{r.ms_p50:.1f}",
            )
    console = Console(stderr=True, width=120)
    console.print(table)
    for line in legend:
        console.print(line, markup=False, highlight=False)
    result = {"k": args.k, "queries": len(queries), "reports": [r.as_dict() for r in reports]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    summary = [{"name": r.name, **{kind: m for kind, m in r.by_kind.items()}} for r in reports]
    print(json.dumps(summary, indent=2))
    if args.min_map is not None:
        worst = min(r.by_kind["all"]["map"] for r in reports[:1])
        if worst < args.min_map:
            print(f"loupe: mAP@{args.k} {worst:.3f} is under the floor {args.min_map}", file=sys.stderr)
            return 1
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    """Model versions: list them, or switch the library to another checkpoint (re-embeds, then switches)."""
    if args.model_command == "use" and args.server:
        return _model_use_remote(args)
    if args.model_command == "list":
        return _model_list(_load_settings())
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from loupe.runtime import Runtime

    rt = Runtime.open(_load_settings())
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout: the JSON result
            task = bar.add_task(f"re-embedding with {args.name}", total=None)
            status = rt.switcher.run(
                args.name, lambda st: bar.update(task, total=st.total, completed=st.done)
            )
        print(json.dumps(status.as_dict()))
        print(
            f"the library now uses {args.name}. Set LOUPE_CLIP_MODEL={args.name} (or leave it unset) for the "
            "next start.",
            file=sys.stderr,
        )
        return 0
    finally:
        rt.close()


def _model_list(settings: Settings) -> int:
    """The model versions, read from the database alone: no model loaded, no store opened, no data-directory lock,
    so it answers in a second, beside a running server too (SQLite readers do not block its writer)."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from loupe.storage.metadata.engine import create_db_engine
    from loupe.storage.metadata.repo import MetadataRepo
    from loupe.storage.metadata.tables import ModelVersion

    url = make_url(settings.effective_database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        return 0  # a library not created yet has no versions (and listing must not create its database)
    engine = create_db_engine(settings.effective_database_url)
    try:
        if not inspect(engine).has_table(ModelVersion.__tablename__):
            return 0
        versions = MetadataRepo(engine).model_versions("clip")
    except DBAPIError as exc:
        raise ConfigError(
            f"cannot read the model versions from {settings.public_dict()['database_url']} "
            f"({type(exc.orig).__name__}: {exc.orig}); `loupe db upgrade` brings an older schema up to date"
        ) from exc
    finally:
        engine.dispose()
    for v in versions:
        print(json.dumps(v.model_dump(mode="json")))
    return 0


def _model_use_remote(args: argparse.Namespace) -> int:
    import time

    import httpx

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    with httpx.Client(base_url=args.server.rstrip("/"), timeout=60, headers=headers) as client:
        res = client.post("/api/models", json={"name": args.name})
        if res.status_code != 202:
            raise LoupeError(f"the server refused: {res.status_code} {res.text}")
        while True:
            st = client.get("/api/models").json()["switch"]
            print(f"{st['state']}: {st['done']}/{st['total']}", file=sys.stderr)
            if st["state"] in ("done", "failed"):
                print(json.dumps(st))
                return 0 if st["state"] == "done" else 1
            time.sleep(2)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the library's model on its own pairs (or a JSONL), judged on held-out pairs; --activate switches."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from loupe.config import FinetuneSettings
    from loupe.runtime import Runtime
    from loupe.search.evaluate import apply_overrides

    settings = _load_settings()
    if args.set:
        settings = apply_overrides(
            settings, [f"finetune.{o}" if not o.startswith("finetune.") else o for o in args.set]
        )
    ft: FinetuneSettings = settings.finetune
    rt = Runtime.open(settings)
    try:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout: the JSON result
            task = bar.add_task("fine-tuning", total=None, loss="")

            def progress(phase: str, step: int, steps: int, loss: float) -> None:
                bar.update(
                    task,
                    description=f"fine-tuning ({phase})",
                    total=steps,
                    completed=step,
                    loss=f"loss {loss:.3f}",
                )

            report = rt.finetuner.run(ft, Path(args.pairs) if args.pairs else None, args.activate, progress)
    finally:
        rt.close()
    print(json.dumps(report.as_dict(), indent=2))
    if not report.accepted:
        print(f"loupe: refused, the active model is unchanged: {report.reason}", file=sys.stderr)
        return 1
    if not args.activate:
        print(f"accepted: activate it with `loupe model use {report.output}`", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys: create (printed once), list, revoke. Works on the database directly (no data-dir lock needed)."""
    from loupe.auth import KeyService, describe
    from loupe.signing import load_or_create_secret
    from loupe.storage.metadata.engine import create_db_engine, upgrade
    from loupe.storage.metadata.repo import MetadataRepo

    settings = _load_settings()
    engine = create_db_engine(settings.effective_database_url)
    upgrade(engine)
    keys = KeyService(MetadataRepo(engine), load_or_create_secret(settings.data_dir), settings.auth)
    if args.keys_command == "create":
        key, token = keys.create(args.name, args.scope or ["read"])
        print(json.dumps({**describe(key), "key": token}, default=str))
    elif args.keys_command == "list":
        print(json.dumps([describe(k) for k in keys.list()], default=str, indent=2))
    else:
        keys.revoke(args.id)
        print(json.dumps({"revoked": args.id}))
    engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description="Semantic image search server")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP server (API + web gallery)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("make-test-model", help="build and train the tiny CLIP offline into DIR")
    p.add_argument("dir")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_make_test_model)
    p = sub.add_parser("db", help="database schema")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    p2 = dbsub.add_parser("upgrade", help="apply Alembic migrations up to the latest")
    p2.set_defaults(func=cmd_db_upgrade)
    p = sub.add_parser(
        "import",
        help="add the pictures under PATHS (directly, with the server stopped, or through --server URL)",
    )
    p.add_argument("paths", nargs="+")
    p.add_argument("--tag", action="append", help="tag every imported picture (repeatable)")
    p.add_argument("--album", action="append", help="put every imported picture in this album (repeatable)")
    p.add_argument("--album-per-folder", action="store_true", help="each sub-folder becomes an album")
    p.add_argument("--include", action="append", help="only files matching this glob (repeatable)")
    p.add_argument("--exclude", action="append", help="skip files matching this glob (repeatable)")
    p.add_argument(
        "--senders",
        type=int,
        default=None,
        help="upload requests sent at once (default: half the cores, at most 4)",
    )
    p.add_argument(
        "--server", help="a running Loupe, e.g. http://127.0.0.1:8000 (default: the data directory)"
    )
    p.set_defaults(func=cmd_import)
    p = sub.add_parser(
        "reindex", help="check the stores against the database (exit 1 on differences); --repair fixes"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report only (the default)")
    mode.add_argument("--repair", action="store_true", help="fix every difference found")
    p.set_defaults(func=cmd_reindex)
    p = sub.add_parser(
        "eval", help="Recall@K, P@K, mAP@K and NDCG@K of a labelled query set (JSONL), settings side by side"
    )
    p.add_argument("queries", help="JSONL: one query per line (see loupe.search.evaluate)")
    p.add_argument("-k", type=int, default=10, help="cut-off K (default 10)")
    p.add_argument(
        "--compare",
        action="append",
        metavar="OVERRIDES",
        help="a variant: area.name=value overrides separated by ';', e.g. 'index.exact_max=0;index.nprobe=8' "
        "or 'search.prf_k=5' or 'clip_model=/path' (repeatable)",
    )
    p.add_argument("--json", help="write the full report (per-query results included) to this file")
    p.add_argument("--min-map", type=float, default=None, help="exit 1 when the current mAP@K is below this")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("model", help="model versions: list, or switch the library to another CLIP checkpoint")
    msub = p.add_subparsers(dest="model_command", required=True)
    msub.add_parser("list", help="the library's model versions (the active one marked)")
    m = msub.add_parser("use", help="re-embed the library with NAME (hub id or directory), then switch to it")
    m.add_argument("name")
    m.add_argument("--server", help="a running Loupe: switch there while it keeps serving (admin key)")
    m.add_argument("--key", help="admin API key for --server")
    p.set_defaults(func=cmd_model)
    p = sub.add_parser(
        "finetune",
        help="adapt the model to the library (LoRA, held-out guard); --activate switches to the result",
    )
    p.add_argument(
        "--pairs", help="JSONL of {image_id | path, caption} (default: descriptions, tags and albums)"
    )
    p.add_argument("--activate", action="store_true", help="switch the library to the result when accepted")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="a fine-tuning setting, e.g. steps=500 or method=joint",
    )
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("keys", help="API keys: create, list, revoke")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("create", help="create a key (printed once)")
    k.add_argument("name")
    k.add_argument(
        "--scope", action="append", choices=["read", "write", "admin"], help="repeatable (default: read)"
    )
    ksub.add_parser("list", help="list keys (never their secrets)")
    k = ksub.add_parser("revoke", help="revoke a key by id")
    k.add_argument("id", type=int)
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        level = Settings().log_level
    except Exception:
        level = "INFO"
    _setup_logging(level)
    try:
        return int(args.func(args) or 0)
    except LoupeError as exc:
        print(f"loupe: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
