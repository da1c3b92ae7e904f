"""Which image URLs the crawler may request at all: the URL half of the SSRF guard.

A catalog feed is untrusted input. `UrlPolicy.check` refuses, before anything is sent,
URLs that are too long, malformed, of an unsupported scheme, with credentials, or with
backslashes, whitespace or control characters in the authority (spellings that URL
parsers read differently), IP-literal hosts the address policy forbids, file:// (unless
private hosts are allowed) and s3:// buckets outside `crawl.allow_s3_buckets`.

The address half is `pipelines.address_policy`, applied by `pipelines.guarded_http`
where the connection is made: every connection checks the address it
actually reaches, whatever the URL looked like, so this module's checks are early, clear
refusals, not the boundary. Names are never resolved here (one lookup per connection,
made by the connection, is what defeats DNS rebinding).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipelines.config import CrawlSettings
from pipelines.address_policy import AddressPolicy, AddressRefused, Resolver, ip_literal, resolve_host
from pipelines.guarded_http import HttpFailure, short
from schemas.reasons import BAD_URL, SSRF_BLOCKED

# Control characters anywhere (header injection, parser quirks); in the authority also
# whitespace, backslash, '@' (credentials) and '%' (encoded hosts): where parsers disagree.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_AUTHORITY_FORBIDDEN = re.compile(r"[\\@%\s\x00-\x1f\x7f]")


class UrlRejected(HttpFailure):
    """The URL may not be requested; `reason` is bad_url or ssrf_blocked."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)


@dataclass
class UrlPolicy:
    allow_private_hosts: bool = False
    allow_networks: list[str] = field(default_factory=list)
    resolver: Resolver = resolve_host
    max_url_length: int = 8192
    allow_s3_buckets: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.addresses = AddressPolicy(self.allow_private_hosts, list(self.allow_networks), self.resolver)

    @classmethod
    def from_settings(cls, crawl: CrawlSettings, resolver: Resolver = resolve_host) -> UrlPolicy:
        return cls(crawl.allow_private_hosts, list(crawl.allow_networks), resolver, crawl.max_url_length,
                   list(crawl.allow_s3_buckets))

    def check(self, url: str, schemes: tuple[str, ...] = ("http", "https", "s3", "file")) -> None:
        """Raise UrlRejected(bad_url | ssrf_blocked) when `url` may not be requested."""
        if not isinstance(url, str):
            raise UrlRejected(BAD_URL, f"not a URL: {type(url).__name__}")
        if len(url) > self.max_url_length:
            raise UrlRejected(BAD_URL, f"URL is {len(url):,} characters, over crawl.max_url_length="
                              f"{self.max_url_length:,}: {short(url, 80)!r}")
        if _CONTROL.search(url):
            raise UrlRejected(BAD_URL, f"control character in URL {short(url)!r}")
        try:
            parts = urlsplit(url)
            parts.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise UrlRejected(BAD_URL, f"malformed URL {short(url)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in schemes:
            raise UrlRejected(BAD_URL, f"unsupported URL scheme {parts.scheme!r} in {short(url)!r}"
                              + ("" if schemes == ("http", "https", "s3", "file") else " (here: http or https)"))
        if scheme == "file":
            if not self.allow_private_hosts:
                raise UrlRejected(SSRF_BLOCKED, "file:// URLs read the crawler's own disk; "
                                  "allowed only with --allow-private-hosts")
            return
        # The authority as written, before any parser normalises it: where parsers disagree.
        authority = url.split("//", 1)[1] if "//" in url else ""
        authority = re.split(r"[/?#]", authority, maxsplit=1)[0]
        if _AUTHORITY_FORBIDDEN.search(authority):
            raise UrlRejected(BAD_URL, f"credentials, backslash, '%' or whitespace in the host part of {short(url)!r}")
        if scheme == "s3":
            if not parts.netloc:
                raise UrlRejected(BAD_URL, f"S3 URL without a bucket: {short(url)!r}")
            if parts.netloc not in self.allow_s3_buckets:
                raise UrlRejected(SSRF_BLOCKED, f"bucket {short(parts.netloc, 80)!r} is not in "
                                  "crawl.allow_s3_buckets: s3:// image URLs are read with the pipeline's credentials")
            return
        host = parts.hostname
        if not host:
            raise UrlRejected(BAD_URL, f"URL has no host: {short(url)!r}")
        literal = ip_literal(host)
        if literal is not None:  # an early, clear refusal; names are checked by the connection
            try:
                self.addresses.check_address(str(literal), str(literal))
            except AddressRefused as exc:
                raise UrlRejected(exc.reason, exc.detail) from None
