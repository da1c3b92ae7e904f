"""Reason codes: the machine-readable `reason` of every quarantined row, in one list.

A quarantine record (schemas.tables.QUARANTINE) names the stage that rejected the row and
one of these codes; reports, gates and people filter on them, so a code is an API: add
codes, never repurpose one. HTTP statuses are `http_<status>` (`http_404`, `http_503`).
"""
from __future__ import annotations

# --- the manifest row itself -----------------------------------------------------------
MISSING_FIELD = "missing_field"          # product_id, category or image_url empty
DUPLICATE_ROW = "duplicate_row"          # (product_id, image_url) seen earlier in the manifest
BAD_URL = "bad_url"                      # unparseable, unsupported scheme, too long, odd characters

# --- fetching (crawl) ------------------------------------------------------------------
SSRF_BLOCKED = "ssrf_blocked"            # the address is one the URL policy forbids
TIMEOUT = "timeout"                      # an attempt ran past its deadline
CONNECTION_ERROR = "connection_error"    # refused, reset, closed early
DNS_ERROR = "dns_error"                  # the host name does not resolve
TOO_MANY_REDIRECTS = "too_many_redirects"
BAD_REDIRECT = "bad_redirect"            # a redirect without Location, or to an unusable or non-http(s) URL
TOO_LARGE = "too_large"                  # more bytes than crawl.max_bytes (counted after Content-Encoding)
UNEXPECTED_304 = "unexpected_304"        # 304 Not Modified to an unconditional request
BAD_ENCODING = "bad_encoding"            # the body does not decode as its Content-Encoding (gzip, br...) says
BAD_RESPONSE = "bad_response"            # a malformed status line or headers (too long, too many, not HTTP)
TLS_ERROR = "tls_error"                  # TLS handshake or certificate verification failed
REQUEST_ERROR = "request_error"          # the HTTP client refused the request (e.g. an invalid header value)
INTERNAL_ERROR = "internal_error"        # a bug met while handling this row; the exception is in detail


def http_status_reason(status: int) -> str:
    return f"http_{status}"


# --- the bytes as an image (crawl's image check, dedup's hashing, embed's decoding) ------
EMPTY_BODY = "empty_body"                # zero bytes received
NOT_AN_IMAGE = "not_an_image"            # no known image signature (an HTML error page, ...)
UNSUPPORTED_FORMAT = "unsupported_format"  # an image, of a format not in crawl.allowed_formats
DECOMPRESSION_BOMB = "decompression_bomb"  # the header declares more pixels than allowed
TOO_SMALL = "too_small"                  # a side below crawl.min_side
TRUNCATED = "truncated"                  # the file ends before the image does, or the body before its Content-Length
CORRUPT = "corrupt"                      # the image data cannot be decoded

# --- later stages ----------------------------------------------------------------------
BYTES_MISSING = "bytes_missing"          # dedup: the stored bytes of a state row cannot be read
MISSING_EMBEDDING = "missing_embedding"  # build-index: a canonical image without a vector

# Failures that say nothing about the image itself: the crawl keeps last night's good copy.
TRANSIENT_REASONS = frozenset({TIMEOUT, CONNECTION_ERROR, DNS_ERROR, "http_429", "http_500", "http_502",
                               "http_503", "http_504"})
# The same, when the fetch itself failed this way (the response broke on the wire: a TLS handshake
# that failed, a malformed status line or headers, a body cut before its Content-Length). TRUNCATED
# from the image check (a whole response holding a cut-off file) is the image's own fault: quarantined.
WIRE_FAILURE_REASONS = frozenset({TLS_ERROR, BAD_RESPONSE, TRUNCATED})

# Codes that mean "the bytes arrived but are not a decodable image" (the decode-failure gate).
DECODE_FAILURE_REASONS = [NOT_AN_IMAGE, EMPTY_BODY, TRUNCATED, CORRUPT]

# What a decoder may answer (pipelines.decode.ImageDecodeError.reason).
DECODE_REASONS = (NOT_AN_IMAGE, TRUNCATED, CORRUPT, DECOMPRESSION_BOMB)
