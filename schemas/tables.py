"""Arrow schemas of the warehouse tables, with what each field means.

Field meanings live in the schema metadata (`field.metadata[b"doc"]`), so they travel
with the Parquet files. Changing a schema is an API change for the next stage: add
fields, never repurpose one.
"""
from __future__ import annotations

import pyarrow as pa


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


TIMESTAMP = pa.timestamp("us", tz="UTC")

# runs/<run_id>/manifest.parquet: the catalog exactly as it was read for this run.
MANIFEST = pa.schema([
    _f("row_index", pa.int64(), "0-based position of the row in the input manifest", False),
    _f("product_id", pa.string(), "catalog product id (several images per product allowed)"),
    _f("category", pa.string(), "catalog category; the images table is partitioned by it"),
    _f("image_url", pa.string(), "where the image is fetched from: http(s)://, s3:// or file://"),
    _f("title", pa.string(), "product title, informational"),
])

# Fields describing one fetched image; shared by the state table and the bytes table.
_IMAGE_FIELDS = [
    _f("product_id", pa.string(), "catalog product id", False),
    _f("category", pa.string(), "catalog category", False),
    _f("image_url", pa.string(), "URL from the manifest (before redirects)", False),
    _f("title", pa.string(), "product title"),
    _f("sha256", pa.string(), "hex sha256 of the image bytes: the image's identity downstream"),
    _f("byte_size", pa.int64(), "size of the image bytes"),
    _f("format", pa.string(), "format from magic bytes (JPEG, PNG, GIF, WEBP, BMP, TIFF), not the extension"),
    _f("width", pa.int32(), "pixels"),
    _f("height", pa.int32(), "pixels"),
    _f("http_status", pa.int32(), "HTTP status of the last response (304 for a not-modified revalidation)"),
    _f("etag", pa.string(), "ETag header, sent back as If-None-Match next run"),
    _f("last_modified", pa.string(), "Last-Modified header, sent back as If-Modified-Since next run"),
    _f("content_type", pa.string(), "Content-Type header as served (not trusted for the format)"),
    _f("final_url", pa.string(), "URL after redirects"),
    _f("fetched_at", TIMESTAMP, "when the bytes were downloaded"),
]

# images/category=<c>/run_id=<r>/part-<task>.parquet: bytes of images downloaded in run r.
IMAGES = pa.schema(_IMAGE_FIELDS + [
    _f("run_id", pa.string(), "run that downloaded these bytes", False),
    _f("image", pa.binary(), "the image file bytes as served", False),
])

# runs/<run_id>/crawl/state/*.parquet: every image of the catalog after run r (no bytes).
IMAGE_STATE = pa.schema(_IMAGE_FIELDS + [
    _f("status", pa.string(),
       "fetched (new or changed this run) | not_modified (304, bytes from an earlier run) | "
       "stale (fetch failed this run; the last good bytes are kept) | removed (gone from the manifest)", False),
    _f("error", pa.string(), "for stale rows: the reason code of this run's failed fetch"),
    _f("stored_run_id", pa.string(), "run whose images/ partition holds the bytes"),
    _f("stored_key", pa.string(), "warehouse key of the Parquet file holding the bytes"),
    _f("checked_at", TIMESTAMP, "when this run last checked the URL"),
    _f("run_id", pa.string(), "run this state row belongs to", False),
])

# quarantine/<run_id>/<stage>/*.parquet: every rejected row with a machine-readable reason.
QUARANTINE = pa.schema([
    _f("run_id", pa.string(), "run that rejected the row", False),
    _f("stage", pa.string(), "crawl | dedup | validate | embed | index", False),
    _f("reason", pa.string(), "reason code (http_404, timeout, not_an_image, too_large, ...)", False),
    _f("detail", pa.string(), "human-readable detail: what was seen"),
    _f("row_index", pa.int64(), "position in the input manifest, when the row came from it"),
    _f("product_id", pa.string(), "catalog product id"),
    _f("category", pa.string(), "catalog category"),
    _f("image_url", pa.string(), "image URL"),
    _f("sha256", pa.string(), "image sha256, when the bytes were read"),
    _f("http_status", pa.int32(), "HTTP status, when there was a response"),
    _f("at", TIMESTAMP, "when the row was rejected"),
])


def describe(schema: pa.Schema) -> list[tuple[str, str, str]]:
    """(name, type, meaning) rows, for docs and `--help` output."""
    return [(f.name, str(f.type), (f.metadata or {}).get(b"doc", b"").decode()) for f in schema]


# dedup/<run_id>/images.parquet: every live image row of crawl run r with its duplicate cluster.
# The images to embed and index are the distinct `canonical_sha256` values; every product
# stays searchable through the canonical image of its cluster.
DEDUP_IMAGES = pa.schema([
    _f("product_id", pa.string(), "catalog product id", False),
    _f("category", pa.string(), "catalog category", False),
    _f("image_url", pa.string(), "image URL from the manifest", False),
    _f("title", pa.string(), "product title"),
    _f("sha256", pa.string(), "this row's image bytes", False),
    _f("phash", pa.string(), "64-bit DCT pHash as 16 hex digits (imagehash.phash's string)"),
    _f("width", pa.int32(), "pixels"),
    _f("height", pa.int32(), "pixels"),
    _f("fetched_at", TIMESTAMP, "when the bytes were downloaded"),
    _f("cluster_id", pa.string(), "duplicate cluster: the canonical image's sha256", False),
    _f("canonical_sha256", pa.string(), "the image that represents the cluster in the index", False),
    _f("is_canonical", pa.bool_(), "this row's sha256 is its cluster's canonical image", False),
    _f("duplicate_kind", pa.string(),
       "none (canonical) | exact (same sha256 as the canonical) | near (confirmed near duplicate)", False),
    _f("run_id", pa.string(), "dedup run", False),
])

# dedup/<run_id>/pairs.parquet: the evidence for every near-duplicate candidate pair.
DEDUP_PAIRS = pa.schema([
    _f("sha256_a", pa.string(), "first image (sorts before sha256_b)", False),
    _f("sha256_b", pa.string(), "second image", False),
    _f("hamming_distance", pa.int32(), "pHash Hamming distance", False),
    _f("confirmation_score", pa.float32(), "independent pixel-level similarity in [0, 1]"),
    _f("confirmed", pa.bool_(), "merged into one cluster (score >= threshold)", False),
])

# embeddings/<model_version>/part-*.parquet: a cache, one vector per image per model version.
EMBEDDINGS = pa.schema([
    _f("sha256", pa.string(), "image identity", False),
    _f("vector", pa.list_(pa.float32()), "L2-normalised embedding", False),
    _f("model_version", pa.string(), "weights digest + preprocessing + pooling + PCA", False),
    _f("run_id", pa.string(), "run that computed the vector", False),
    _f("embedded_at", TIMESTAMP, "when"),
])

# indexes/<name>/<snapshot_id>/idmap-<shard>.parquet: FAISS vector id -> every product it stands for.
INDEX_IDMAP = pa.schema([
    _f("vector_id", pa.int64(), "id of the vector inside its shard's FAISS index", False),
    _f("sha256", pa.string(), "canonical image of the vector", False),
    _f("product_id", pa.string(), "a product whose image is (a duplicate of) this image", False),
    _f("category", pa.string(), "the product's category", False),
    _f("image_url", pa.string(), "the product's own image URL", False),
    _f("title", pa.string(), "product title"),
])
