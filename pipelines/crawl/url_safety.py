"""SSRF guard for the crawler: which URLs may be fetched at all.

A catalog feed is untrusted input. By default the crawler refuses any URL whose host is,
or resolves to, a loopback, private, link-local (cloud metadata lives there), CGNAT,
multicast, reserved or unspecified address, and it re-checks every redirect hop. The
address classification is a pure function on IP literals so that it can be tested
without sending traffic anywhere.

Known gap: the check resolves the name, then the HTTP client resolves it again to
connect; a DNS server that answers differently the second time (DNS rebinding) is not
stopped here. Network egress rules remain the real boundary.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

# Metadata endpoints that are not covered by the range checks below on every cloud.
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),   # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),     # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),   # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),     # AWS IPv6 IMDS
})

Resolver = Callable[[str], list[str]]


class UrlRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def address_block_reason(address: str) -> str | None:
    """Why an IP literal must not be fetched, or None when it is a public address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_block_reason(str(mapped))
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_private:
        return "private address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_reserved:
        return "reserved address"
    if not ip.is_global:
        return "non-public address"
    return None


def resolve_host(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


@dataclass
class UrlPolicy:
    allow_private_hosts: bool = False
    allow_networks: list[str] = field(default_factory=list)
    resolver: Resolver = resolve_host

    def __post_init__(self):
        self._networks = [ipaddress.ip_network(n, strict=False) for n in self.allow_networks]

    def check(self, url: str) -> None:
        """Raise UrlRejected(bad_url | ssrf_blocked | dns_error) when `url` may not be fetched."""
        try:
            parts = urlsplit(url)
            parts.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise UrlRejected("bad_url", f"malformed URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme == "file":
            if not self.allow_private_hosts:
                raise UrlRejected("ssrf_blocked", "file:// URLs read the crawler's own disk; "
                                  "allowed only with --allow-private-hosts")
            return
        if scheme == "s3":
            if not parts.netloc:
                raise UrlRejected("bad_url", f"S3 URL without a bucket: {url!r}")
            return
        if scheme not in ("http", "https"):
            raise UrlRejected("bad_url", f"unsupported URL scheme {parts.scheme!r} in {url!r}")
        host = parts.hostname
        if not host:
            raise UrlRejected("bad_url", f"URL has no host: {url!r}")
        if self.allow_private_hosts:
            return
        try:
            addresses = [host] if _is_ip_literal(host) else self.resolver(host)
        except (socket.gaierror, UnicodeError) as exc:
            raise UrlRejected("dns_error", f"cannot resolve host {host!r}: {exc}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if any(ip in net for net in self._networks):
                continue
            why = address_block_reason(str(ip))
            if why:
                raise UrlRejected("ssrf_blocked", f"{host} resolves to {address}, a {why}; pass "
                                  "--allow-private-hosts or add its network to crawl.allow_networks to allow it")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False
