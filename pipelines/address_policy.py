"""Which network addresses outside input may make catalog-index connect to: the SSRF policy.

Pure rules on IP literals and resolver answers, no I/O of its own beyond the resolver it
is given. pipelines.guarded_http applies them to the address every connection reaches;
pipelines.crawl.url_safety uses them for early refusals of IP-literal URLs.

Refused by default: loopback, private, link-local, CGNAT, multicast, reserved and
unspecified addresses and cloud metadata endpoints, also when embedded in an IPv6 address
(IPv4-mapped, IPv4-compatible, 6to4, NAT64).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable

from schemas.reasons import SSRF_BLOCKED


class AddressRefused(Exception):
    """The policy refuses an address; `reason` is always ssrf_blocked.

    Not an OSError: raised inside urllib3 (by a connection), it must pass through
    urllib3's own error handling unchanged."""

    reason = SSRF_BLOCKED

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


# Metadata endpoints that the range checks below do not all cover, on every cloud.
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),   # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),     # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),   # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),     # AWS IPv6 IMDS
})

Resolver = Callable[[str], list[str]]


def address_block_reason(address: str) -> str | None:
    """Why an IP literal must not be connected to, or None when it is a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and int(ip) >> 32 == 0 and int(ip) > 1:
            embedded = ipaddress.IPv4Address(int(ip))  # IPv4-compatible (::a.b.c.d, deprecated)
        if embedded is None and ip in ipaddress.ip_network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # NAT64 reaches the IPv4 address inside
        if embedded is not None:
            return address_block_reason(str(embedded))
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
    """The system resolver's addresses for `host`, in its order of preference."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


@dataclass
class AddressPolicy:
    """Which addresses a connection may reach.

    Refused by default: loopback, private, link-local, CGNAT, multicast, reserved and
    unspecified addresses and cloud metadata endpoints. `allow_private_hosts` lifts all of
    that except the metadata endpoints; `allow_networks` (CIDRs) lifts it for those networks
    (name a metadata address there to reach it, which nobody should)."""

    allow_private_hosts: bool = False
    allow_networks: list[str] = field(default_factory=list)
    resolver: Resolver = resolve_host

    def __post_init__(self):
        self._networks = [ipaddress.ip_network(n, strict=False) for n in self.allow_networks]

    def refusal(self, address: str) -> str | None:
        """Why `address` (an IP literal) may not be connected to, or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in net for net in self._networks):
            return None
        why = address_block_reason(str(ip))
        if why is None or (self.allow_private_hosts and why != "cloud metadata address"):
            return None
        return why

    def checked_addresses(self, host: str) -> list[str]:
        """Resolve `host` (once) and return its addresses, or raise AddressRefused
        when any of them is refused: a name that also points inside is not trusted at all."""
        literal = ip_literal(host)
        addresses = [str(literal)] if literal is not None else self.resolver(host)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"no address for {host}")
        for address in addresses:
            self.check_address(address, host)
        return addresses

    def check_address(self, address: str, host: str) -> None:
        """Raise AddressRefused when `address` (that `host` stands for) is refused."""
        why = self.refusal(address)
        if why:
            name = host if host.strip("[]") == address else f"{host} resolves to {address}, which is"
            hint = ("name it in crawl.allow_networks to allow it" if why == "cloud metadata address" else
                    "pass --allow-private-hosts or add its network to crawl.allow_networks to allow it")
            if len(name) > 120:
                name = name[:120] + "…"
            raise AddressRefused(f"{name} {'an' if why[0] in 'aeiou' else 'a'} {why}; {hint}")


ALLOW_ALL = AddressPolicy(allow_private_hosts=True, allow_networks=["0.0.0.0/0", "::/0"])


