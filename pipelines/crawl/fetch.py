"""Fetch one image URL politely and safely: the crawler's network layer.

One `Fetcher` per Spark task: pooled connections (pipelines.guarded_http: every
connection checks the address it reaches against the SSRF policy, every attempt has a
wall-clock deadline covering connect, headers, redirects and body), a per-host:port
concurrency cap, retries with exponential backoff and jitter on 5xx, 429 and resets
(honouring Retry-After up to crawl.max_backoff_s), a byte cap on decoded bytes,
conditional requests (If-None-Match / If-Modified-Since). s3:// URLs of allowed buckets
go through the same client as presigned GETs; file:// only with --allow-private-hosts.

The bound, per URL: (retries + 1) * total_timeout_s + retries * max_backoff_s, plus any
wait for a free per-host slot. An attempt that runs out of time is not retried unless
crawl.retry_timeouts is set.

Never raises: every outcome is a FetchResult with a reason code (schemas.reasons), even
a bug (internal_error), so the stage can account for every row.
"""
from __future__ import annotations

import email.utils
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from pipelines.config import CrawlSettings, S3Settings
from pipelines.crawl.url_safety import UrlPolicy, UrlRejected
from pipelines.address_policy import ALLOW_ALL
from pipelines.guarded_http import Deadline, GuardedClient, HttpFailure, read_body, short
from schemas.reasons import CONNECTION_ERROR, INTERNAL_ERROR, TIMEOUT, TOO_LARGE, http_status_reason


@dataclass
class FetchResult:
    outcome: str                      # "ok" | "not_modified" | "failed"
    reason: str | None = None         # reason code when failed
    detail: str | None = None
    http_status: int | None = None
    data: bytes | None = None
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    final_url: str | None = None


_RETRYABLE_STATUS = re.compile(r"^http_(429|5\d\d)$")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    def __init__(self, settings: CrawlSettings, s3: S3Settings | None = None, policy: UrlPolicy | None = None):
        self.settings = settings
        self.s3 = s3 or S3Settings()
        self.policy = policy or UrlPolicy.from_settings(settings)
        self.client = GuardedClient(self.policy.addresses, connect_timeout_s=settings.connect_timeout_s,
                                    read_timeout_s=settings.read_timeout_s, maxsize=max(settings.concurrency, 8),
                                    user_agent=settings.user_agent, proxy=settings.proxy, ca_bundle=settings.ca_bundle)
        self._host_slots: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(settings.per_host_concurrency))
        self._lock = threading.Lock()
        self._s3: tuple[object, GuardedClient] | None = None

    def close(self) -> None:
        self.client.close()
        if self._s3:
            self._s3[1].close()

    # -- public -----------------------------------------------------------------------
    def fetch(self, url: str, etag: str | None = None, last_modified: str | None = None) -> FetchResult:
        try:
            return self._fetch(url, etag, last_modified)
        except Exception as exc:  # a bug, not a server: still this row's outcome, never the task's end
            return FetchResult("failed", INTERNAL_ERROR, short(f"{type(exc).__name__}: {exc}", 500))

    def _fetch(self, url: str, etag: str | None, last_modified: str | None) -> FetchResult:
        try:
            self.policy.check(url)
        except UrlRejected as exc:
            return FetchResult("failed", exc.reason, exc.detail)
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            return self._fetch_file(url)
        attempt = self._attempt_http if scheme in ("http", "https") else self._attempt_s3
        s = self.settings
        retrying = Retrying(retry=retry_if_exception(self._retryable), stop=stop_after_attempt(s.retries + 1),
                            wait=self._wait, reraise=True)
        attempts = 0
        try:
            for try_ in retrying:
                with try_:
                    attempts += 1
                    return attempt(url, etag, last_modified)
        except HttpFailure as exc:
            detail = exc.detail + (f" (after {attempts} attempts)" if attempts > 1 else "")
            return FetchResult("failed", exc.reason, detail, exc.http_status)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- retries ----------------------------------------------------------------------
    def _retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, HttpFailure) or isinstance(exc, UrlRejected):
            return False
        if exc.retry_after is not None and exc.retry_after > self.settings.max_backoff_s:
            return False  # the server asks for a longer wait than the bound allows
        return (exc.reason == CONNECTION_ERROR or bool(_RETRYABLE_STATUS.match(exc.reason))
                or (exc.reason == TIMEOUT and self.settings.retry_timeouts))

    def _wait(self, retry_state) -> float:
        s = self.settings
        wait = wait_random_exponential(multiplier=s.backoff_s, max=s.max_backoff_s)(retry_state)
        exc = retry_state.outcome.exception()
        if isinstance(exc, HttpFailure) and exc.retry_after is not None:
            wait = max(wait, exc.retry_after)
        return min(wait, s.max_backoff_s)

    # -- http -------------------------------------------------------------------------
    def _slot(self, url: str) -> threading.BoundedSemaphore:
        parts = urlsplit(url)
        with self._lock:
            return self._host_slots[f"{(parts.hostname or '').lower()}:{parts.port}"]

    def _check_hop(self, url: str) -> None:
        self.policy.check(url, schemes=("http", "https"))

    def _attempt_http(self, url: str, etag: str | None, last_modified: str | None) -> FetchResult:
        s = self.settings
        headers = {"Accept": "image/*;q=0.9,*/*;q=0.1"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        # The slot first: waiting for a busy host is not part of this attempt's deadline.
        with self._slot(url), Deadline(s.total_timeout_s) as deadline:
            response, final = self.client.open(url, deadline, headers, max_redirects=s.max_redirects,
                                                check_url=self._check_hop)
            complete = False
            try:
                status = response.status
                meta = dict(http_status=status, etag=response.headers.get("ETag"),
                            last_modified=response.headers.get("Last-Modified"),
                            content_type=response.headers.get("Content-Type"), final_url=final)
                if status == 304:
                    complete = True
                    return FetchResult("not_modified", **meta)
                if status == 429 or status >= 500:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    wait = f"; it asks to retry after {retry_after:.0f}s" if retry_after is not None else ""
                    raise HttpFailure(http_status_reason(status), f"HTTP {status} from {short(final, 120)}{wait}",
                                      status, retry_after=retry_after)
                if status != 200:
                    raise HttpFailure(http_status_reason(status), f"HTTP {status} for {short(final)}", status)
                data = read_body(response, s.max_bytes, deadline, final)
                complete = True
                return FetchResult("ok", data=data, **meta)
            finally:
                self.client.release(response, deadline, complete)

    # -- s3 and file --------------------------------------------------------------------
    def _s3_clients(self) -> tuple[object, GuardedClient]:
        with self._lock:
            if self._s3 is None:
                import boto3  # only tasks that meet an s3:// image URL pay for botocore
                from botocore.config import Config

                session = boto3.session.Session(profile_name=self.settings.s3_profile)
                signer = session.client("s3", endpoint_url=self.s3.endpoint_url, region_name=self.s3.region,
                                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}
                                                      if self.s3.endpoint_url else None))
                # The endpoint is the operator's (S3Settings), not the feed's: any address may serve it.
                client = GuardedClient(ALLOW_ALL, connect_timeout_s=self.settings.connect_timeout_s,
                                       read_timeout_s=self.settings.read_timeout_s,
                                       maxsize=max(self.settings.concurrency, 8), ca_bundle=self.settings.ca_bundle)
                self._s3 = (signer, client)
            return self._s3

    def _attempt_s3(self, url: str, etag: str | None, _last_modified: str | None) -> FetchResult:
        """A presigned, ranged GET through the guarded client: same deadline and byte cap as HTTP."""
        s = self.settings
        parts = urlsplit(url)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        signer, client = self._s3_clients()
        signed = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900)
        headers = {"Range": f"bytes=0-{s.max_bytes}"}
        if etag:
            headers["If-None-Match"] = etag
        with Deadline(s.total_timeout_s) as deadline:
            response, _ = client.open(signed, deadline, headers, max_redirects=0)
            complete = False
            try:
                status = response.status
                meta = dict(http_status=200 if status in (200, 206, 416) else status,
                            etag=response.headers.get("ETag"), last_modified=response.headers.get("Last-Modified"),
                            content_type=response.headers.get("Content-Type"), final_url=url)
                if status == 304:
                    complete = True
                    return FetchResult("not_modified", **{**meta, "http_status": 304, "etag": meta["etag"] or etag})
                if status == 416:  # a range of an empty object
                    return FetchResult("ok", data=b"", **meta)
                if status == 429 or status >= 500:
                    raise HttpFailure(http_status_reason(status), f"S3 answered HTTP {status} for {short(url)}", status,
                                      retry_after=parse_retry_after(response.headers.get("Retry-After")))
                if status not in (200, 206):
                    raise HttpFailure(http_status_reason(status), f"S3 answered HTTP {status} for {short(url)}", status)
                total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
                if total.isdigit() and int(total) > s.max_bytes:
                    raise HttpFailure(TOO_LARGE, f"object is {int(total):,} bytes, over crawl.max_bytes={s.max_bytes:,}",
                                      200)
                data = read_body(response, s.max_bytes, deadline, url)
                complete = True
                return FetchResult("ok", data=data, **meta)
            finally:
                client.release(response, deadline, complete)

    def _fetch_file(self, url: str) -> FetchResult:
        path = Path(unquote(urlsplit(url).path))
        if not path.is_file():
            return FetchResult("failed", http_status_reason(404), f"no such file {short(str(path))}", 404)
        size = path.stat().st_size
        if size > self.settings.max_bytes:
            return FetchResult("failed", TOO_LARGE, f"{short(str(path))} is {size:,} bytes, over crawl.max_bytes")
        with path.open("rb") as fh:
            data = fh.read(self.settings.max_bytes + 1)  # the file may have grown since stat
        if len(data) > self.settings.max_bytes:
            return FetchResult("failed", TOO_LARGE, f"{short(str(path))} is over crawl.max_bytes")
        return FetchResult("ok", http_status=200, data=data, final_url=url)

