"""SSRF guard, without traffic: the address classification on IP literals, the address
policy on resolver answers, and the URL policy's early refusals (tests/test_ssrf.py checks
what connections actually reach)."""
import socket

import pytest

from pipelines.config import CrawlSettings
from pipelines.crawl.fetch import Fetcher
from pipelines.crawl.url_safety import UrlPolicy, UrlRejected
from pipelines.address_policy import AddressPolicy, AddressRefused, address_block_reason


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.169.254", "cloud metadata"), ("169.254.170.2", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "non-public"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
    ("::127.0.0.1", "loopback"), ("64:ff9b::a9fe:a9fe", "cloud metadata"), ("fe80::1%eth0", "link-local"),
])
def test_non_public_addresses_are_blocked(address, why):
    reason = address_block_reason(address)
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "151.101.1.69"])
def test_public_addresses_pass(address):
    assert address_block_reason(address) is None


def test_any_forbidden_answer_blocks_the_name():
    answers = {"cdn.example": ["93.184.216.34"], "evil.example": ["93.184.216.34", "10.0.0.5"]}
    policy = AddressPolicy(resolver=answers.__getitem__)
    assert policy.checked_addresses("cdn.example") == ["93.184.216.34"]
    with pytest.raises(AddressRefused) as exc:
        policy.checked_addresses("evil.example")
    assert exc.value.reason == "ssrf_blocked" and "10.0.0.5" in exc.value.detail


def test_allow_networks_and_allow_private_hosts():
    assert AddressPolicy(allow_networks=["10.0.0.0/8"]).refusal("10.1.2.3") is None
    assert AddressPolicy(allow_private_hosts=True).refusal("127.0.0.1") is None
    assert AddressPolicy(allow_private_hosts=True).refusal("169.254.169.254") == "cloud metadata address"
    assert AddressPolicy(allow_networks=["169.254.169.254/32"]).refusal("169.254.169.254") is None
    UrlPolicy(allow_private_hosts=True).check("http://127.0.0.1:1/x.png")
    UrlPolicy(allow_private_hosts=True).check("file:///tmp/x.png")
    with pytest.raises(UrlRejected) as exc:
        UrlPolicy().check("file:///etc/passwd")
    assert exc.value.reason == "ssrf_blocked"


def test_the_url_check_never_resolves_names():
    def no_lookups(host):
        raise AssertionError(f"looked up {host}")

    UrlPolicy(resolver=no_lookups).check("https://images.example.com/a.jpg")


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "http://", "http://exa mple.com:99999/x",
                                 "javascript:alert(1)", "not a url", "http://[::1/x", "http://a.com\\@b.com/",
                                 "http://user:pw@example.com/a.png", "http://exa%6dple.com/", "http://example.com\x00/",
                                 "http://example.com/a\r\nX-Injected: 1", "gopher://example.com/", 12345])
def test_malformed_urls_are_bad_url(url):
    with pytest.raises(UrlRejected) as exc:
        UrlPolicy().check(url)
    assert exc.value.reason == "bad_url"


def test_spaces_in_a_path_are_not_refused():
    UrlPolicy().check("https://images.example.com/My Photos/a b.jpg")


def test_url_length_cap():
    policy = UrlPolicy(max_url_length=100)
    policy.check("https://example.com/" + "a" * 80)
    with pytest.raises(UrlRejected) as exc:
        policy.check("https://example.com/" + "a" * 10_000_000)
    assert exc.value.reason == "bad_url" and len(exc.value.detail) < 300


def test_s3_urls_only_for_allowed_buckets():
    with pytest.raises(UrlRejected) as exc:
        UrlPolicy().check("s3://any-bucket/key.png")
    assert exc.value.reason == "ssrf_blocked" and "allow_s3_buckets" in exc.value.detail
    UrlPolicy(allow_s3_buckets=["product-images"]).check("s3://product-images/a/b.png")
    with pytest.raises(UrlRejected):
        UrlPolicy(allow_s3_buckets=["product-images"]).check("s3://product-images-evil/a.png")


def test_policy_from_settings():
    policy = UrlPolicy.from_settings(CrawlSettings(allow_networks=["10.0.0.0/8"], max_url_length=64,
                                                   allow_s3_buckets=["b"]))
    assert policy.addresses.refusal("10.2.3.4") is None and policy.max_url_length == 64
    policy.check("s3://b/x.png")


def test_unresolvable_name_is_dns_error_and_nothing_is_sent():
    def fail(host):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    f = Fetcher(CrawlSettings(retries=0), policy=UrlPolicy(resolver=fail))
    result = f.fetch("https://no-such-host.invalid/a.png")
    assert (result.outcome, result.reason) == ("failed", "dns_error")
