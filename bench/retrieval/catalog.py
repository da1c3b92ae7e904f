"""The catalog side of the retrieval benchmark, read from a warehouse the way the pipeline left it.

`load_catalog` pulls the live snapshot into a local folder (`pipelines.client.pull`, as a
serving team would), opens it, and reads from the snapshot's source run the catalog rows it
indexes: every (product, image) with its own bytes and its canonical (indexed) image.

Read-only: this module never writes to the warehouse.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


class CatalogError(SystemExit):
    """No usable snapshot: the message says what to run."""


@dataclass
class Catalog:
    client: object                 # pipelines.client.SnapshotClient, pinned to the pulled snapshot
    snapshot_id: str
    source_run_id: str
    rows: pd.DataFrame             # product_id, category, image_url, sha256 (own bytes), canonical_sha256, duplicate_kind
    blobs: dict[str, bytes]        # sha256 -> bytes, for every own and canonical image in `rows`
    products_of_vector: dict[str, list[str]]  # canonical sha256 -> every product the index maps it to


def load_catalog(warehouse: str, dest: Path, index_name: str = "catalog") -> Catalog:
    from pipelines.client import SnapshotClient, pull
    from pipelines.crawl.stage import read_crawl_state
    from pipelines.dedup.stage import read_dedup_images
    from pipelines.publish import read_latest
    from pipelines.storage import open_storage

    storage = open_storage(warehouse)
    if read_latest(storage, index_name) is None:
        raise CatalogError(f"no published snapshot of index {index_name!r} in {warehouse}: run `make run` first "
                           "(it builds and publishes the sample catalog into ./warehouse), or pass --warehouse")
    pull(warehouse, dest, index_name=index_name)
    client = SnapshotClient(dest)
    source_run = client.manifest["source_run_id"]

    idmap = pd.concat([pd.DataFrame({name: shard.columns[name].to_pylist() for name in ("sha256", "product_id", "category")})
                       for shard in client.shards],
                      ignore_index=True)
    products_of_vector = idmap.groupby("sha256")["product_id"].apply(lambda s: sorted(set(s))).to_dict()

    dedup = read_dedup_images(storage, source_run)
    indexed = set(zip(idmap["product_id"], idmap["sha256"]))
    keep = [(p, c) in indexed for p, c in zip(dedup["product_id"], dedup["canonical_sha256"])]
    rows = dedup.loc[keep, ["product_id", "category", "image_url", "sha256", "canonical_sha256", "duplicate_kind"]]
    rows = rows.drop_duplicates(["product_id", "image_url"]).sort_values(["product_id", "image_url"])
    rows = rows.reset_index(drop=True)

    wanted = set(rows["sha256"]) | set(rows["canonical_sha256"])
    state = read_crawl_state(storage, source_run, columns=["sha256", "stored_key"]).dropna()
    state = state[state["sha256"].isin(wanted)].drop_duplicates("sha256")
    blobs: dict[str, bytes] = {}
    for key, group in state.groupby("stored_key"):
        part = storage.read_parquet_file(key, columns=["sha256", "image"]).to_pydict()
        need = set(group["sha256"])
        blobs.update((sha, data) for sha, data in zip(part["sha256"], part["image"]) if sha in need)
    missing = wanted - set(blobs)
    if missing:
        raise CatalogError(f"{len(missing)} indexed image(s) of run {source_run} have no stored bytes in {warehouse} "
                           f"(e.g. {sorted(missing)[0][:16]}…): was the warehouse pruned?")
    return Catalog(client, client.snapshot_id, source_run, rows, blobs, products_of_vector)


def read_snapshot_vectors(warehouse: str, model_version: str, shas: list[str]):
    """The pipeline's own catalog vectors (embeddings cache of the snapshot's model version), in `shas` order."""
    import numpy as np

    from pipelines.layout import embeddings_prefix
    from pipelines.storage import open_storage

    storage = open_storage(warehouse)
    table = storage.read_table(embeddings_prefix(model_version), columns=["sha256", "vector"]).to_pydict()
    by_sha = dict(zip(table["sha256"], table["vector"]))
    return np.asarray([by_sha[sha] for sha in shas], dtype=np.float32)
