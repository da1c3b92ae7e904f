"""The crawler's network layer against a real, misbehaving HTTP server on 127.0.0.1."""
import threading
import time

import pytest

from conftest import make_noise_png, make_png
from pipelines.config import CrawlSettings
from pipelines.crawl.fetch import Fetcher
from pipelines.crawl.url_safety import UrlPolicy


def fetcher(**kw):
    settings = CrawlSettings(**{"allow_private_hosts": True, "retries": 2, "backoff_s": 0.01, "connect_timeout_s": 1,
                                "read_timeout_s": 1, "total_timeout_s": 2, **kw})
    return Fetcher(settings)


def test_ok_with_validators(fault_server):
    data = make_png()
    url = fault_server.put("a.png", data)
    result = fetcher().fetch(url)
    assert result.outcome == "ok" and result.data == data and result.http_status == 200
    assert result.etag and result.last_modified


def test_conditional_request_gets_not_modified(fault_server):
    url = fault_server.put("a.png", make_png())
    first = fetcher().fetch(url)
    again = fetcher().fetch(url, etag=first.etag, last_modified=first.last_modified)
    assert again.outcome == "not_modified" and again.data is None
    assert fault_server.log[-1] == ("/img/a.png", 304, True)


@pytest.mark.parametrize("path, reason", [("status/404", "http_404"), ("status/410", "http_410"),
                                          ("status/403", "http_403")])
def test_client_errors_are_final_without_retry(fault_server, path, reason):
    result = fetcher().fetch(fault_server.url(path))
    assert (result.outcome, result.reason) == ("failed", reason)
    assert len(fault_server.requests_to("/" + path)) == 1


def test_server_errors_are_retried_then_reported(fault_server):
    result = fetcher().fetch(fault_server.url("status/500"))
    assert (result.outcome, result.reason) == ("failed", "http_500")
    assert len(fault_server.requests_to("/status/500")) == 3  # first try + 2 retries
    assert "after 3 attempts" in result.detail


def test_flaky_server_recovers_within_retries(fault_server):
    data = make_png()
    fault_server.put("f.png", data)
    result = fetcher().fetch(fault_server.url("flaky/f.png/2"))
    assert result.outcome == "ok" and result.data == data


def test_trickling_server_hits_total_deadline(fault_server):
    fault_server.put("big.png", make_png(size=(300, 300), pattern=5))
    started = time.monotonic()
    result = fetcher(retries=0).fetch(fault_server.url("slow/big.png"))
    assert (result.outcome, result.reason) == ("failed", "timeout")
    assert time.monotonic() - started < 6


def test_silent_server_times_out(fault_server):
    result = fetcher(retries=0).fetch(fault_server.url("hang"))
    assert (result.outcome, result.reason) == ("failed", "timeout")


def test_connection_refused(fault_server):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = fetcher().fetch(f"http://127.0.0.1:{port}/x.png")
    assert (result.outcome, result.reason) == ("failed", "connection_error")


def test_size_caps(fault_server):
    assert fetcher().fetch(fault_server.url("huge")).reason == "too_large"
    url = fault_server.put("p.png", make_noise_png())
    assert fetcher(max_bytes=1000).fetch(url).reason == "too_large"


def test_body_shorter_than_declared_is_truncated(fault_server):
    fault_server.put("t.png", make_png(size=(200, 200), pattern=1))
    result = fetcher(retries=0).fetch(fault_server.url("lying-length/t.png"))
    assert result.outcome == "failed" and result.reason in ("truncated", "connection_error")


def test_redirects_followed_and_loops_stopped(fault_server):
    data = make_png()
    target = fault_server.put("r.png", data)
    result = fetcher().fetch(fault_server.url(f"redirect?to={target}"))
    assert result.outcome == "ok" and result.data == data and result.final_url == target
    assert fetcher().fetch(fault_server.url("redirect-loop")).reason == "too_many_redirects"


def test_ssrf_refused_without_allowance_and_nothing_is_sent(fault_server):
    url = fault_server.put("s.png", make_png())
    result = Fetcher(CrawlSettings()).fetch(url)
    assert (result.outcome, result.reason) == ("failed", "ssrf_blocked")
    assert fault_server.log == []


def test_ssrf_checked_again_after_redirect(fault_server):
    # 127.0.0.1 is allowed as the entry point; the redirect goes to another loopback
    # address that is not, and to the cloud metadata address: both are refused before
    # any request is sent there.
    allowed = UrlPolicy(allow_networks=["127.0.0.1/32"])
    f = Fetcher(CrawlSettings(), policy=allowed)
    port = fault_server.httpd.server_address[1]
    for target in (f"http://127.0.0.2:{port}/img/x.png", "http://169.254.169.254/latest/meta-data/"):
        result = f.fetch(fault_server.url(f"redirect?to={target}"))
        assert (result.outcome, result.reason) == ("failed", "ssrf_blocked"), target
    assert [p for p, _, _ in fault_server.log] == ["/redirect", "/redirect"]


def test_per_host_concurrency_cap(fault_server):
    fault_server.delay_s = 0.2
    urls = [fault_server.put(f"c{i}.png", make_png(pattern=i)) for i in range(12)]
    f = fetcher(per_host_concurrency=3, concurrency=12)
    threads = [threading.Thread(target=f.fetch, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fault_server.max_concurrency == 3


def test_user_agent_is_sent(fault_server):
    seen = {}
    original = fault_server.httpd.RequestHandlerClass._image

    def spy(handler, name):
        seen["ua"] = handler.headers.get("User-Agent")
        return original(handler, name)

    fault_server.httpd.RequestHandlerClass._image = spy
    url = fault_server.put("u.png", make_png())
    fetcher(user_agent="catalog-index-test/1.0").fetch(url)
    assert seen["ua"] == "catalog-index-test/1.0"
