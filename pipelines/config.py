"""Settings for every stage: one typed model, read from defaults < YAML file < env vars < CLI flags.

The YAML file is named by `--config` or `CATALOG_INDEX_CONFIG`; env vars are
`CATALOG_INDEX_<FIELD>` and `CATALOG_INDEX_<SECTION>__<FIELD>` (for example
`CATALOG_INDEX_WAREHOUSE=s3://bucket/prefix`, `CATALOG_INDEX_CRAWL__MAX_BYTES=10000000`).
Settings are plain data: they are pickled into Spark tasks, so nothing here opens a
connection or a file at import time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.reasons import DECODE_FAILURE_REASONS
from pipelines.errors import UsageError

DEFAULT_WAREHOUSE = (Path.home() / ".catalog-index" / "warehouse").as_uri()


class ConfigError(UsageError):
    """A setting is missing or malformed; the message says which and where it came from."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not silently ignored


class S3Settings(_Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, Ceph...). None = AWS.")
    region: str | None = Field(None, description="AWS region; None = the credential chain's default.")
    max_attempts: int = Field(8, ge=1, description="botocore retry attempts (standard mode).")
    multipart_threshold_mb: int = Field(64, ge=5, description="Objects above this are uploaded in parts.")
    multipart_chunk_mb: int = Field(16, ge=5)
    checksums: Literal["when_required", "when_supported"] = Field(
        "when_required", description="boto3's request_checksum_calculation and response_checksum_validation. "
        "'when_supported' (boto3's default since 2025) sends CRC checksum headers on every upload, which several "
        "S3-compatible stores reject or mangle; 'when_required' sends them only where S3 requires them. Files are "
        "verified by their sha256 either way.")


class SparkSettings(_Section):
    master: str = Field("local[*]", description="Spark master URL used when a job starts its own session.")
    profile: str = Field("local", description="Spark profile file in infra/spark/<profile>.conf.")
    log_level: str = Field("ERROR", description="Spark's own log level (WARN/INFO to debug Spark itself).")
    conf: dict[str, str] = Field(default_factory=dict, description="Extra spark.* settings.")


class CrawlSettings(_Section):
    """`crawl:` settings. No URL costs more than (retries + 1) * total_timeout_s plus
    retries * max_backoff_s of waiting (plus any wait for a free per-host slot)."""
    connect_timeout_s: float = Field(5.0, gt=0, description="Longest wait for a TCP connection (and TLS handshake).")
    read_timeout_s: float = Field(15.0, gt=0, description="Longest silence between two received chunks.")
    total_timeout_s: float = Field(
        60.0, gt=0, description="Wall-clock deadline of one attempt at a URL: connect, TLS, headers, every redirect "
                                "hop and the whole body, however slowly bytes arrive.")
    retries: int = Field(3, ge=0, description="Retries after the first attempt, on 5xx/429/resets "
                                              "(and attempts that ran out of time, with retry_timeouts).")
    retry_timeouts: bool = Field(
        False, description="Retry an attempt that ran past a timeout. Off: a server that trickles or hangs costs one "
                           "total_timeout_s, not retries + 1 of them.")
    backoff_s: float = Field(0.5, ge=0, description="First retry wait; doubles each retry (with jitter).")
    max_backoff_s: float = Field(
        30.0, ge=0, description="Longest wait before a retry, a server's Retry-After included; a server that asks "
                                "for a longer wait is not retried.")
    max_bytes: int = Field(25_000_000, gt=0, description="Larger bodies (after Content-Encoding is decoded) are "
                                                          "quarantined as too_large.")
    max_pixels: int = Field(50_000_000, gt=0, description="width*height above this is a decompression_bomb.")
    min_side: int = Field(1, ge=1, description="Images with a smaller width or height are quarantined.")
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"],
        description="Image formats (detected from magic bytes) that are kept.")
    concurrency: int = Field(16, ge=1, description="Concurrent fetches per Spark task.")
    slow_fetch_s: float = Field(
        5.0, gt=0, description="A fetch running longer than this stops counting against concurrency (up to "
                               "concurrency such fetches more per task): slow servers cannot take a task's threads.")
    per_host_concurrency: int = Field(8, ge=1, description="Concurrent fetches to one host:port per Spark task.")
    rows_per_task: int = Field(1000, ge=1, description="Manifest rows handled by one Spark task.")
    max_redirects: int = Field(5, ge=0)
    max_url_length: int = Field(8192, ge=16, description="Longer image URLs are quarantined as bad_url.")
    user_agent: str = Field("catalog-index/0.1 (+https://github.com/catalog-index/catalog-index)")
    allow_private_hosts: bool = Field(
        False, description="Allow URLs resolving to loopback/private/link-local addresses and file:// "
                           "(cloud metadata addresses stay refused unless named in allow_networks).")
    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs allowed even though they are not public (e.g. an internal CDN).")
    allow_s3_buckets: list[str] = Field(
        default_factory=list, description="Buckets whose s3:// image URLs may be read (with s3_profile's "
                                          "credentials); s3:// URLs of any other bucket are ssrf_blocked.")
    s3_profile: str | None = Field(
        None, description="AWS profile used to read s3:// image URLs; None = the default credential chain.")
    proxy: str | None = Field(
        None, description="HTTP(S) proxy for image URLs (http://host:port). The proxy then resolves names and "
                          "connects: it must enforce egress rules itself. HTTP(S)_PROXY and .netrc are never read.")
    ca_bundle: str | None = Field(
        None, description="CA certificates (PEM file) for https:// image URLs; None = certifi's bundle.")
    max_manifest_bytes: int = Field(
        1_000_000_000, gt=0, description="Largest manifest accepted, downloaded and after decompression.")
    manifest_timeout_s: float = Field(600.0, gt=0, description="Deadline for downloading an http(s):// manifest.")

    @property
    def worst_case_s(self) -> float:
        """The documented bound on the time one URL can cost (per-host slot waits aside)."""
        return (self.retries + 1) * self.total_timeout_s + self.retries * self.max_backoff_s


class DedupSettings(_Section):
    # Defaults = pipelines.dedup.near_duplicates.CANDIDATE_MAX_DISTANCE / .confirmation.CONFIRMATION_THRESHOLD,
    # tuned on planted duplicates (bench/dedup); a test keeps them equal.
    max_distance: int = Field(16, ge=0, le=32, description="pHash Hamming distance for candidate pairs "
                              "(imagededup's PHash default is 10; the confirmation step allows a wider net).")
    confirm_threshold: float = Field(0.965, ge=0, le=1, description="Pixel-level confirmation score needed to "
                                     "merge a candidate pair (see pipelines/dedup/confirmation.py).")
    jpeg_draft_size: int | None = Field(64, ge=32, description="Decode JPEGs at 1/2-1/8 scale (>= this many "
                                        "pixels a side) before hashing: ~6x faster, same dedup quality, but hashes of "
                                        "some JPEGs differ from imagehash.phash by a few bits; None = exact "
                                        "imagehash.phash (other formats are always exact).")
    images_per_task: int = Field(2000, ge=1, description="Images hashed per Spark task.")
    pairs_per_task: int = Field(2000, ge=1, description="Candidate pairs confirmed per Spark task.")


class EmbedSettings(_Section):
    pooling: str = Field("gem", pattern="^(gem|avg)$", description="Global pooling of the feature map: GeM (p=3) or avg.")
    framing: Literal["trim", "center_crop"] = Field(
        "trim", description="How an image is framed for the model: 'trim' cuts the uniform background around the "
                            "product and fits the rest whole (catalog graphics on large blank canvases); "
                            "'center_crop' is the classic resize-256 + center-crop-224. Part of the model version.")
    batch_size: int | None = Field(None, ge=1, description="Model batch; None = 64 on CPU, 256 on GPU.")
    images_per_task: int = Field(1000, ge=1, description="Images embedded per Spark task.")
    task_gpus: float = Field(0.0, ge=0, description="GPUs each embed task asks Spark for (stage-level resource "
                             "profile); 0 = no GPU request (local mode, CPU clusters).")
    pca_dim: int | None = Field(None, ge=1, le=1280, description="Project vectors to this many dimensions with a "
                                "PCA fitted on the catalog's canonical images (None = the model's 1280).")
    pca_whiten: bool = Field(True, description="Whiten the PCA (divide by the component's standard deviation).")


class IndexSettings(_Section):
    """`index:` section of the settings (see README, "Configuration")."""
    name: str = Field("catalog", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="index name: snapshots live under indexes/<name>/")
    max_vectors_per_shard: int = Field(1_000_000, ge=1, description="upper bound on vectors in one shard")
    memory_budget_mb: int = Field(4096, ge=1, description="RAM one shard's index may take when served")
    index_type: Literal["auto", "flat", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq"] = Field(
        "auto", description="auto = the most exact type that fits the memory budget")
    flat_max_vectors: int = Field(20_000, ge=0, description="shards up to this size are searched exactly (Flat)")
    hnsw_max_vectors: int = Field(100_000, ge=0, description="shards up to this size may use HNSW (0 = never)")
    hnsw_m: int = Field(32, ge=4, le=128)
    hnsw_ef_construction: int = Field(40, ge=8, description="faiss default; recall comes from tuned efSearch")
    nlist: int | None = Field(None, ge=1, description="IVF lists; None = about sqrt(vectors), a power of two")
    train_points_per_list: int = Field(48, ge=8, description="IVF training sample = nlist * this")
    kmeans_iterations: int = Field(12, ge=1)
    nprobe: int | None = Field(None, ge=1, description="fixed IVF nprobe; None = tuned to target_recall")
    ef_search: int | None = Field(None, ge=1, description="fixed HNSW efSearch; None = tuned to target_recall")
    target_recall: float = Field(0.98, gt=0, le=1, description="recall@10 that nprobe/efSearch are tuned for")
    min_recall: float = Field(0.90, ge=0, le=1, description="recall@10 below this stops the run before publish")
    recall_queries: int = Field(500, ge=10, description="held-out vectors for tuning and for the recall check")
    keep_snapshots: int = Field(5, ge=1, description="published snapshots kept (plus whatever LATEST points to)")
    retention_grace_hours: float = Field(
        24.0, ge=0, description="retention never deletes an unpublished snapshot directory (a build that may still "
                                "be uploading) younger than this, nor a snapshot held by a publish or rollback for "
                                "less than this; longer than the longest build-index (its task times out at 3 h)")
    use_gpu: bool = Field(True, description="train/add IVF indexes on GPUs when faiss-gpu sees one")
    reuse_unchanged_shards: bool = Field(
        True, description="a full build copies, byte for byte, every shard of the live snapshot whose categories "
                          "and member rows are unchanged (same model version and index settings) instead of "
                          "building it again")
    seed: int = 0


class ValidateSettings(BaseModel):
    """Thresholds of the validate stage (`validation:` in the config file,
    `CATALOG_INDEX_VALIDATION__<FIELD>` in the environment)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt threshold must not silently keep its default

    # -- gates: a tripped gate stops the run before publish (unless --force) ------------------
    max_crawl_failure_rate: float = Field(
        0.10, ge=0, le=1, description="Largest share of in-scope manifest rows the crawl may quarantine.")
    max_decode_failure_rate: float = Field(
        0.02, ge=0, le=1, description="Largest share of downloaded bodies that may fail to decode as an image.")
    decode_failure_reasons: list[str] = Field(
        default_factory=lambda: list(DECODE_FAILURE_REASONS),
        description="Crawl quarantine reasons counted as decode failures.")
    max_category_drop: float = Field(
        0.5, ge=0, le=1, description="Largest fall of a category's valid image count against the previous "
                                     "successful run (0.5 = it may lose half its images).")
    category_drop_min_previous: int = Field(
        20, ge=0, description="Categories with fewer images in the previous run are not checked "
                              "(small categories swing by chance).")
    max_quarantine_rate: dict[str, float] = Field(
        default_factory=lambda: {"manifest": 0.05, "images": 0.05, "embeddings": 0.0},
        description="Per stage: largest share of rows that row-level expectations may quarantine.")

    # -- expectation parameters (see schemas/gx/*.json) -----------------------------------------
    min_width: int = Field(32, ge=1, description="Images narrower than this are quarantined (pixels).")
    min_height: int = Field(32, ge=1, description="Images lower than this are quarantined (pixels).")
    min_aspect_ratio: float = Field(0.1, gt=0, description="Smallest width / height kept.")
    max_aspect_ratio: float = Field(10.0, gt=0, description="Largest width / height kept.")
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"],
        description="Image formats (from magic bytes) that may be embedded.")
    min_bytes: int = Field(100, ge=0, description="Smaller image files are quarantined.")
    max_bytes: int = Field(25_000_000, gt=0, description="Larger image files are quarantined.")
    embedding_dim: int | None = Field(
        None, ge=1, description="Expected vector dimension; unset = the most common one (all must agree).")
    norm_tolerance: float = Field(1e-3, gt=0, description="Vectors must have an L2 norm within 1 +- this.")
    min_recall_at_10: float = Field(0.9, ge=0, le=1, description="Smallest measured recall@10 of any index shard.")

    # -- how validation runs ----------------------------------------------------------------------
    result_format: Literal["BOOLEAN_ONLY", "BASIC", "SUMMARY"] = Field(
        "BASIC", description="GX result detail in reports and Data Docs: BASIC has counts and observed values; "
                             "SUMMARY adds, per row-level expectation, the query that selects its failing rows (one "
                             "more Spark query plan each); BOOLEAN_ONLY has pass/fail only, no counts, so failing rows "
                             "are always searched for.")
    sample_failing_values: int = Field(
        0, ge=0, le=200, description="Failing values GX lists per expectation in reports and Data Docs. Each "
                                     "costs a Spark job per row-level expectation, and every failing row is in "
                                     "the quarantine file anyway, with its values.")
    cache_above_mb: float = Field(
        64, ge=0, description="Cache the table being validated in Spark when its Parquet files are larger than this "
                              "(MB) or not on local disk (s3://). Smaller local tables are read again by each of "
                              "validation's few queries, which costs less than building Spark's columnar cache.")
    adaptive_query_execution: bool = Field(
        False, description="Spark adaptive query execution (spark.sql.adaptive.enabled) while a stage is validated; "
                           "the session's own settings are restored afterwards. Off by default: validation's queries "
                           "are global aggregates and a few window counts, which AQE cannot improve, and AQE runs "
                           "each of them as two Spark jobs with re-planning in between (measured: half of GX's JVM "
                           "time on the sample catalog). Off, shuffles use spark.default.parallelism partitions.")
    arrow_fallback_for_s3: bool = Field(
        False, description="For s3:// warehouses, read tables with boto3 on the driver and hand them to Spark "
                           "as Arrow instead of reading s3a:// paths (tests, small warehouses; no hadoop-aws).")
    reuse_unchanged: bool = Field(
        True, description="Reuse an earlier run's validation of a stage (suite results, quarantine, Data Docs) "
                          "when that stage's inputs, its suite and these settings are unchanged, instead of "
                          "running the suite again; the gates are still evaluated. Inputs are fingerprinted "
                          "with pyarrow (pipelines/fingerprint.py); the report names the run reused.")


# Settings of `catalog-index train-head`: a frozen dataclass (not part of Settings: the head is
# trained by hand, from flags), here so that building the CLI's parser, which shows their
# defaults, does not import torch (seconds on every command).
@dataclass(frozen=True)
class HeadSettings:
    epochs: int = 30
    dim: int = 256
    holdout: float = 0.2
    seed: int = 0
    batch_size: int = 256
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    temperature: float = 0.1
    k: int = 10
    min_gain: float = 0.01

    def __post_init__(self):
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout must be between 0 and 1 (a fraction of the images), got {self.holdout}")
        if self.epochs < 1 or self.dim < 1 or self.batch_size < 2 or self.k < 1:
            raise ValueError("--epochs and --dim must be >= 1, the batch size >= 2, k >= 1")


class Settings(_Section):
    warehouse: str = Field(DEFAULT_WAREHOUSE, description="file:///path or s3://bucket/prefix")
    s3: S3Settings = Field(default_factory=S3Settings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    crawl: CrawlSettings = Field(default_factory=CrawlSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    validation: ValidateSettings = Field(default_factory=ValidateSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)



def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, recursively; None in `top` means "not given" and keeps `base`."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict):
            merged = _deep_merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
            if merged or key in out:
                out[key] = merged
        elif value is not None:
            out[key] = value
    return out


def _env_overrides() -> dict[str, Any]:
    """Env vars as a nested dict, so that they beat the YAML file but lose to CLI flags."""
    prefix = "CATALOG_INDEX_"
    nested: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith(prefix):
            continue
        path = name[len(prefix):].lower().split("__")
        if path[0] not in Settings.model_fields:
            continue  # CATALOG_INDEX_CONFIG, CATALOG_INDEX_NO_PROGRESS: not settings
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        # Lists and mappings come as JSON: CATALOG_INDEX_CRAWL__ALLOW_NETWORKS='["10.0.0.0/8"]'
        node[path[-1]] = json.loads(value) if value[:1] in "[{" else value
    return nested


def load_settings(config_path: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Build Settings from defaults, the YAML file, env vars and explicit overrides (CLI flags).

    `overrides` may be nested dicts (`crawl={"retries": 1}`); None values are ignored so
    that unset CLI flags do not clobber the file or the environment.
    """
    config_path = config_path or os.environ.get("CATALOG_INDEX_CONFIG")
    data: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (from --config or CATALOG_INDEX_CONFIG)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    data = _deep_merge(data, _env_overrides())
    data = _deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings ({problems}). Check --config, CATALOG_INDEX_* env vars and flags.") from exc

