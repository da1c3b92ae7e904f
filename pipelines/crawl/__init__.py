"""Crawl stage: manifest -> images table, incrementally, with every row accounted for.

Public: `run_crawl` (the stage), `CrawlSummary`, `CrawlError`, `Fetcher` (the guarded network
client, also for other tools), `read_manifest` / `ManifestError`, and the readers of its committed
output re-exported from pipelines.readers (`read_current_images`, `read_crawl_state`,
`LIVE_STATUSES`). Modules: stage (driver and Spark tasks), manifest (reading feeds), fetch (the
network client, on pipelines.guarded_http), url_safety (which URLs may be requested; the address
rules are pipelines.address_policy), image_check (is it a usable image).
"""
from pipelines.crawl.fetch import Fetcher
from pipelines.crawl.manifest import ManifestError, read_manifest
from pipelines.crawl.stage import CrawlError, CrawlSummary, run_crawl
from pipelines.readers import (LIVE_STATUSES, committed_crawl_runs, previous_crawl_run, read_crawl_state,
                               read_current_images)

__all__ = ["Fetcher", "ManifestError", "read_manifest", "CrawlError", "CrawlSummary", "run_crawl", "LIVE_STATUSES", "committed_crawl_runs",
           "previous_crawl_run", "read_crawl_state", "read_current_images"]
