"""The crawler's network layer against real, misbehaving HTTP(S) servers on 127.0.0.1.

Every hostile server gets its outcome as a reason code, and the time it may cost is
checked against the documented bound: (retries + 1) * total_timeout_s + retries * max_backoff_s.
"""
import datetime
import socket
import threading
import time

import pytest

from conftest import make_noise_png, make_png
from fault_server import FaultServer
from pipelines.config import CrawlSettings
from pipelines.crawl import fetch as fetch_module
from pipelines.crawl.fetch import Fetcher, parse_retry_after
from pipelines.crawl.url_safety import UrlPolicy

MARGIN_S = 1.5  # scheduling noise on a shared 2-core machine; the bounds checked are seconds apart


def settings(**kw) -> CrawlSettings:
    return CrawlSettings(**{"allow_private_hosts": True, "retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.1,
                            "connect_timeout_s": 1, "read_timeout_s": 1, "total_timeout_s": 2, **kw})


def fetcher(**kw) -> Fetcher:
    return Fetcher(settings(**kw))


def timed(f: Fetcher, url: str):
    started = time.monotonic()
    result = f.fetch(url)
    return result, time.monotonic() - started


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- ordinary behaviour ---------------------------------------------------------------

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
    assert fault_server.received("/" + path) == 1


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


def test_connection_refused(fault_server):
    result = fetcher().fetch(f"http://127.0.0.1:{closed_port()}/x.png")
    assert (result.outcome, result.reason) == ("failed", "connection_error")


def test_size_caps(fault_server):
    assert fetcher().fetch(fault_server.url("huge")).reason == "too_large"
    url = fault_server.put("p.png", make_noise_png())
    assert fetcher(max_bytes=1000).fetch(url).reason == "too_large"


def test_body_shorter_than_declared_is_truncated(fault_server):
    fault_server.put("t.png", make_png(size=(200, 200), pattern=1))
    result = fetcher(retries=0).fetch(fault_server.url("lying-length/t.png"))
    assert (result.outcome, result.reason) == ("failed", "truncated")


def test_redirects_followed_and_loops_stopped(fault_server):
    data = make_png()
    target = fault_server.put("r.png", data)
    result = fetcher().fetch(fault_server.url(f"redirect?to={target}"))
    assert result.outcome == "ok" and result.data == data and result.final_url == target
    assert fetcher().fetch(fault_server.url("redirect-loop")).reason == "too_many_redirects"


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


# -- the deadline: no server holds a fetch longer than the bound ------------------------

@pytest.mark.parametrize("path", ["trickle-body", "trickle-headers", "hang"])
def test_deadline_bounds_a_server_that_never_finishes(fault_server, path):
    # One byte every 0.2 s never lets the 1 s read timeout fire: only the deadline stops it.
    s = settings(total_timeout_s=1.5, read_timeout_s=1 if path != "hang" else 5)
    result, elapsed = timed(Fetcher(s), fault_server.url(path))
    assert (result.outcome, result.reason) == ("failed", "timeout"), result
    assert elapsed <= s.total_timeout_s + MARGIN_S  # not retried: timeouts are final by default
    assert fault_server.received("/" + path) == 1


def test_deadline_bounds_a_slow_name_lookup():
    def slow_dns(host):
        time.sleep(4)
        return ["127.0.0.1"]

    s = settings(total_timeout_s=1.0)
    f = Fetcher(s, policy=UrlPolicy(allow_private_hosts=True, resolver=slow_dns))
    result, elapsed = timed(f, "http://slow-dns.test/a.png")
    assert (result.outcome, result.reason) == ("failed", "timeout") and "resolving" in result.detail
    assert elapsed <= s.total_timeout_s + MARGIN_S


def _fetch_in_child(url, queue):
    started = time.monotonic()
    result = Fetcher(settings(total_timeout_s=1.0)).fetch(url)
    queue.put((result.reason, time.monotonic() - started))


def test_deadline_holds_in_a_forked_worker(fault_server):
    # Spark forks Python workers: the watchdog thread of the parent does not exist in the child.
    import multiprocessing

    assert fetcher().fetch(fault_server.put("a.png", make_png())).outcome == "ok"  # parent's watchdog runs
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_fetch_in_child, args=(fault_server.url("trickle-body"), queue))
    child.start()
    reason, elapsed = queue.get(timeout=30)
    child.join(10)
    assert reason == "timeout" and elapsed <= 1.0 + MARGIN_S


def test_retried_timeouts_stay_within_the_documented_bound(fault_server):
    s = settings(total_timeout_s=1.0, retries=2, retry_timeouts=True)
    result, elapsed = timed(Fetcher(s), fault_server.url("trickle-body"))
    assert (result.outcome, result.reason) == ("failed", "timeout")
    assert fault_server.received("/trickle-body") == 3
    assert 3 * s.total_timeout_s - 0.1 <= elapsed <= s.worst_case_s + MARGIN_S
    assert "after 3 attempts" in result.detail


def test_deadline_covers_the_whole_redirect_chain(fault_server):
    s = settings(total_timeout_s=1.5)
    result, elapsed = timed(Fetcher(s), fault_server.url(f"redirect?to={fault_server.url('trickle-body')}"))
    assert result.reason == "timeout" and elapsed <= s.total_timeout_s + MARGIN_S


def test_many_trickling_fetches_at_once_are_each_bounded(fault_server):
    s = settings(total_timeout_s=1.5, concurrency=8, per_host_concurrency=8)
    f = Fetcher(s)
    results, started = [], time.monotonic()
    threads = [threading.Thread(target=lambda: results.append(f.fetch(fault_server.url("trickle-body"))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.reason for r in results] == ["timeout"] * 8
    assert time.monotonic() - started <= s.total_timeout_s + MARGIN_S


# -- hostile responses become reason codes ---------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_content_encoded_images_are_decoded(fault_server, encoding):
    data = make_noise_png(size=(64, 64))  # larger than its gzip: the wire length differs from the image's
    fault_server.put("z.png", data)
    result = fetcher().fetch(fault_server.url(f"{encoding}/z.png"))
    assert result.outcome == "ok" and result.data == data


def test_decoded_size_is_capped_as_it_streams(fault_server):
    # 64 MB of zeros, ~64 KB on the wire: the cap applies to decoded bytes, before they pile up.
    result = fetcher(max_bytes=1_000_000).fetch(fault_server.url("gzip-bomb/64"))
    assert (result.outcome, result.reason) == ("failed", "too_large")
    assert "decoded" in result.detail


@pytest.mark.parametrize("path, reason", [
    ("bad-gzip", "bad_encoding"),
    ("redirect?to=http://[oops/x", "bad_redirect"),
    ("redirect?to=file:///etc/passwd", "bad_redirect"),
    ("redirect?to=s3://bucket/key", "bad_redirect"),
    ("redirect-no-location", "bad_redirect"),
    ("many-headers", "bad_response"),
    ("not-http", "bad_response"),
])
def test_malformed_responses_are_reason_codes(fault_server, path, reason):
    result = fetcher(retries=0).fetch(fault_server.url(path))
    assert (result.outcome, result.reason) == ("failed", reason), result
    assert result.detail


def test_server_closing_without_answer_is_retried_as_connection_error(fault_server):
    result = fetcher(retries=1).fetch(fault_server.url("close-early"))
    assert (result.outcome, result.reason) == ("failed", "connection_error")
    assert fault_server.received("/close-early") == 2


def test_retry_after_is_honoured(fault_server):
    data = make_png()
    fault_server.put("b.png", data)
    result, elapsed = timed(fetcher(retries=2, max_backoff_s=5), fault_server.url("busy/1/1/b.png"))
    assert result.outcome == "ok" and result.data == data
    assert elapsed >= 1.0


def test_retry_after_beyond_the_bound_is_not_waited_for(fault_server):
    fault_server.put("b.png", make_png())
    result, elapsed = timed(fetcher(retries=3, max_backoff_s=2), fault_server.url("busy/3600/9/b.png"))
    assert (result.outcome, result.reason) == ("failed", "http_503")
    assert "3600" in result.detail and elapsed < 2
    assert len(fault_server.requests_to("/busy")) == 1


def test_parse_retry_after():
    assert parse_retry_after("120") == 120
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)).strftime(
        "%a, %d %b %Y %H:%M:%S GMT")
    assert 25 <= parse_retry_after(soon) <= 31
    assert parse_retry_after("soon") is None and parse_retry_after("") is None


def test_a_ten_megabyte_url_is_refused_before_anything_is_sent(fault_server):
    url = fault_server.url("img/a.png?" + "a" * 10_000_000)
    result = fetcher().fetch(url)
    assert (result.outcome, result.reason) == ("failed", "bad_url")
    assert len(result.detail) < 300 and "10,000," in result.detail
    assert fault_server.log == []


def test_a_bug_is_a_reason_code_not_an_exception(fault_server, monkeypatch):
    # Fault injection: whatever goes wrong inside, fetch() answers with a reason code.
    def broken(*args, **kwargs):
        raise KeyError("something nobody expected")

    monkeypatch.setattr(fetch_module, "read_body", broken)
    result = fetcher().fetch(fault_server.put("a.png", make_png()))
    assert (result.outcome, result.reason) == ("failed", "internal_error")
    assert "KeyError" in result.detail


# -- the environment is not trusted; a configured proxy is used ------------------------

def test_proxy_environment_and_netrc_are_ignored(fault_server, monkeypatch, tmp_path):
    dead_proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.setenv("NO_PROXY", "")
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    seen = {}
    original = fault_server.httpd.RequestHandlerClass._image

    def spy(handler, name):
        seen["authorization"] = handler.headers.get("Authorization")
        return original(handler, name)

    fault_server.httpd.RequestHandlerClass._image = spy
    result = fetcher().fetch(fault_server.put("a.png", make_png()))
    assert result.outcome == "ok"
    assert fault_server.raw_log[-1][0] == "/img/a.png"  # origin-form: sent directly, not to a proxy
    assert seen["authorization"] is None


def test_configured_proxy_is_used_and_resolves_names_itself(fault_server):
    data = make_png()
    fault_server.put("a.png", data)
    # The fault server answers proxy requests (absolute-form) like direct ones. `.test` never
    # resolves: the fetch can only succeed if the name is left to the proxy.
    f = Fetcher(settings(proxy=fault_server.base))
    result = f.fetch("http://images.example.test/img/a.png")
    assert result.outcome == "ok" and result.data == data
    assert fault_server.raw_log[-1] == ("http://images.example.test/img/a.png", "images.example.test")


# -- https ------------------------------------------------------------------------------

@pytest.fixture
def tls_server(tls_files):
    server = FaultServer(tls=tls_files).start()
    yield server
    server.stop()


def test_https_with_a_trusted_ca(tls_server, tls_files):
    data = make_noise_png(size=(40, 40))
    tls_server.put("a.png", data)
    result = fetcher(ca_bundle=tls_files[0]).fetch(tls_server.url("gzip/a.png"))
    assert result.outcome == "ok" and result.data == data


def test_https_trickle_is_bounded_by_the_deadline(tls_server, tls_files):
    s = settings(total_timeout_s=1.5, ca_bundle=tls_files[0])
    result, elapsed = timed(Fetcher(s), tls_server.url("trickle-body"))
    assert result.reason == "timeout" and elapsed <= s.total_timeout_s + MARGIN_S


def test_https_with_an_untrusted_certificate_is_tls_error(tls_server):
    result = fetcher(retries=0).fetch(tls_server.url("img/a.png"))
    assert (result.outcome, result.reason) == ("failed", "tls_error")
    assert tls_server.log == []


def test_https_to_a_refused_address_never_connects(tls_server, tls_files):
    f = Fetcher(CrawlSettings(ca_bundle=tls_files[0]), policy=UrlPolicy(allow_networks=["127.0.0.2/32"]))
    result = f.fetch(tls_server.url("img/a.png"))
    assert (result.outcome, result.reason) == ("failed", "ssrf_blocked")
    assert tls_server.connections == 0

