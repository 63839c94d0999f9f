"""`loupe serve | config | import | make-test-model | db upgrade`: the same services as the API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from loupe.config import Settings
from loupe.errors import ConfigError, LoupeError

log = logging.getLogger("loupe")


def _setup_logging(level: str) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_settings() -> Settings:
    from pydantic import ValidationError

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
    # Open the stores and the model before the server: a bad setting is one clear line, not a traceback.
    runtime = Runtime.open(settings)
    log.info("Loupe on http://%s:%d  (data: %s)", host, port, settings.data_dir)
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


def cmd_import(args: argparse.Namespace) -> int:
    """Add every image under the given paths (recursively) and process them, with a progress bar."""
    from rich.progress import Progress

    from loupe.runtime import Runtime

    settings = _load_settings()
    paths: list[Path] = []
    for p in args.paths:
        root = Path(p)
        if root.is_dir():
            paths.extend(sorted(x for x in root.rglob("*") if x.is_file()))
        elif root.is_file():
            paths.append(root)
        else:
            print(f"not found: {p}", file=sys.stderr)
            return 2
    rt = Runtime.open(settings)
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    try:
        with Progress() as progress:
            task = progress.add_task("storing", total=len(paths))
            for start in range(0, len(paths), 32):
                chunk = paths[start : start + 32]
                outcomes = rt.ingest.upload([(str(p.name), p.read_bytes()) for p in chunk], args.tag or [])
                for p, o in zip(chunk, outcomes, strict=True):
                    counts[o.status] += 1
                    if o.status == "rejected" and o.error:
                        progress.console.print(f"[yellow]rejected[/] {p}: {o.error['message']}")
                progress.advance(task, len(chunk))
            pending = rt.repo.counts_by_state()["pending"]
            task2 = progress.add_task("embedding", total=pending)
            while True:
                report = rt.ingest.process_batch()
                if report.claimed == 0:
                    break
                progress.advance(task2, report.ready + report.failed)
        rt.sync_mirror()
    finally:
        rt.close()
    print(json.dumps(counts))
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
    p = sub.add_parser("import", help="add the images under PATHS and embed them (server must be stopped)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--tag", action="append", help="tag every imported image (repeatable)")
    p.set_defaults(func=cmd_import)
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
