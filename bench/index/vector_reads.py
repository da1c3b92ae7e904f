"""How long a build's shard tasks take to get their vectors: this tree vs an earlier commit.

    nice -n 10 .venv/bin/python bench/index/vector_reads.py \
        file://$PWD/bench/index/work/n1000000-d1280-c2000-s0-catalog/warehouse --baseline-commit dbb05ee

On a warehouse written by `run.py` (or any warehouse with a dedup run and embeddings), plans the
shards as `build_index` does, then times only the step that gives each shard task its vectors
(staged to a local file), one shard after another in this process:

* this tree: locate every vector from the sha256 column, route (several shards) or read the
  row groups holding the shard's rows (one shard), stage;
* the baseline commit's `_stage_shard_vectors` (loaded with `git show`): each shard task scanned
  every embeddings part.

Prints one JSON line: seconds and embeddings rows read by each.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipelines.index.plan import plan_shards  # noqa: E402
from pipelines.index.routing import locate_vectors, plan_vector_reads  # noqa: E402
from pipelines.index.stage import latest_dedup_run, read_dedup_members  # noqa: E402
from pipelines.index.tasks import _stage_shard_vectors, run_route_task  # noqa: E402
from pipelines.layout import embeddings_prefix  # noqa: E402
from pipelines.storage import open_storage  # noqa: E402


def baseline_module(commit: str, scratch: Path):
    source = subprocess.run(["git", "show", f"{commit}:pipelines/index.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = scratch / "baseline_index.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_index", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("warehouse")
    parser.add_argument("--run-id", default=None, help="dedup run (default: the newest)")
    parser.add_argument("--model-version", default=None, help="embeddings/<version> (default: the only one)")
    parser.add_argument("--max-vectors-per-shard", type=int, default=1_000_000)
    parser.add_argument("--baseline-commit", default=None, help="also time this commit's shard reads")
    args = parser.parse_args()

    storage = open_storage(args.warehouse)
    run_id = args.run_id or latest_dedup_run(storage)
    version = args.model_version or storage.list_dirs("embeddings")[0]
    emb_prefix = embeddings_prefix(version)
    members = read_dedup_members(storage, run_id)
    pairs = members.group_by(["category", "sha256"]).aggregate([])
    counts = pairs.group_by("category").aggregate([("sha256", "count")])
    plans = plan_shards(dict(zip(counts.column("category").to_pylist(),
                                 counts.column("sha256_count").to_pylist())), args.max_vectors_per_shard)
    shard_shas = {}
    for plan in plans:  # as build_index does (categories split across shards by sha256 order)
        rows = members.filter(pc.is_in(members.column("category"), value_set=pa.array(plan.categories)))
        shas = sorted(set(rows.column("sha256").to_pylist()))
        if plan.parts > 1:
            shas = np.array_split(np.array(shas, dtype=object), plan.parts)[plan.part].tolist()
        shard_shas[plan.shard_id] = shas
    out = {"warehouse": args.warehouse, "shards": {k: len(v) for k, v in shard_shas.items()}}
    scratch = Path(tempfile.mkdtemp(prefix="vector-reads-"))
    staging = "bench/_vector_reads_staging/"
    try:
        started = time.perf_counter()
        keys, located = locate_vectors(storage, emb_prefix)
        located_s = time.perf_counter() - started
        reads = plan_vector_reads(keys, located, {k: pa.array(v, pa.string()) for k, v in shard_shas.items()},
                                  staging, args.warehouse, None)
        routed = sum(run_route_task(task)["rows"] for task in reads.route_tasks)
        routed_s = time.perf_counter() - started
        for shard_id, shas in shard_shas.items():
            staged, found = _stage_shard_vectors(storage, reads.shard_files[shard_id],
                                                 np.array(shas, dtype=object), str(scratch / "staged.f32"))
        out["this_tree"] = {"seconds": round(time.perf_counter() - started, 1), "locate_s": round(located_s, 1),
                            "locate_and_route_s": round(routed_s, 1), **reads.describe(),
                            "rows_decoded_by_shard_tasks": routed if reads.mode == "routed" else reads.rows_read}
        print(json.dumps(out), flush=True)
        storage.delete_prefix(staging)
        if args.baseline_commit:
            baseline = baseline_module(args.baseline_commit, scratch)
            started = time.perf_counter()
            for shard_id, shas in shard_shas.items():
                baseline._stage_shard_vectors(storage, emb_prefix, np.array(shas, dtype=object),
                                              str(scratch / "staged.f32"))
            out["baseline"] = {"commit": args.baseline_commit, "seconds": round(time.perf_counter() - started, 1),
                               "embeddings_rows_read": len(shard_shas) * located.num_rows}
            print(json.dumps(out), flush=True)
    finally:
        storage.delete_prefix(staging)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
