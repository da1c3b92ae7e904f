"""Index stage: canonical vectors -> a sharded FAISS snapshot (unpublished until publish verifies it).

Public: `build_index` (the stage), `BuildResult`, `IndexBuildError`, `IndexCheckFailed`,
`index_settings_from`, `model_for_version`. faiss is imported on first use, never with the package.
"""
from pipelines.index.stage import (BuildResult, IndexBuildError, IndexCheckFailed, build_index, index_settings_from,
                                   model_for_version)

__all__ = ["BuildResult", "IndexBuildError", "IndexCheckFailed", "build_index", "index_settings_from",
           "model_for_version"]
