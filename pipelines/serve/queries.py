"""Read and check what a search request sends: a multipart upload (`image`), raw image bytes,
or JSON `{"image_url": ...}` / `{"vector": [...]}`. Every problem is an `ApiError` with an HTTP
4xx status, a machine-readable code and a sentence saying what to send instead.

Bodies are read up to `max_upload_bytes` (413 beyond, whatever Content-Length claims) within
`body_timeout_s` (408 for a client that trickles). Image URLs are fetched by the crawler's
guarded `Fetcher`: http(s) only, the address policy on every hop (no loopback, private or
metadata addresses unless the operator allows them), a byte cap, deadlines. This module must
never read an unbounded body nor fetch a URL the policy forbids.
"""
from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from pipelines.config import CrawlSettings
from pipelines.crawl import Fetcher
from pipelines.decode import ImageDecodeError
from schemas.reasons import CORRUPT, DECOMPRESSION_BOMB, NOT_AN_IMAGE, TRUNCATED

MAX_URL_LENGTH = 4096


class ApiError(Exception):
    """A request the service will not answer as asked: status (4xx, or 503), code, explanation."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def to_json(self) -> dict:
        return {"error": self.code, "detail": self.detail}


@dataclass
class Query:
    kind: str                          # "image" | "vector"
    image: bytes | None = None
    vector: list[float] | None = None
    image_url: str | None = None


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, "too_large", f"request body of {int(declared):,} bytes exceeds the limit of "
                                             f"{limit:,} bytes: send a smaller image")
    chunks, size = [], 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"request body exceeds the limit of {limit:,} bytes: "
                                                 "send a smaller image")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None
    return b"".join(chunks)


async def parse_query(request: Request, body: bytes) -> Query:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _parse_multipart(request, body)
    if content_type in ("application/json", "text/json") or (not content_type and body[:1] in (b"{", b"[")):
        return _parse_json(body)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty: send the image bytes")
        return Query("image", image=body)
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {content_type or '(none)'} is not accepted: send multipart/form-data with a file "
                   "field 'image', an image/* body, or JSON {\"image_url\": ...} or {\"vector\": [...]}")


async def _parse_multipart(request: Request, body: bytes) -> Query:
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=64 * 1024)
    except Exception as exc:  # python-multipart's errors on hostile bodies: all mean "malformed"
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({type(exc).__name__}: "
                                             f"{str(exc)[:200]}): send one file field named 'image'") from None
    try:
        upload = form.get("image")
        if upload is not None and hasattr(upload, "read"):
            data = await upload.read()
            if not data:
                raise ApiError(400, "empty_image", "the 'image' field is empty: choose an image file")
            return Query("image", image=data)
        if isinstance(upload, str):
            raise ApiError(400, "image_not_a_file", "the 'image' field must be a file upload, not text")
        if isinstance(form.get("image_url"), str) and form.get("image_url"):
            return Query("image", image_url=_check_url(form.get("image_url")))
        raise ApiError(400, "missing_image", "the multipart body has no file field named 'image' "
                                             f"(fields: {', '.join(sorted(form.keys())) or 'none'})")
    finally:
        await form.close()


def _parse_json(body: bytes) -> Query:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid JSON: send {\"image_url\": \"https://...\"} or "
                                        "{\"vector\": [...]}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_json", "the JSON body must be an object with image_url or vector")
    given = [key for key in ("image_url", "vector") if payload.get(key) is not None]
    if len(given) != 1:
        raise ApiError(400, "bad_query", "send exactly one of image_url and vector "
                                         f"(got {', '.join(given) or 'neither'})")
    if given == ["image_url"]:
        if not isinstance(payload["image_url"], str):
            raise ApiError(400, "bad_image_url", "image_url must be a string")
        return Query("image", image_url=_check_url(payload["image_url"]))
    vector = payload["vector"]
    if not isinstance(vector, list) or not vector or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
        raise ApiError(422, "bad_vector", "vector must be a non-empty list of numbers")
    if not all(math.isfinite(v) for v in vector):
        raise ApiError(422, "bad_vector", "vector holds NaN or infinite values")
    if not any(vector):
        raise ApiError(422, "bad_vector", "vector is all zeros: it has no direction to search along")
    return Query("vector", vector=vector)


def _check_url(url: str) -> str:
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise ApiError(400, "bad_image_url", f"image_url is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ApiError(422, "bad_image_url", f"image_url must be an http(s) URL with a host (got {url[:100]!r})")
    return url


def image_fetcher(max_bytes: int, timeout_s: float, allow_private: bool) -> Fetcher:
    """The crawler's guarded client with the service's limits: one attempt, short deadlines."""
    settings = CrawlSettings(max_bytes=max_bytes, retries=0, connect_timeout_s=min(5.0, timeout_s),
                             read_timeout_s=timeout_s, total_timeout_s=timeout_s, max_redirects=3,
                             allow_private_hosts=allow_private, concurrency=16, per_host_concurrency=8)
    return Fetcher(settings)


def fetch_image(fetcher: Fetcher, url: str) -> bytes:
    """The bytes at `url`, or ApiError: 422 with the crawler's reason code (blocked address, HTTP
    status, timeout...), 413 when the image is larger than the upload limit."""
    result = fetcher.fetch(url)
    if result.outcome == "ok" and result.data:
        return result.data
    reason = result.reason or "empty_body"
    if reason == "too_large":
        raise ApiError(413, "too_large", f"the image at image_url is larger than the limit: {result.detail}")
    raise ApiError(422, "image_url_failed", f"cannot fetch image_url ({reason}): {result.detail or 'no content'}")


DECODE_STATUS = {NOT_AN_IMAGE: 415, DECOMPRESSION_BOMB: 413, CORRUPT: 422, TRUNCATED: 422}


def decode_error(error: ImageDecodeError) -> ApiError:
    status = DECODE_STATUS.get(error.reason, 422)
    advice = {NOT_AN_IMAGE: "send a JPEG, PNG, GIF, WebP, BMP or TIFF image",
              DECOMPRESSION_BOMB: "send an image with fewer pixels",
              CORRUPT: "the file is damaged: send it again or another image",
              TRUNCATED: "the file is cut short: send the whole image"}.get(error.reason, "send another image")
    return ApiError(status, error.reason, f"{error.detail}: {advice}")
