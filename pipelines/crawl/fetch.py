"""Fetch one image URL politely and safely: the crawler's network layer.

One `Fetcher` per Spark task: a pooled HTTP session, a per-host concurrency cap,
connect/read timeouts plus a whole-response deadline (a server that trickles bytes
cannot hold a slot forever), retries with exponential backoff and jitter on 5xx, 429,
timeouts and resets, a byte cap, conditional requests (If-None-Match /
If-Modified-Since), and an SSRF check on every redirect hop. s3:// and file:// URLs
are served by the same interface.

Never raises for a bad URL or a bad server: every outcome is a FetchResult with a
reason code, so the stage can account for every row.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from pipelines.config import CrawlSettings, S3Settings
from pipelines.crawl.url_safety import UrlPolicy, UrlRejected


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


class _Retryable(Exception):
    """A failure worth another attempt (5xx, 429, timeout, reset)."""

    def __init__(self, reason: str, detail: str, http_status: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.http_status = reason, detail, http_status


class _Final(Exception):
    def __init__(self, reason: str, detail: str, http_status: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.http_status = reason, detail, http_status


class Fetcher:
    def __init__(self, settings: CrawlSettings, s3: S3Settings | None = None, policy: UrlPolicy | None = None):
        self.settings = settings
        self.s3 = s3 or S3Settings()
        self.policy = policy or UrlPolicy(settings.allow_private_hosts, settings.allow_networks)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=64, pool_maxsize=max(settings.concurrency, 8), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = settings.user_agent
        self.session.headers["Accept"] = "image/*;q=0.9,*/*;q=0.1"
        self._host_slots: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(settings.per_host_concurrency))
        self._slots_lock = threading.Lock()
        self._s3_clients: dict[str, object] = {}

    def close(self) -> None:
        self.session.close()

    # -- public -----------------------------------------------------------------------
    def fetch(self, url: str, etag: str | None = None, last_modified: str | None = None) -> FetchResult:
        try:
            self.policy.check(url)
        except UrlRejected as exc:
            return FetchResult("failed", exc.reason, exc.detail)
        scheme = urlsplit(url).scheme.lower()
        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=wait_random_exponential(multiplier=self.settings.backoff_s, max=30),
            reraise=False,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if scheme in ("http", "https"):
                        return self._fetch_http(url, etag, last_modified)
                    if scheme == "s3":
                        return self._fetch_s3(url, etag)
                    return self._fetch_file(url)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            return FetchResult("failed", last.reason, f"{last.detail} (after {self.settings.retries + 1} attempts)",
                               last.http_status)
        except _Final as exc:
            return FetchResult("failed", exc.reason, exc.detail, exc.http_status)
        except UrlRejected as exc:
            return FetchResult("failed", exc.reason, exc.detail)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- http -------------------------------------------------------------------------
    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._slots_lock:
            return self._host_slots[host]

    def _fetch_http(self, url: str, etag: str | None, last_modified: str | None) -> FetchResult:
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        current = url
        for _hop in range(self.settings.max_redirects + 1):
            host = (urlsplit(current).hostname or "").lower()
            with self._slot(host):
                response = self._request(current, headers)
                try:
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location")
                        if not location:
                            raise _Final("bad_redirect", f"HTTP {status} without a Location header", status)
                        current = urljoin(current, location)
                        self.policy.check(current)  # the redirect target gets the same SSRF check
                        continue
                    meta = dict(http_status=status, etag=response.headers.get("ETag"),
                                last_modified=response.headers.get("Last-Modified"),
                                content_type=response.headers.get("Content-Type"), final_url=current)
                    if status == 304:
                        return FetchResult("not_modified", **meta)
                    if status == 429 or status >= 500:
                        raise _Retryable(f"http_{status}", f"HTTP {status} from {host}", status)
                    if status != 200:
                        raise _Final(f"http_{status}", f"HTTP {status} for {current}", status)
                    data = self._read_body(response, current)
                    return FetchResult("ok", data=data, **meta)
                finally:
                    response.close()
        raise _Final("too_many_redirects", f"more than {self.settings.max_redirects} redirects from {url}")

    def _request(self, url: str, headers: dict) -> requests.Response:
        s = self.settings
        try:
            return self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                    timeout=(s.connect_timeout_s, s.read_timeout_s))
        except requests.exceptions.ConnectTimeout as exc:
            raise _Retryable("timeout", f"connect timeout after {s.connect_timeout_s}s: {url}") from exc
        except requests.exceptions.ReadTimeout as exc:
            raise _Retryable("timeout", f"no response within {s.read_timeout_s}s: {url}") from exc
        except requests.exceptions.InvalidURL as exc:
            raise _Final("bad_url", f"invalid URL {url!r}: {exc}") from exc
        except requests.exceptions.ConnectionError as exc:
            text = str(exc)
            if "NameResolutionError" in text or "Name or service not known" in text:
                raise _Final("dns_error", f"cannot resolve host of {url}") from exc
            raise _Retryable("connection_error", f"connection failed: {url}: {_short(text)}") from exc
        except requests.exceptions.RequestException as exc:
            raise _Final("request_error", f"{type(exc).__name__}: {_short(str(exc))}") from exc

    def _read_body(self, response: requests.Response, url: str) -> bytes:
        s = self.settings
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > s.max_bytes:
            raise _Final("too_large", f"Content-Length {int(declared):,} exceeds crawl.max_bytes={s.max_bytes:,}", 200)
        deadline = time.monotonic() + s.total_timeout_s
        chunks, size = [], 0
        try:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                size += len(chunk)
                if size > s.max_bytes:
                    raise _Final("too_large", f"body exceeds crawl.max_bytes={s.max_bytes:,}", 200)
                if time.monotonic() > deadline:
                    raise _Retryable("timeout", f"body not complete within crawl.total_timeout_s={s.total_timeout_s}s "
                                     f"({size:,} bytes received): {url}", 200)
                chunks.append(chunk)
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            # urllib3 reports both a read timeout mid-body and a reset connection here.
            reason = "timeout" if "timed out" in str(exc).lower() else "connection_error"
            raise _Retryable(reason, f"body read failed after {size:,} bytes: {_short(str(exc))}", 200) from exc
        data = b"".join(chunks)
        if declared and declared.isdigit() and len(data) < int(declared):
            raise _Final("truncated", f"received {len(data):,} of {int(declared):,} declared bytes", 200)
        return data

    # -- s3 and file --------------------------------------------------------------------
    def _fetch_s3(self, url: str, etag: str | None) -> FetchResult:
        from botocore.exceptions import BotoCoreError, ClientError

        from pipelines.storage import S3Storage

        parts = urlsplit(url)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        client = self._s3_clients.get(bucket)
        if client is None:
            client = self._s3_clients[bucket] = S3Storage(bucket, "", self.s3).client
        try:
            kwargs = {"Bucket": bucket, "Key": key}
            if etag:
                kwargs["IfNoneMatch"] = etag
            head = client.head_object(**kwargs)
            if head["ContentLength"] > self.settings.max_bytes:
                raise _Final("too_large", f"object is {head['ContentLength']:,} bytes, over crawl.max_bytes", 200)
            obj = client.get_object(**kwargs)
            data = obj["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 304 or code == "304":
                return FetchResult("not_modified", http_status=304, etag=etag, final_url=url)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise _Final("http_404", f"no such object {url}", 404) from exc
            if status and status >= 500:
                raise _Retryable(f"http_{status}", f"S3 {code} for {url}", status) from exc
            raise _Final(f"s3_{code or status}", f"S3 error {code} for {url}", status) from exc
        except BotoCoreError as exc:
            raise _Retryable("connection_error", f"S3 request failed for {url}: {exc}") from exc
        return FetchResult("ok", http_status=200, data=data, etag=obj.get("ETag"),
                           last_modified=obj["LastModified"].strftime("%a, %d %b %Y %H:%M:%S GMT")
                           if obj.get("LastModified") else None,
                           content_type=obj.get("ContentType"), final_url=url)

    def _fetch_file(self, url: str) -> FetchResult:
        path = Path(unquote(urlsplit(url).path))
        if not path.is_file():
            raise _Final("http_404", f"no such file {path}", 404)
        if path.stat().st_size > self.settings.max_bytes:
            raise _Final("too_large", f"{path} is {path.stat().st_size:,} bytes, over crawl.max_bytes")
        return FetchResult("ok", http_status=200, data=path.read_bytes(), final_url=url)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
