"""SSRF guard: the address classification on IP literals, and the policy on URLs."""
import pytest

from pipelines.crawl.url_safety import UrlPolicy, UrlRejected, address_block_reason


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.169.254", "cloud metadata"), ("169.254.170.2", "cloud metadata"), ("100.100.100.200", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "non-public"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
])
def test_non_public_addresses_are_blocked(address, why):
    reason = address_block_reason(address)
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "151.101.1.69"])
def test_public_addresses_pass(address):
    assert address_block_reason(address) is None


def _policy(mapping, **kw):
    return UrlPolicy(resolver=lambda host: mapping[host], **kw)


def test_names_are_resolved_before_the_check():
    policy = _policy({"cdn.example": ["93.184.216.34"], "evil.example": ["93.184.216.34", "10.0.0.5"]})
    policy.check("https://cdn.example/a.jpg")
    with pytest.raises(UrlRejected) as exc:
        policy.check("https://evil.example/a.jpg")  # any private answer blocks the name
    assert exc.value.reason == "ssrf_blocked" and "10.0.0.5" in exc.value.detail


def test_allow_networks_and_allow_private_hosts():
    _policy({"cdn.internal": ["10.1.2.3"]}, allow_networks=["10.0.0.0/8"]).check("http://cdn.internal/x.png")
    UrlPolicy(allow_private_hosts=True).check("http://127.0.0.1:1/x.png")
    UrlPolicy(allow_private_hosts=True).check("file:///tmp/x.png")
    with pytest.raises(UrlRejected) as exc:
        UrlPolicy().check("file:///etc/passwd")
    assert exc.value.reason == "ssrf_blocked"


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "http://", "http://exa mple.com:99999/x",
                                 "javascript:alert(1)", "not a url", "http://[::1/x"])
def test_malformed_urls_are_bad_url(url):
    with pytest.raises(UrlRejected) as exc:
        UrlPolicy().check(url)
    assert exc.value.reason == "bad_url"


def test_unresolvable_name_is_dns_error():
    import socket

    def fail(host):
        raise socket.gaierror("Name or service not known")

    with pytest.raises(UrlRejected) as exc:
        UrlPolicy(resolver=fail).check("https://no-such-host.invalid/a.png")
    assert exc.value.reason == "dns_error"
