"""The index stage's errors: why a build cannot start or go on, and why it is not publishable.

Both derive from `pipelines.errors.StageRefused` (the CLI turns them into exit codes). Planning,
shard builds, Spark tasks and the driver all raise them, so this module must never import another
module of this package nor hold build logic.
"""
from __future__ import annotations

from pipelines.errors import StageRefused


class IndexBuildError(StageRefused, ValueError):
    """The build cannot start or continue; the message says what to fix."""

    exit_code = 2  # the CLI has always answered these with 2: fix the input (run id, snapshot id) and rerun


class IndexCheckFailed(StageRefused):
    """A shard's measured recall@10 is below `index.min_recall`: the build is not publishable."""

    def __init__(self, message: str, failing: list[dict]):
        super().__init__(message)
        self.failing = failing
