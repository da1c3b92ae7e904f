"""Warehouse tables as torch DataLoaders, read with petastorm.

Two loaders, both `petastorm.make_batch_reader` over the warehouse's own Parquet part files
(no petastorm-specific dataset metadata needed) wrapped in `petastorm.pytorch.BatchedDataLoader`:

* `open_image_loader`: rows of the images table (`images/category=<c>/run_id=<r>/part-*.parquet`)
  decoded on the reader's workers with the model's exact preprocessing (`decode_for_model`).
  Batches: `pixels` uint8 (B, crop, crop, 3), `sha256_digest` uint8 (B, 32), `failure` int8 (B,)
  (0 = decoded, else an index into `failure_reasons()`; such a row's pixels are zeros).
* `open_embedding_loader`: rows of `embeddings/<model_version>/` joined with an integer label
  per sha256 (the join happens in the reader's transform, so the table is streamed, never loaded
  whole). Batches: `vector` float32 (B, dim), `label` int64 (B,), `sha256_digest` uint8 (B, 32).
  Every labelled row comes exactly once per pass; rows without a label are skipped.

sha256s travel as 32 raw bytes because petastorm's torch loaders refuse string columns;
`hex_digests` turns them back into hex.

When the image loader helps: the embed stage decodes one batch ahead on a thread pool inside
each Spark task; this loader decodes whole row groups ahead on petastorm's reader workers, only
for the wanted sha256s. On the busy 2-core dev box (one run, 256 sample PNGs, same model) it gave
11.5-12.0 images/s vs 8.8-8.9 for `ImageEmbedder.embed_images`: a hint for a quiet bench run,
not a settled result. It is the input for training on images (seeded shuffling, epochs,
`local_cache_dir` keeps S3 parts on disk between epochs) and for splitting a table between
trainers (`shard`, by row group). `pool="process"` decodes outside the GIL, but each worker first
imports the whole stack (~17 s here), so it pays only on long reads. `embed_loader_batches` yields
the same EmbeddedBatch objects as `ImageEmbedder.embed_frames`, so either path feeds one writer.

Storage: local warehouses are read in place through `file://` URLs. For S3, petastorm would need
s3fs (not installed, and it would bypass our S3 settings), so the needed parts are first
downloaded through `Storage` into a temporary directory that is removed when the loader closes.

This module must never write to the warehouse, and never decide what belongs in a training or
held-out split (that is pipelines.head's job): it reads what it is asked to read.
"""
from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Collection, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from pipelines import layout
from pipelines.readers import read_current_images
from pipelines.storage import LocalStorage, Storage
from schemas.reasons import DECODE_REASONS

# petastorm 0.13.1 drives pyarrow 14's legacy ParquetDataset API (see DESIGN.md, install
# traps): every read would print a screen of deprecation warnings users can do nothing about.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"petastorm\.")

DIGEST_BYTES = 32
DECODED = 0


def failure_reasons() -> tuple[str, ...]:
    """Reason codes by `failure` value; index 0 means the image decoded."""
    return ("", *DECODE_REASONS)


def digest_array(hex_shas: Iterable[str]) -> np.ndarray:
    """Hex sha256 strings -> (n, 32) uint8."""
    rows = [np.frombuffer(bytes.fromhex(sha), dtype=np.uint8) for sha in hex_shas]
    return np.stack(rows) if rows else np.empty((0, DIGEST_BYTES), dtype=np.uint8)


def hex_digests(digests) -> list[str]:
    """(n, 32) uint8 tensor or array -> hex sha256 strings."""
    array = np.asarray(digests.numpy() if hasattr(digests, "numpy") else digests, dtype=np.uint8)
    return [row.tobytes().hex() for row in array]


# -- where the parts are -----------------------------------------------------------------------

@contextlib.contextmanager
def local_parquet_urls(storage: Storage, keys: Collection[str], keep_dir: str | None = None) -> Iterator[list[str]]:
    """`file://` URLs of the given warehouse keys, downloading them first when the warehouse is not local.

    Downloads go to a temporary directory removed afterwards, or, with `keep_dir`, stay under it
    for the next reader (committed partitions never change, so a part already there is reused).
    Plain 'file://' + path, not Path.as_uri(): petastorm does not unquote URLs, and partition
    directories already hold percent-quoted category names (`category=a%20b`).
    """
    keys = sorted(set(keys))
    if not keys:
        raise ValueError("no Parquet parts to read")
    if isinstance(storage, LocalStorage):
        yield [f"file://{storage.root / key}" for key in keys]
        return
    with contextlib.ExitStack() as cleanup:
        root = Path(keep_dir) if keep_dir else Path(cleanup.enter_context(
            tempfile.TemporaryDirectory(prefix="catalog-index-petastorm-")))
        urls = []
        for key in keys:
            path = root / key
            if not path.is_file():
                partial = path.with_name(f".{path.name}.partial")
                storage.download_file(key, partial)
                partial.replace(path)  # a killed download never looks like a whole part
            urls.append(f"file://{path}")
        yield urls


def images_keys_for(storage: Storage, run_id: str, sha256s: Collection[str] | None = None) -> list[str]:
    """The images-table parts holding the current bytes of crawl run `run_id` (optionally only of `sha256s`)."""
    current = read_current_images(storage, run_id)[["sha256", "stored_key"]].dropna()
    if sha256s is not None:
        current = current[current["sha256"].isin(set(sha256s))]
    return sorted(set(current["stored_key"]))


def embedding_keys_for(storage: Storage, model_version: str) -> list[str]:
    return [key for key in storage.list(layout.embeddings_prefix(model_version)) if key.endswith(".parquet")]


# -- transforms (run on petastorm's workers; top-level classes so a process pool can pickle them) --

class DecodeImages:
    """images-table rows -> model-ready pixels; keeps only `wanted` sha256s when given."""

    def __init__(self, preprocessing, wanted: Collection[str] | None = None):
        self.preprocessing = preprocessing
        self.wanted = frozenset(wanted) if wanted is not None else None

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        # torch: kept out of import time
        from pipelines.embed.embedder import ImageDecodeError, decode_for_model

        if self.wanted is not None:
            rows = rows[rows["sha256"].isin(self.wanted)]
        reasons = failure_reasons()
        crop = self.preprocessing.crop
        pixels, failures = [], []
        for data in rows["image"]:
            try:
                pixels.append(decode_for_model(data, self.preprocessing))
                failures.append(DECODED)
            except ImageDecodeError as error:
                # A bad image must not end the epoch: it comes through flagged, with blank pixels.
                pixels.append(np.zeros((crop, crop, 3), dtype=np.uint8))
                failures.append(reasons.index(error.reason) if error.reason in reasons else reasons.index("corrupt"))
        return pd.DataFrame({"sha256_digest": list(digest_array(rows["sha256"])), "pixels": pixels,
                             "failure": np.asarray(failures, dtype=np.int8)})


class JoinLabels:
    """embeddings rows -> (vector, label, digest) for labelled sha256s, each sha256 once per pass.

    The embeddings cache may hold a sha256 twice (a rerun that wrote it again); both vectors
    come from the same model version, so the first one read is kept.
    """

    def __init__(self, labels: Mapping[str, int], dim: int):
        self.labels = dict(labels)
        self.dim = dim
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def start_pass(self) -> None:
        with self._lock:
            self._seen = set()

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        with self._lock:
            keep = []
            for sha in rows["sha256"]:
                take = sha in self.labels and sha not in self._seen
                keep.append(take)
                if take:
                    self._seen.add(sha)
        rows = rows[np.asarray(keep, dtype=bool)]
        vectors = [np.asarray(v, dtype=np.float32) for v in rows["vector"]]
        for vector in vectors:
            if vector.shape != (self.dim,):
                raise ValueError(f"an embedding has {vector.shape[0]} dimensions, expected {self.dim}: "
                                 "the embeddings prefix mixes model versions")
        return pd.DataFrame({"sha256_digest": list(digest_array(rows["sha256"])), "vector": vectors,
                             "label": np.asarray([self.labels[sha] for sha in rows["sha256"]], dtype=np.int64)})


# -- loaders ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_image_loader(storage: Storage, keys: Collection[str], preprocessing, *,
                      sha256s: Collection[str] | None = None, batch_size: int = 64, pool: str = "thread",
                      workers: int = 2, seed: int | None = None, shuffle: bool = False,
                      shard: tuple[int, int] | None = None, local_cache_dir: str | None = None):
    """A BatchedDataLoader over the images-table parts `keys`, decoded for the model.

    `sha256s` keeps only those images (e.g. the canonical images not embedded yet); `shard`
    = (index, count) reads one of `count` disjoint slices of the row groups. `local_cache_dir`
    keeps downloaded S3 parts and the decoded pixels of every row group there for later readers.
    """
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader
    from petastorm.transform import TransformSpec

    crop = preprocessing.crop
    spec = TransformSpec(DecodeImages(preprocessing, sha256s),
                         edit_fields=[("sha256_digest", np.uint8, (DIGEST_BYTES,), False),
                                      ("pixels", np.uint8, (crop, crop, 3), False),
                                      ("failure", np.int8, (), False)],
                         selected_fields=["sha256_digest", "pixels", "failure"])
    cache_dir = parts_dir = None
    if local_cache_dir:
        # petastorm keys its cache by file and row group only; the decoded pixels also depend on
        # the preprocessing and the sha256 filter, so each combination gets its own directory.
        selection = hashlib.sha256(repr((preprocessing, sorted(sha256s) if sha256s is not None else None)).encode())
        cache_dir = str(Path(local_cache_dir) / "decoded" / selection.hexdigest()[:16])
        parts_dir = str(Path(local_cache_dir) / "parts")
    with local_parquet_urls(storage, keys, parts_dir) as urls:
        reader = make_batch_reader(
            # schema_fields are regexes; "$" keeps `image` from also meaning `image_url` in
            # petastorm's old prefix semantics, which it otherwise warns about on every read.
            urls, schema_fields=["sha256$", "image$"], transform_spec=spec, num_epochs=1,
            reader_pool_type=pool, workers_count=workers, seed=_petastorm_seed(seed),
            shuffle_row_groups=shuffle, shuffle_rows=shuffle,
            cur_shard=shard[0] if shard else None, shard_count=shard[1] if shard else None,
            cache_type="local-disk" if cache_dir else None, cache_location=cache_dir,
            cache_size_limit=(10 << 30) if cache_dir else None,
            cache_row_size_estimate=crop * crop * 3 if cache_dir else None)
        loader = BatchedDataLoader(reader, batch_size=batch_size, transform_fn=_writable_tensor)
        try:
            yield loader
        finally:
            _close(reader)


@contextlib.contextmanager
def open_embedding_loader(storage: Storage, model_version: str, labels: Mapping[str, int], *,
                          batch_size: int = 256, seed: int | None = None, shuffle: bool = True,
                          local_parts_dir: str | None = None):
    """A BatchedDataLoader over `embeddings/<model_version>/` joined with `labels` (sha256 -> int).

    One pass yields every labelled sha256 that has a vector exactly once. With `shuffle` the
    row-group order and the rows inside each row group are permuted from `seed`; the reader runs
    in the calling thread ("dummy" pool), so the same seed gives the same batches every time.
    From S3, parts are downloaded for each loader unless `local_parts_dir` keeps them (training
    opens one loader per epoch and passes one directory for all of them).
    """
    from petastorm import make_batch_reader
    from petastorm.pytorch import BatchedDataLoader
    from petastorm.transform import TransformSpec

    keys = embedding_keys_for(storage, model_version)
    if not keys:
        raise FileNotFoundError(f"no embeddings for model version {model_version} in {storage.uri}")
    with local_parquet_urls(storage, keys, local_parts_dir) as urls:
        dim = _vector_dim(urls)
        join = JoinLabels(labels, dim)
        spec = TransformSpec(join, edit_fields=[("sha256_digest", np.uint8, (DIGEST_BYTES,), False),
                                                ("vector", np.float32, (dim,), False),
                                                ("label", np.int64, (), False)],
                             selected_fields=["sha256_digest", "vector", "label"])
        reader = make_batch_reader(urls, schema_fields=["sha256$", "vector$"], transform_spec=spec, num_epochs=1,
                                   reader_pool_type="dummy", seed=_petastorm_seed(seed),
                                   shuffle_row_groups=shuffle, shuffle_rows=shuffle)
        loader = BatchedDataLoader(reader, batch_size=batch_size, transform_fn=_writable_tensor)
        try:
            yield _OnePassPerIteration(loader, join)
        finally:
            _close(reader)


def read_labelled_vectors(storage: Storage, model_version: str, labels: Mapping[str, int], batch_size: int = 4096,
                          local_parts_dir: str | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One unshuffled pass of the embedding loader collected in memory: (sha256s, vectors, labels)."""
    shas, vectors, label_rows = [], [], []
    with open_embedding_loader(storage, model_version, labels, batch_size=batch_size, shuffle=False,
                               local_parts_dir=local_parts_dir) as loader:
        for batch in loader:
            shas.extend(hex_digests(batch["sha256_digest"]))
            vectors.append(batch["vector"].numpy())
            label_rows.append(batch["label"].numpy())
    if not vectors:
        return [], np.empty((0, 0), dtype=np.float32), np.empty((0,), dtype=np.int64)
    return shas, np.concatenate(vectors), np.concatenate(label_rows)


def embed_loader_batches(embedder, loader) -> Iterator:
    """Image-loader batches -> `pipelines.embedding.EmbeddedBatch`es (vectors + failures), each sha256 once."""
    # torch: kept out of import time
    from pipelines.embed.embedder import (
        EMBEDDING_COLUMNS,
        FAILURE_COLUMNS,
        EmbeddedBatch,
    )

    reasons = failure_reasons()
    seen: set[str] = set()
    for batch in loader:
        shas = hex_digests(batch["sha256_digest"])
        failure = batch["failure"].numpy()
        fresh = np.zeros(len(shas), dtype=bool)
        for index, sha in enumerate(shas):  # one by one: a batch can hold the same image twice
            fresh[index] = sha not in seen
            seen.add(sha)
        decoded = fresh & (failure == DECODED)
        vectors = (embedder.embed_pixels(batch["pixels"].numpy()[decoded]) if decoded.any()
                   else np.empty((0, embedder.spec.output_dim), dtype=np.float32))
        yield EmbeddedBatch(
            embeddings=pd.DataFrame({"sha256": [s for s, ok in zip(shas, decoded) if ok],
                                     "vector": list(vectors.astype(embedder.vector_dtype, copy=False))},
                                    columns=EMBEDDING_COLUMNS),
            failures=pd.DataFrame([(sha, reasons[code], "decode failed in the petastorm reader")
                                   for sha, code, new in zip(shas, failure, fresh) if new and code != DECODED],
                                  columns=FAILURE_COLUMNS))


# -- internals ---------------------------------------------------------------------------------

def _vector_dim(file_urls: list[str]) -> int:
    import pyarrow.parquet as pq

    for url in file_urls:
        column = pq.read_table(url.removeprefix("file://"), columns=["vector"]).column("vector")
        if len(column):
            return len(column[0].as_py())
    raise FileNotFoundError(f"the embeddings parts {file_urls[:3]}... hold no vectors")


def _writable_tensor(column: np.ndarray):
    import torch

    # Arrow hands out read-only buffers; torch warns on those and a consumer writing in place
    # would corrupt petastorm's batch, so columns are copied once here.
    return torch.from_numpy(np.require(column, requirements=["W"]))


def _petastorm_seed(seed: int | None) -> int | None:
    # petastorm treats seed 0 as "no seed" (non-deterministic); shift so every seed is honoured.
    return None if seed is None else seed + 1


def _close(reader) -> None:
    # reader.stop()/join() rather than `with reader`: its __exit__ prints "Cache cleanup complete."
    reader.stop()
    reader.join()


class _OnePassPerIteration:
    """Iterating again re-reads the table (petastorm resets its reader); the join's
    "each sha256 once" memory must start over with it, or the second pass would be empty."""

    def __init__(self, loader, join: JoinLabels):
        self.loader, self.join = loader, join

    def __iter__(self):
        self.join.start_pass()
        return iter(self.loader)
