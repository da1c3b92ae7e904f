"""The one base error of catalog-index, and what each kind of error means for the exit code.

Every error a command can stop with derives from `CatalogIndexError`; the CLI (pipelines.cli)
prints its message and exits with its `exit_code`, so exit codes are decided here and nowhere
else. Per-row problems (a bad URL, an undecodable image) are not errors of the run: they become
reason codes (schemas.reasons) and the run goes on.
"""
from __future__ import annotations


class CatalogIndexError(Exception):
    """Something stopped a command. The message says what happened and what to do."""

    exit_code = 1


class UsageError(CatalogIndexError, ValueError):
    """The command, its settings or its input cannot work as given: fix them and rerun (exit 2)."""

    exit_code = 2


class StageRefused(CatalogIndexError, RuntimeError):
    """A stage ran and refused to go on (a gate tripped, nothing to build): exit 1.

    The pipeline turns it into PipelineStopped, writes the run report and publishes nothing.
    """

    exit_code = 1


class VerificationFailed(CatalogIndexError, RuntimeError):
    """Files did not match their recorded size or checksum: exit 1, nothing was changed."""

    exit_code = 1
