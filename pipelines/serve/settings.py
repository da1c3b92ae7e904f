"""What `catalog-index serve` is told: where snapshots come from, limits, auth.

Plain data, validated once at startup (bad values are UsageErrors with the flag's name), and
serialisable to JSON so that `--workers N` can hand the same settings to each worker process.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.config import S3Settings
from pipelines.errors import UsageError

DEFAULT_CACHE = Path.home() / ".catalog-index" / "snapshots"
# How `--workers N` hands settings to worker processes: the path of a 0600 JSON file in the service's
# private directory. Not the settings themselves: the API key would sit in every worker's environment.
ENV_SETTINGS_FILE = "CATALOG_INDEX_SERVE_SETTINGS_FILE"


@dataclass
class ServeSettings:
    warehouse: str | None = None          # pull LATEST from here into cache_dir ...
    snapshot_dir: str | None = None       # ... or follow <snapshot_dir>/current (or serve one snapshot dir)
    index_name: str = "catalog"
    cache_dir: str | None = None          # where --warehouse pulls to (default ~/.catalog-index/snapshots/<index>)
    s3: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    refresh_s: float = 30.0
    workers: int = 1
    api_key: str | None = None            # bearer token; None = no auth
    max_upload_bytes: int = 10_000_000    # request bodies (uploads, JSON) and fetched image_url bodies
    max_pixels: int = 50_000_000          # width*height of a query image; more is a decompression bomb
    max_k: int = 100
    body_timeout_s: float = 30.0          # a client must send its whole body within this
    allow_private_image_urls: bool = False  # image_url may name loopback/private hosts (demos, tests)
    image_url_timeout_s: float = 10.0
    device: str = "cpu"
    max_batch: int = 16                   # query images embedded together when requests arrive at once
    embed_threads: int | None = None      # model runner threads (None: 4 on a CPU, 2 on a GPU)

    def __post_init__(self) -> None:
        if bool(self.warehouse) == bool(self.snapshot_dir):
            raise UsageError("serve needs exactly one of --warehouse (pull LATEST into a local cache) and "
                             "--snapshot-dir (a pulled destination or a snapshot directory)")
        if self.refresh_s <= 0:
            raise UsageError(f"--refresh-s must be positive (got {self.refresh_s})")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0..65535 (got {self.port})")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1 (got {self.workers})")
        if self.max_upload_bytes < 1024 or self.max_pixels < 1 or self.max_k < 1 or self.max_batch < 1 \
                or (self.embed_threads is not None and self.embed_threads < 1):
            raise UsageError("upload, pixel, k, batch and --embed-threads must be positive (uploads at least 1 KB)")
        if self.api_key is not None and len(self.api_key) < 16:
            raise UsageError("the API key must be at least 16 characters (generate one: "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))')")

    @property
    def s3_settings(self) -> S3Settings:
        return S3Settings(**self.s3)

    @property
    def pull_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else DEFAULT_CACHE / self.index_name

    def write_private(self, path: Path) -> None:
        """The settings as JSON in a new file only this user can read (it holds the API key)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh)

    @classmethod
    def from_env(cls) -> "ServeSettings":
        path = os.environ.get(ENV_SETTINGS_FILE)
        if not path:
            raise UsageError(f"{ENV_SETTINGS_FILE} is not set: start workers through `catalog-index serve`")
        return cls(**json.loads(Path(path).read_text()))


def read_api_key(path: str | os.PathLike) -> str:
    """The bearer token in `path` (first line, whitespace stripped); UsageError when unreadable or empty."""
    try:
        text = Path(path).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--api-key-file {path}: cannot read it ({exc})") from exc
    if not text or not text[0].strip():
        raise UsageError(f"--api-key-file {path} is empty: put the token on its first line")
    return text[0].strip()
