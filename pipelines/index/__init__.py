"""Index stage: canonical vectors -> a sharded FAISS snapshot (unpublished until publish verifies it).

Public: `build_index` (the stage), `BuildResult`, `IndexBuildError`, `IndexCheckFailed`,
`index_settings_from`, `model_for_version`. faiss is imported on first use, never with the package.
Modules: stage (the driver), plan (shards, index types), vectors (vector sources, exact search),
shard (one FAISS index), routing (which rows each task reads), tasks (Spark task bodies), reuse
(unchanged shards of the live snapshot), errors.
"""
from pipelines.index.errors import IndexBuildError, IndexCheckFailed
from pipelines.index.stage import (
           BuildResult,
           build_index,
           index_settings_from,
           model_for_version,
)

__all__ = ["BuildResult", "IndexBuildError", "IndexCheckFailed", "build_index", "index_settings_from",
           "model_for_version"]
