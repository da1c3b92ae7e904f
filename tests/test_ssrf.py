"""SSRF: whatever a URL looks like, the crawler never connects to an address the policy forbids.

The policy here allows 127.0.0.1 only (`allow_networks`); 127.0.0.2 plays the forbidden
internal service, with a real listener that counts every connection it accepts. Each
bypass form is fetched for real and judged by what the connection reached, not by what
the guard thought of the URL. A jail around socket.connect and getaddrinfo records any
connection outside 127.0.0.0/8 and any name lookup (nothing here may send a DNS query):
names resolve through a stub resolver only.
"""
import errno
import ipaddress
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from conftest import make_png
from fault_server import FaultServer
from pipelines.config import CrawlSettings
from pipelines.crawl.fetch import Fetcher
from pipelines.crawl.url_safety import UrlPolicy

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
NAMES = {"allowed.test": ["127.0.0.1"], "inside.test": ["127.0.0.2"], "localhost": ["127.0.0.2"],
         "mixed.test": ["127.0.0.1", "127.0.0.2"]}
REFUSED = {"ssrf_blocked", "bad_url", "bad_redirect", "dns_error"}


def stub_resolver(host: str) -> list[str]:
    host = host.lower().rstrip(".")
    if host in NAMES:
        return NAMES[host]
    infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)  # numeric spellings
    return list(dict.fromkeys(info[4][0] for info in infos))


@pytest.fixture(autouse=True)
def jail(monkeypatch):
    """Record (and refuse) any connection outside 127.0.0.0/8 and any non-numeric lookup."""
    violations = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        try:
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
        except (ValueError, TypeError, IndexError):
            ip = None
        if ip is None or ip.version != 4 or ip not in LOOPBACK:
            violations.append(("connect", address))
            raise OSError(errno.EACCES, f"test jail: no connections to {address!r}")
        return real_connect(sock, address)

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        try:
            return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            if host not in (None, ""):
                violations.append(("lookup", host))
            raise

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield violations
    assert violations == [], "traffic outside 127.0.0.0/8 or a DNS lookup was attempted"


@pytest.fixture(scope="module")
def servers():
    allowed = FaultServer("127.0.0.1").start()
    try:
        inside = FaultServer("127.0.0.2", allowed.port).start()
    except OSError:
        allowed.stop()
        pytest.skip("cannot listen on 127.0.0.2")
    allowed.put("a.png", make_png())
    inside.put("a.png", make_png(pattern=3))
    yield allowed, inside
    allowed.stop()
    inside.stop()


@pytest.fixture(scope="module")
def crawler():
    policy = UrlPolicy(allow_networks=["127.0.0.1/32"], resolver=stub_resolver)
    f = Fetcher(CrawlSettings(retries=0, connect_timeout_s=1, read_timeout_s=1, total_timeout_s=2), policy=policy)
    yield f
    f.close()


def bypass_forms(port: int) -> list[str]:
    """Ways to spell "connect to 127.0.0.2 (forbidden)" that parsers have been known to disagree on."""
    p = port
    to_inside = f"http://127.0.0.2:{p}/img/a.png"
    return [
        to_inside,                                          # plain
        f"http://2130706434:{p}/img/a.png",                 # decimal
        f"http://0x7f000002:{p}/img/a.png",                 # hex
        f"http://0X7F000002:{p}/img/a.png",                 # hex, upper case
        f"http://0177.0.0.2:{p}/img/a.png",                 # octal first part
        f"http://017700000002:{p}/img/a.png",               # octal whole
        f"http://0x7f.0.0.2:{p}/img/a.png",                 # mixed hex
        f"http://127.2:{p}/img/a.png",                      # short form a.b
        f"http://127.0.2:{p}/img/a.png",                    # short form a.b.c
        f"http://[::ffff:127.0.0.2]:{p}/img/a.png",         # IPv4-mapped IPv6
        f"http://[::ffff:7f00:2]:{p}/img/a.png",            # IPv4-mapped, hex
        f"http://[0:0:0:0:0:ffff:127.0.0.2]:{p}/img/a.png", # IPv4-mapped, long form
        f"http://[::127.0.0.2]:{p}/img/a.png",              # IPv4-compatible IPv6
        f"http://[64:ff9b::127.0.0.2]:{p}/img/a.png",       # NAT64
        f"http://0.0.0.0:{p}/img/a.png",                    # unspecified: reaches the host itself
        f"http://0:{p}/img/a.png",                          # unspecified, short
        f"http://[::]:{p}/img/a.png",                       # IPv6 unspecified
        f"http://[::1]:{p}/img/a.png",                      # IPv6 loopback
        f"http://localhost:{p}/img/a.png",                  # a name for it
        f"http://localhost.:{p}/img/a.png",                 # trailing dot
        f"http://LOCALHOST:{p}/img/a.png",                  # case
        f"http://inside.test.:{p}/img/a.png",               # a name, trailing dot
        f"http://mixed.test:{p}/img/a.png",                 # one allowed answer, one forbidden
        f"http://127.0.0.2\\@allowed.test:{p}/img/a.png",   # backslash before userinfo (urlsplit: allowed.test)
        f"http://allowed.test\\@127.0.0.2:{p}/img/a.png",   # the other way round
        f"http://allowed.test@127.0.0.2:{p}/img/a.png",     # userinfo
        f"http://allowed.test:{p}@127.0.0.2:{p}/img/a.png", # userinfo with a port-like password
        f"http://127.0.0.2:{p}#@allowed.test/img/a.png",    # fragment before userinfo
        f"http://127.0.0.2:{p}?@allowed.test/img/a.png",    # query before userinfo
        f"http://%31%32%37.0.0.2:{p}/img/a.png",            # percent-encoded host
        f"http://127.0.0.2%2f@allowed.test:{p}/img/a.png",  # percent-encoded slash
        f"http://127\u30020\u30020\u30022:{p}/img/a.png",   # ideographic full stops (IDNA maps them to '.')
        f"http://\u2460\u2461\u2466.0.0.2:{p}/img/a.png",   # enclosed digits (NFKC: 127)
        f"http://127.0.0.2\t:{p}/img/a.png",                # tab in the host
        f"http://127.0.0.2 :{p}/img/a.png",                 # space in the host
        f"http://127.0.0.2\r\nHost: allowed.test:{p}/",     # header injection
        f"http:\\\\127.0.0.2:{p}/img/a.png",                # backslashes for slashes
        f"http:/\\127.0.0.2:{p}/img/a.png",                 # mixed slashes
        f"HTTP://127.0.0.2:{p}/img/a.png",                  # scheme case
        f"http://allowed.test:{p}/redirect?to={to_inside}",                            # redirect hop
        f"http://allowed.test:{p}/redirect?to=http://2130706434:{p}/img/a.png",        # redirect, decimal
        f"http://allowed.test:{p}/redirect?to=http://localhost.:{p}/img/a.png",        # redirect, name
        f"http://allowed.test:{p}/redirect?to=//127.0.0.2:{p}/img/a.png",              # scheme-relative
        f"http://allowed.test:{p}/redirect?to=http://allowed.test%5C@127.0.0.2:{p}/",  # redirect, backslash
        "http://169.254.169.254/latest/meta-data/",         # cloud metadata
        "http://0251.0376.0251.0376/latest/meta-data/",     # metadata, octal
        "http://2852039166/latest/meta-data/",              # metadata, decimal
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",         # AWS IPv6 metadata
        "http://100.100.100.200/latest/meta-data/",         # Alibaba metadata
        "http://10.0.0.1/", "http://192.168.0.1/", "http://172.16.0.1/", "http://100.64.0.1/",
    ]


def test_no_bypass_form_reaches_a_forbidden_address(servers, crawler):
    allowed, inside = servers
    forms = bypass_forms(allowed.port)
    assert len(forms) >= 30
    outcomes = {url: crawler.fetch(url) for url in forms}
    assert inside.connections == 0, "a forbidden address was reached"
    for url, result in outcomes.items():
        assert result.outcome == "failed" and result.reason in REFUSED, (url, result)
        assert len(result.detail) < 600


def test_what_the_connection_reaches_decides_not_the_spelling(servers, crawler):
    # Spellings of the allowed address are fetched: the check is on the address reached.
    allowed, inside = servers
    p = allowed.port
    for url in (f"http://127.0.0.1:{p}/img/a.png", f"http://2130706433:{p}/img/a.png",
                f"http://0x7f000001:{p}/img/a.png", f"http://127.1:{p}/img/a.png",
                f"http://allowed.test:{p}/img/a.png", f"http://ALLOWED.test.:{p}/img/a.png",
                f"http://allowed.test:{p}/redirect?to=http://127.0.0.1:{p}/img/a.png"):
        result = crawler.fetch(url)
        assert result.outcome == "ok" and result.data == allowed.files["a.png"], (url, result)
    assert inside.connections == 0


def test_dns_rebinding_cannot_switch_the_address_after_the_check(servers):
    """A name answers an allowed address, then a forbidden one. One lookup per connection,
    made by the connection itself: the address checked is the address connected to."""
    allowed, inside = servers
    answers, calls = [["127.0.0.1"], ["127.0.0.2"]] * 3, []

    def rebinding(host: str) -> list[str]:
        calls.append(host)
        return answers[len(calls) - 1]

    policy = UrlPolicy(allow_networks=["127.0.0.1/32"], resolver=rebinding)
    url = f"http://rebind.test:{allowed.port}/img/a.png"
    for expected in ("ok", "ssrf_blocked", "ok", "ssrf_blocked"):
        f = Fetcher(CrawlSettings(retries=0, total_timeout_s=2), policy=policy)  # a new pool: a new connection
        result = f.fetch(url)
        f.close()
        assert (result.reason or result.outcome) == expected
    assert len(calls) == 4  # exactly one lookup per fetch: no check-then-connect gap
    assert inside.connections == 0


def test_redirect_chain_through_allowed_hops_to_a_forbidden_one(servers, crawler):
    allowed, inside = servers
    p = allowed.port
    hop2 = f"http://allowed.test:{p}/redirect?to=http://localhost:{p}/img/a.png"
    before = allowed.received("/redirect")
    result = crawler.fetch(f"http://127.0.0.1:{p}/redirect?to={hop2.replace('?', '%3F').replace('=', '%3D')}")
    assert (result.outcome, result.reason) == ("failed", "ssrf_blocked")
    assert allowed.received("/redirect") - before == 2  # both allowed hops were followed
    assert inside.connections == 0


def test_metadata_addresses_stay_refused_with_private_hosts_allowed(servers):
    f = Fetcher(CrawlSettings(allow_private_hosts=True, retries=0),
                policy=UrlPolicy(allow_private_hosts=True, resolver=stub_resolver))
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://2852039166/"):
        assert f.fetch(url).reason == "ssrf_blocked", url


def test_s3_and_file_urls_need_an_allowance():
    f = Fetcher(CrawlSettings(retries=0), policy=UrlPolicy(resolver=stub_resolver))
    assert f.fetch("s3://pipeline-secrets/credentials.csv").reason == "ssrf_blocked"
    assert f.fetch("file:///etc/passwd").reason == "ssrf_blocked"


# -- property: for any generated URL, the connection goes only where the policy allows ----

def _ipv4_spellings(last: int) -> st.SearchStrategy[str]:
    value = (127 << 24) | last
    return st.sampled_from([
        f"127.0.0.{last}", str(value), hex(value), hex(value).upper().replace("X", "x"), f"0{value:o}",
        f"0177.0.0.{last}", f"0x7f.0.0.{last}", f"127.{last}", f"127.0.{last}", f"0x7f.{last}",
        f"[::ffff:127.0.0.{last}]", f"[::ffff:7f00:{last:x}]", f"[::127.0.0.{last}]",
        f"127.000.000.{last:03d}", f"127.0.0.{last}.",
    ])


_junk = st.sampled_from(["", "\\", "@", "%2e", "%40", "#", "?", " ", "\t", ".", "\u3002", ":", "//", "\\@", "%00"])
_names = st.sampled_from(sorted(NAMES) + [n.upper() + "." for n in NAMES])


@st.composite
def generated_urls(draw, port: int) -> str:
    target = draw(st.one_of(_ipv4_spellings(1), _ipv4_spellings(2), _names))
    decoy = draw(st.one_of(st.just(""), _ipv4_spellings(1), _names))
    userinfo = draw(st.sampled_from(["", f"{decoy}@", f"{decoy}{draw(_junk)}@", "user:pw@"])) if decoy else ""
    host = f"{draw(_junk)}{target}{draw(_junk)}" if draw(st.booleans()) else target
    port_part = draw(st.sampled_from([f":{port}", f":{port}{draw(_junk)}", ""]))
    path = draw(st.sampled_from(["/img/a.png", f"{draw(_junk)}/img/a.png", "/redirect?to=http://127.0.0.2:{port}/"]))
    scheme = draw(st.sampled_from(["http", "HTTP", "https"]))
    slashes = draw(st.sampled_from(["//", "\\\\", "/\\"]))
    return f"{scheme}:{slashes}{userinfo}{host}{port_part}{path.replace('{port}', str(port))}"


EXAMPLES = int(os.environ.get("CATALOG_INDEX_SSRF_EXAMPLES", "150"))  # `make chaos` may raise it


def test_property_the_connection_never_reaches_a_forbidden_address(servers, crawler):
    allowed, inside = servers

    @hsettings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))
    @given(generated_urls(allowed.port))
    def check(url):
        before = allowed.connections
        result = crawler.fetch(url)
        assert inside.connections == 0, url
        assert result.reason != "internal_error", (url, result)
        if result.outcome == "ok":  # it was fetched: from the allowed listener, nowhere else
            assert allowed.connections >= before and result.data == allowed.files["a.png"], url

    check()
