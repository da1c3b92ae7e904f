"""Progress bars and terminal output for long stages (rich), quiet when not on a terminal."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("CATALOG_INDEX_NO_PROGRESS", "") in ("", "0")


def make_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=not progress_enabled(), transient=False)
