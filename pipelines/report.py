"""Run report: `reports/<run_id>/report.json` and a self-contained `report.html`.

Built from what the stages committed (their summaries in the warehouse), never from
in-memory state, so a report can be (re)built for any past run:
counts per stage, quarantine reasons, a per-category table, gate results, timings and
throughput, recall, the snapshot id, a thumbnail grid of duplicate clusters and of
sample search results. Thumbnails are embedded as data URIs: the HTML is one file.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from pipelines import layout
from pipelines.client import QueryResult, SnapshotClient, pull
from pipelines.readers import read_crawl_state, read_dedup_images, read_embeddings
from pipelines.storage import Storage, open_storage

THUMB = 96


def _json(storage: Storage, key: str) -> dict | None:
    return json.loads(storage.read_text(key)) if storage.exists(key) else None


def thumbnail_data_uri(data: bytes, size: int = THUMB) -> str | None:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (size * 2, size * 2))
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, "white")
        canvas.paste(image, mask=image.split()[3])
        canvas.thumbnail((size, size))
        out = io.BytesIO()
        canvas.save(out, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
    except Exception:  # a report must not fail on one odd image
        return None


def _bytes_for(storage: Storage, run_id: str, sha256s: set[str]) -> dict[str, bytes]:
    state = read_crawl_state(storage, run_id, columns=["sha256", "stored_key"]).dropna()
    state = state[state["sha256"].isin(sha256s)].drop_duplicates("sha256")
    blobs: dict[str, bytes] = {}
    for key, group in state.groupby("stored_key"):
        wanted = set(group["sha256"])
        part = storage.read_parquet_file(key, columns=["sha256", "image"]).to_pydict()
        blobs.update((s, d) for s, d in zip(part["sha256"], part["image"]) if s in wanted)
    return blobs


def duplicate_cluster_samples(storage: Storage, run_id: str, clusters: int = 8, members: int = 6) -> list[dict]:
    """The largest duplicate clusters of a dedup run, with thumbnails of their members."""
    try:
        rows = read_dedup_images(storage, run_id)
    except Exception:
        return []
    sizes = rows.groupby("cluster_id")["product_id"].count()  # exact copies under other products count too
    biggest = sizes[sizes > 1].sort_values(ascending=False, kind="stable").head(clusters).index
    picked = rows[rows["cluster_id"].isin(biggest)]
    blobs = _bytes_for(storage, run_id, set(picked["sha256"]))
    samples = []
    for cluster in biggest:
        group = picked[picked["cluster_id"] == cluster]
        group = group.sort_values(["is_canonical", "product_id"], ascending=[False, True]).head(members)
        samples.append({"cluster_id": cluster, "images": int(sizes[cluster]), "members": [
            {"product_id": r.product_id, "sha256": r.sha256, "canonical": bool(r.is_canonical),
             "kind": r.duplicate_kind, "thumb": thumbnail_data_uri(blobs[r.sha256]) if r.sha256 in blobs else None}
            for r in group.itertuples()]})
    return samples


def sample_search_results(settings, run_id: str, index_name: str, queries: int = 4, k: int = 5) -> list[dict]:
    """Search a few canonical images of different categories against the published snapshot
    (pulled like a serving team would), with thumbnails of the query and of each hit.

    The queries are catalog images, so their vectors are already in the embeddings cache under
    the snapshot's model version: searching those skips loading the model (seconds of torch
    import, most of an unchanged night's report). Images without a cached vector are embedded."""
    import tempfile
    from pathlib import Path

    storage = open_storage(settings.warehouse, settings.s3)
    rows = read_dedup_images(storage, run_id)
    rows = rows[rows["duplicate_kind"] == "none"].sort_values(["category", "product_id"])
    picks = rows.groupby("category").head(1).head(queries)
    with tempfile.TemporaryDirectory(prefix="report-search-") as tmp:
        pulled = pull(settings.warehouse, Path(tmp) / "snap", s3=settings.s3, index_name=index_name)
        client = SnapshotClient(pulled.path)
        blobs = _bytes_for(storage, run_id, set(picks["sha256"]))
        paths = []
        for sha in picks["sha256"]:
            path = Path(tmp) / f"{sha[:16]}.img"
            path.write_bytes(blobs[sha])
            paths.append(str(path))
        results = _search_cached_vectors(storage, client, list(picks["sha256"]), paths, k)
    by_product = rows.drop_duplicates("product_id").set_index("product_id")["sha256"]
    hit_shas = {by_product.get(h.product_id) for r in results for h in r.results} - {None}
    hit_blobs = _bytes_for(storage, run_id, hit_shas)
    samples = []
    for row, result in zip(picks.itertuples(), results):
        samples.append({"query": f"{row.product_id} ({row.category})", "thumb": thumbnail_data_uri(blobs[row.sha256]),
                        "results": [{"product_id": h.product_id, "category": h.category, "score": float(h.score),
                                     "thumb": thumbnail_data_uri(hit_blobs[by_product[h.product_id]])
                                     if by_product.get(h.product_id) in hit_blobs else None}
                                    for h in result.results]})
    return samples


def snapshot_summary(manifest: dict) -> dict:
    """What the report says about the snapshot a run published (from its manifest.json)."""
    totals = manifest["totals"]
    return {"snapshot_id": manifest["snapshot_id"], "previous": manifest.get("previous_snapshot"),
            "vectors": totals["vectors"], "products": totals["products"], "shards": totals["shards"],
            "recall_at_10": manifest["recall_at_10"]["min"], "index": manifest["index_name"]}


def search_samples_or_note(settings, run_id: str, index_name: str, queries: int = 4, k: int = 5) -> list[dict]:
    """`sample_search_results`, or one line saying why there are none: the report never fails a run."""
    try:
        return sample_search_results(settings, run_id, index_name, queries=queries, k=k)
    except Exception as exc:
        return [{"query": f"sample search unavailable: {exc}", "results": []}]


def _search_cached_vectors(storage: Storage, client, shas: list[str], paths: list[str], k: int) -> list:
    version = client.manifest["model"]["version"]
    try:
        cached = read_embeddings(storage, version, columns=["sha256", "vector"])
    except Exception:  # no cache for this version (a hand-built snapshot): embed the images
        return client.search_images(paths, k=k)
    vectors = dict(zip(cached["sha256"], cached["vector"]))
    if not all(sha in vectors for sha in shas):
        return client.search_images(paths, k=k)
    hits = client.search_vectors(np.stack([np.asarray(vectors[sha], dtype=np.float32) for sha in shas]), k)
    return [QueryResult(path, results=result) for path, result in zip(paths, hits)]


def build_report(storage: Storage, run_id: str, *, stage_timings: dict[str, float] | None = None,
                 search_samples: list[dict] | None = None, extra: dict[str, Any] | None = None) -> dict:
    """Collect everything committed for `run_id` into one dict; write JSON and HTML."""
    crawl = _json(storage, layout.crawl_success_key(run_id))
    report: dict[str, Any] = {
        "run_id": run_id,
        "crawl": crawl,
        "dedup": _json(storage, layout.dedup_success_key(run_id)),
        "embed": _json(storage, layout.embed_success_key(run_id)),
        "validation": {key.rsplit("/", 1)[-1].removesuffix(".json"): _json(storage, key)
                       for key in storage.list(layout.validation_reports_prefix(run_id)) if key.endswith(".json")},
        "timings_s": stage_timings or {},
        **(extra or {}),
    }
    report["per_category"] = _per_category(storage, run_id, crawl)
    report["duplicate_clusters"] = duplicate_cluster_samples(storage, run_id)
    report["search_samples"] = search_samples or []
    prefix = layout.reports_prefix(run_id)
    storage.write_text(f"{prefix}report.json", json.dumps(_without_thumbs(report), indent=2, default=str))
    storage.write_text(f"{prefix}report.html", render_html(report))
    return report


def _per_category(storage: Storage, run_id: str, crawl: dict | None) -> list[dict]:
    rows: dict[str, dict[str, Any]] = {}
    for category, counts in ((crawl or {}).get("per_category") or {}).items():
        rows[category] = {"category": category, **{k: int(v) for k, v in counts.items()}}
    try:
        dedup = read_dedup_images(storage, run_id)
        for category, group in dedup.groupby("category"):
            entry = rows.setdefault(category, {"category": category})
            entry["canonical_images"] = int(group.loc[group["duplicate_kind"] == "none", "canonical_sha256"].nunique())
            entry["duplicate_rows"] = int((group["duplicate_kind"] != "none").sum())
    except Exception:
        pass
    return [rows[c] for c in sorted(rows)]


def _without_thumbs(value):
    if isinstance(value, dict):
        return {k: _without_thumbs(v) for k, v in value.items() if k != "thumb"}
    if isinstance(value, list):
        return [_without_thumbs(v) for v in value]
    return value


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class=muted>nothing recorded</p>"
    columns = columns or sorted({k for row in rows for k in row}, key=lambda c: (c != "category", c))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _kv(data: dict | None, keys: list[str]) -> str:
    if not data:
        return "<p class=muted>stage did not run for this run id</p>"
    return _table([{"measure": k, "value": data[k]} for k in keys if k in data], ["measure", "value"])


def _img(src: str | None, caption: str) -> str:
    inner = f"<img src='{src}' alt=''>" if src else "<div class=noimg>no preview</div>"
    return f"<figure>{inner}<figcaption>{html.escape(caption)}</figcaption></figure>"


def render_html(report: dict) -> str:
    crawl, dedup, embed = report.get("crawl"), report.get("dedup"), report.get("embed")
    sections = [f"<h1>catalog-index run {html.escape(report['run_id'])}</h1>"]
    snapshot = report.get("snapshot")
    if snapshot:
        sections.append(f"<p class=big>snapshot <b>{html.escape(str(snapshot.get('snapshot_id')))}</b> "
                        f"published: {html.escape(_fmt(snapshot.get('vectors', '')))} vectors, "
                        f"recall@10 {html.escape(_fmt(snapshot.get('recall_at_10', '')))}</p>")
    if report.get("stopped"):
        sections.append(f"<p class=bad>run stopped: {html.escape(report['stopped'])}</p>")
    sections.append("<h2>Stages</h2>" + _table(
        [{"stage": s, "seconds": t} for s, t in report.get("timings_s", {}).items()], ["stage", "seconds"]))
    sections.append("<h2>Crawl</h2>" + _kv(crawl, ["manifest_rows", "fetched", "not_modified", "stale", "quarantined",
                                                    "out_of_scope", "removed", "bytes_downloaded", "fetch_s"]))
    if crawl and crawl.get("quarantine_reasons"):
        sections.append("<h3>Quarantined by reason</h3>" + _table(
            [{"reason": r, "rows": n} for r, n in crawl["quarantine_reasons"].items()], ["reason", "rows"]))
    sections.append("<h2>Dedup</h2>" + _kv(dedup, ["image_rows", "unique_images", "exact_duplicate_rows",
                                                    "near_duplicate_rows", "clusters", "candidate_pairs_new",
                                                    "confirmed_pairs", "quarantined", "elapsed_s"]))
    sections.append("<h2>Embed</h2>" + _kv(embed, ["model_version", "device", "canonical_images", "embedded",
                                                    "reused", "quarantined", "images_per_s"]))
    gates = [{"stage": stage, "gate": g.get("name"), "passed": g.get("passed"), "detail": g.get("message", "")}
             for stage, result in (report.get("validation") or {}).items() if result
             for g in result.get("gates", [])]
    sections.append("<h2>Validation gates</h2>" + _table(gates, ["stage", "gate", "passed", "detail"]))
    sections.append("<h2>Per category</h2>" + _table(report.get("per_category", [])))
    clusters = report.get("duplicate_clusters") or []
    grid = "".join(
        "<div class=row>" + "".join(_img(m["thumb"], f"{m['product_id']} ({'canonical' if m['canonical'] else m['kind']})")
                                    for m in c["members"]) + "</div>" for c in clusters)
    sections.append("<h2>Largest duplicate clusters</h2>" + (grid or "<p class=muted>no duplicates</p>"))
    samples = report.get("search_samples") or []
    grid = "".join(
        "<div class=row>" + _img(s.get("thumb"), f"query: {s.get('query')}") + "<span class=arrow>→</span>"
        + "".join(_img(r.get("thumb"), f"{r['product_id']} {r['score']:.3f}") for r in s.get("results", []))
        + "</div>" for s in samples)
    sections.append("<h2>Sample searches</h2>" + (grid or "<p class=muted>no snapshot to search</p>"))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             ".row{display:flex;gap:8px;align-items:center;margin:6px 0;flex-wrap:wrap}"
             "figure{margin:0;width:110px;text-align:center}figcaption{font-size:10px;word-break:break-all}"
             "img{max-width:96px;max-height:96px;border:1px solid #ddd}.muted{color:#888}.bad{color:#b00;font-weight:bold}"
             ".big{font-size:1.2em}.arrow{font-size:2em;color:#888}.noimg{width:96px;height:96px;background:#eee}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>catalog-index {html.escape(report['run_id'])}"
            f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")


def report_frame(report: dict) -> pd.DataFrame:
    """Per-category table as a DataFrame (for notebooks)."""
    return pd.DataFrame(report.get("per_category", []))
