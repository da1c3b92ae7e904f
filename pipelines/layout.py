"""Where each table lives in the warehouse (see DESIGN.md, "Storage layout").

Every key the stages read or write is built here, so the layout can be read in one place.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from urllib.parse import quote, unquote

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def new_run_id(now: datetime | None = None) -> str:
    """Default run id: UTC time, which sorts in run order (`20261123T031500Z`)."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-128 characters of letters, digits and . _ : + - "
                         "(run ids sort in time order: use e.g. 20261123T031500Z or 2026-11-23)")
    return run_id


def partition_value(value: str) -> str:
    """Hive-style partition value: any category name becomes one safe path segment."""
    return quote(value, safe="")


def partition_name(segment: str) -> str:
    return unquote(segment)


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def manifest_key(run_id: str) -> str:
    return f"runs/{run_id}/manifest.parquet"


def crawl_prefix(run_id: str) -> str:
    return f"runs/{run_id}/crawl/"


def crawl_state_prefix(run_id: str) -> str:
    return f"runs/{run_id}/crawl/state/"


def crawl_success_key(run_id: str) -> str:
    return f"runs/{run_id}/crawl/_SUCCESS.json"


def images_key(category: str, run_id: str, part: str) -> str:
    return f"images/category={partition_value(category)}/run_id={run_id}/part-{part}.parquet"


def images_category_prefix(category: str) -> str:
    return f"images/category={partition_value(category)}/"


def quarantine_prefix(run_id: str, stage: str) -> str:
    return f"quarantine/{run_id}/{stage}/"


def reports_prefix(run_id: str) -> str:
    return f"reports/{run_id}/"
