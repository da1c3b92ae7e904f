"""Guarded HTTP: the one way catalog-index talks HTTP to servers it does not control.

Used by the crawl's Fetcher (pipelines.crawl.fetch) and by storage.read_uri_bytes
(manifests, query images). Three guarantees, each enforced where it cannot be bypassed:

* **The address policy is checked where the connection is made.** A connection resolves
  its host once, checks every answer against an `AddressPolicy`, connects to a checked
  address and checks the socket's peer again, before a byte is sent. URL spellings that
  two parsers read differently, redirect hops and DNS answers that change between lookups
  (rebinding) cannot reach a refused address: there is no earlier lookup to differ from.
* **A wall-clock deadline per attempt** (`Deadline`): name lookup, connect and TLS handshake
  get at most the time left; while the request and the response are on the wire a watchdog thread
  shuts the socket down when the time is up, however slowly the server trickles bytes
  (a per-read timeout only bounds the silence between two reads, not their sum).
* **Bounded bodies** (`read_body`): the byte cap applies to decoded bytes as they stream
  (gzip/deflate/br are decoded by urllib3, whose decoders bound their output per read);
  a body shorter than its Content-Length, counted on the wire, is `truncated`.

Built on urllib3 directly, not on a requests Session: nothing is taken from the
environment (HTTP(S)_PROXY, NO_PROXY, ~/.netrc), no cookies or credentials are carried
from one server to the next, and redirects are never followed without the caller's check.
Every failure is an `HttpFailure` carrying a reason code from schemas.reasons.
"""
from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator
from urllib.parse import urljoin, urlsplit

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager, ProxyManager, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (ConnectTimeoutError, DecodeError, HTTPError, IncompleteRead, LocationParseError,
                                LocationValueError, NameResolutionError, NewConnectionError, ProtocolError,
                                ProxyError, ReadTimeoutError, SSLError)
from urllib3.response import BaseHTTPResponse
from urllib3.util.request import ACCEPT_ENCODING

from pipelines.address_policy import ALLOW_ALL, AddressPolicy, AddressRefused, ip_literal
from schemas.reasons import (BAD_ENCODING, BAD_REDIRECT, BAD_RESPONSE, BAD_URL, CONNECTION_ERROR, DNS_ERROR,
                             REQUEST_ERROR, SSRF_BLOCKED, TIMEOUT, TLS_ERROR, TOO_LARGE, TOO_MANY_REDIRECTS, TRUNCATED,
                             http_status_reason)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024

class HttpFailure(Exception):
    """One attempt at a URL failed; `reason` is a code from schemas.reasons.

    Deliberately not an OSError nor a urllib3 error: raised inside urllib3 (a refused
    address), it must pass through urllib3's own error handling unchanged."""

    def __init__(self, reason: str, detail: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.http_status, self.retry_after = reason, detail, http_status, retry_after


def short(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters: URLs and server messages in details and errors."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


# ---------------------------------------------------------------------------------------
# the deadline and its watchdog
# ---------------------------------------------------------------------------------------

class Deadline:
    """A wall-clock limit for one attempt. Its clock starts when it is made; `with deadline:`
    ends it. While `deadline.active()` is entered, connections opened or reused in that
    thread register their sockets; when the time is up the watchdog marks the deadline
    expired and shuts them down, so a blocked read returns at once (callers then see
    `expired`)."""

    _local = threading.local()

    def __init__(self, seconds: float, on_expire: Callable[[], None] | None = None):
        """`on_expire`: also called when the time is up (on the watchdog thread: keep it short)."""
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self.expired = False
        self._done = False
        self._sockets: list[socket.socket] = []
        self._on_expire = on_expire
        _WATCHDOG.watch(self)

    @classmethod
    def current(cls) -> Deadline | None:
        stack = getattr(cls._local, "stack", None)
        return stack[-1] if stack else None

    @contextmanager
    def active(self) -> Iterator[Deadline]:
        """Bind this deadline to the calling thread's connections for the block."""
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(self)
        try:
            yield self
        finally:
            stack.pop()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """The attempt is over: nothing is shut down after this."""
        with _WATCHDOG.lock:
            self._done = True
            self._sockets.clear()

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def clamp(self, timeout: float | None) -> float:
        """`timeout` cut to the time left; HttpFailure(timeout) when none is left."""
        left = self.remaining()
        if left <= 0 or self.expired:
            raise self.failure()
        return left if timeout is None else min(timeout, left)

    def check(self) -> None:
        if self.expired or self.remaining() <= 0:
            raise self.failure()

    def failure(self, what: str = "") -> HttpFailure:
        return HttpFailure(TIMEOUT, f"no complete response within the deadline of {self.seconds:g}s"
                           + (f" ({what})" if what else ""))

    def arm(self, sock: socket.socket) -> None:
        """Shut `sock` down if this deadline passes while it is in use."""
        with _WATCHDOG.lock:
            if self._done:
                return
            if self.expired:
                _shutdown(sock)
            elif all(s is not sock for s in self._sockets):
                self._sockets.append(sock)

    def _fire(self) -> None:  # called by the watchdog, under its lock
        self.expired = True
        for sock in self._sockets:
            _shutdown(sock)
        self._sockets.clear()
        if self._on_expire is not None:
            try:
                self._on_expire()
            except Exception:  # noqa: BLE001 - the watchdog thread must outlive any callback
                pass


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the TLS object stays in place for the
    # thread blocked in it, which then sees the connection end.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Watchdog:
    """One daemon thread per process that fires deadlines in time order."""

    def __init__(self):
        self.lock = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._pid: int | None = None

    def watch(self, deadline: Deadline) -> None:
        with self.lock:
            if self._pid != os.getpid():  # first use, or a forked Spark worker: threads do not survive fork
                self._heap.clear()
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="http-deadline-watchdog", daemon=True).start()
            heapq.heappush(self._heap, (deadline.expires_at, next(self._seq), deadline))
            if self._heap[0][2] is deadline:  # the watchdog sleeps until the earliest: wake it only for a new one
                self.lock.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2]._done or self._heap[0][0] <= now):
                    _, _, deadline = heapq.heappop(self._heap)
                    if not deadline._done:
                        deadline._fire()
                self.lock.wait(self._heap[0][0] - now if self._heap else None)


_WATCHDOG = _Watchdog()


class _Lookups:
    """Name lookups on a small thread pool, so that a slow DNS server costs an attempt no
    more than its deadline (getaddrinfo itself cannot be interrupted; a lookup that outlives
    its deadline finishes in the background, within the resolver's own timeouts)."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def checked_addresses(self, policy: AddressPolicy, host: str, deadline: Deadline | None) -> list[str]:
        if deadline is None or ip_literal(host) is not None:
            return policy.checked_addresses(host)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="http-dns")
            future = self._pool.submit(policy.checked_addresses, host)
        try:
            return future.result(timeout=max(0.0, deadline.remaining()))
        except FutureTimeout:
            raise deadline.failure(f"resolving {short(host, 80)}") from None

    def reset(self) -> None:  # in a forked child: the pool's threads did not survive the fork
        self._pool, self._lock = None, threading.Lock()


_LOOKUPS = _Lookups()


def _after_fork_in_child() -> None:
    _WATCHDOG.lock = threading.Condition()  # the parent's watchdog may have held it at fork time
    _WATCHDOG._pid = None
    _LOOKUPS.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------
# connections that check their peer
# ---------------------------------------------------------------------------------------

class _GuardedConnectionMixin:
    """urllib3 connection whose socket is opened by `_open_checked_socket` and whose
    exchanges are armed against the thread's current Deadline."""

    policy: AddressPolicy = AddressPolicy()

    def _new_conn(self) -> socket.socket:
        deadline = Deadline.current()
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
        timeout = deadline.clamp(timeout) if deadline else timeout
        try:
            addresses = _LOOKUPS.checked_addresses(self.policy, self._dns_host, deadline)
        except (socket.gaierror, UnicodeError) as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        last: OSError | None = None
        for address in addresses:
            family, _, _, _, sockaddr = socket.getaddrinfo(address, self.port, 0, socket.SOCK_STREAM, 0,
                                                           socket.AI_NUMERICHOST)[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                # The peer, not the name: what the socket is actually connected to.
                self.policy.check_address(sock.getpeername()[0], self.host)
                if deadline:
                    deadline.arm(sock)
                return sock
            except AddressRefused:
                sock.close()
                raise
            except socket.timeout as exc:
                sock.close()
                if deadline and deadline.remaining() <= 0:
                    raise deadline.failure("connecting") from exc
                raise ConnectTimeoutError(self, f"connection to {self.host} timed out "
                                                f"(connect timeout={timeout})") from exc
            except OSError as exc:
                sock.close()
                last = exc
        raise NewConnectionError(self, f"Failed to establish a new connection: {last}")

    def connect(self) -> None:
        super().connect()
        deadline = Deadline.current()
        if deadline:
            deadline.arm(self.sock)  # the TLS socket, for HTTPS

    def request(self, *args, **kwargs):
        deadline = Deadline.current()
        if deadline and self.sock is not None:  # a pooled connection, reused
            deadline.arm(self.sock)
        return super().request(*args, **kwargs)


def _pool_classes(policy: AddressPolicy) -> dict[str, type]:
    http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), {"policy": policy})
    https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), {"policy": policy})
    return {"http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})}


# ---------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------

def _default_ca_bundle() -> str | None:
    try:
        import certifi  # requests' CA bundle; the system's store when it is absent
    except ImportError:
        return None
    return certifi.where()


def http_only(url: str) -> None:
    """The default check of every URL before it is requested: http(s) with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise HttpFailure(BAD_URL, f"malformed URL {short(url)!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise HttpFailure(BAD_URL, f"not an http(s) URL with a host: {short(url)!r}")


class GuardedClient:
    """Pooled HTTP connections under an AddressPolicy. Thread-safe; one per Spark task.

    `proxy`: send everything through this proxy instead; the proxy then resolves names and
    connects, so it must enforce egress rules itself (IP-literal URLs are still checked by
    the caller's URL check, names are not).
    """

    def __init__(self, policy: AddressPolicy | None = None, *, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 15.0, maxsize: int = 8, num_pools: int = 64, user_agent: str | None = None,
                 proxy: str | None = None, ca_bundle: str | None = None):
        self.policy = policy or AddressPolicy()
        self.timeout = Timeout(connect=connect_timeout_s, read=read_timeout_s)
        self.headers = {"Accept-Encoding": ACCEPT_ENCODING}
        if user_agent:
            self.headers["User-Agent"] = user_agent
        kwargs = dict(num_pools=num_pools, maxsize=maxsize, block=False, cert_reqs="CERT_REQUIRED",
                      ca_certs=ca_bundle or _default_ca_bundle())
        if proxy:
            self.manager: PoolManager = ProxyManager(proxy, **kwargs)
            self.manager.pool_classes_by_scheme = _pool_classes(ALLOW_ALL)  # connections go to the proxy only
        else:
            self.manager = PoolManager(**kwargs)
            self.manager.pool_classes_by_scheme = _pool_classes(self.policy)

    def close(self) -> None:
        self.manager.clear()

    def open(self, url: str, deadline: Deadline, headers: dict | None = None, *, max_redirects: int = 5,
             check_url: Callable[[str], None] = http_only) -> tuple[BaseHTTPResponse, str]:
        """GET `url` within `deadline`, following redirects, each hop checked by `check_url`
        (raises HttpFailure). Returns (response with its body unread, final URL); the caller
        reads it (`read_body`) and hands it back with `release`."""
        current = url
        for _hop in range(max_redirects + 1):
            check_url(current)
            response = self._request(current, deadline, headers)
            if response.status not in REDIRECT_STATUSES:
                return response, current
            location = response.headers.get("Location")
            self.release(response, deadline, complete=False)
            if not location:
                raise HttpFailure(BAD_REDIRECT, f"HTTP {response.status} without a Location header", response.status)
            try:
                current = urljoin(current, location)
                check_url(current)
            except (ValueError, HttpFailure) as exc:
                if isinstance(exc, HttpFailure) and exc.reason != BAD_URL:
                    raise
                raise HttpFailure(BAD_REDIRECT, f"HTTP {response.status} to an unusable Location "
                                  f"{short(location, 120)!r}: {short(getattr(exc, 'detail', exc), 120)}",
                                  response.status) from None
        raise HttpFailure(TOO_MANY_REDIRECTS, f"more than {max_redirects} redirects from {short(url)}")

    def _request(self, url: str, deadline: Deadline, headers: dict | None) -> BaseHTTPResponse:
        with deadline.active():
            try:
                return self.manager.urlopen("GET", url, headers={**self.headers, **(headers or {})}, redirect=False,
                                            retries=False, preload_content=False, decode_content=True,
                                            timeout=self.timeout)
            except HttpFailure:
                raise
            except AddressRefused as exc:  # raised by the connection, before it sent anything
                raise HttpFailure(SSRF_BLOCKED, exc.detail) from None
            except (HTTPError, OSError, ValueError) as exc:
                raise translate(exc, deadline, url) from exc

    def release(self, response: BaseHTTPResponse, deadline: Deadline, complete: bool = True) -> None:
        """Give the connection back for reuse only when its body was read whole in time.
        `complete` also ends `deadline` (first: a pooled socket must not be shut down later)."""
        if complete:
            deadline.close()
        if not complete or deadline.expired:
            response.close()  # unread bytes, or shut down by the watchdog: never reuse it
        response.release_conn()

    def get_bytes(self, url: str, *, max_bytes: int, timeout_s: float, max_redirects: int = 5) -> bytes:
        """The whole body of `url` (200 only), within `timeout_s` and `max_bytes` (decoded)."""
        with Deadline(timeout_s) as deadline:
            response, final = self.open(url, deadline, max_redirects=max_redirects)
            complete = False
            try:
                if response.status != 200:
                    raise HttpFailure(http_status_reason(response.status), f"HTTP {response.status} for {short(final)}",
                                      response.status)
                data = read_body(response, max_bytes, deadline, final)
                complete = True
                return data
            finally:
                self.release(response, deadline, complete)


def read_body(response: BaseHTTPResponse, max_bytes: int, deadline: Deadline, url: str = "") -> bytes:
    """The decoded body, at most `max_bytes`, complete within `deadline`; else HttpFailure
    (too_large, timeout, truncated, bad_encoding, connection_error)."""
    declared = (response.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise HttpFailure(TOO_LARGE, f"Content-Length {int(declared):,} exceeds the cap of {max_bytes:,} bytes",
                          response.status)
    chunks, size = [], 0
    with deadline.active():
        try:
            for chunk in response.stream(_CHUNK, decode_content=True):
                size += len(chunk)
                if size > max_bytes:
                    raise HttpFailure(TOO_LARGE, f"body exceeds the cap of {max_bytes:,} bytes "
                                      f"(after Content-Encoding is decoded)", response.status)
                chunks.append(chunk)
                deadline.check()
        except HttpFailure:
            raise
        except (HTTPError, OSError, ValueError) as exc:
            failure = translate(exc, deadline, url)
            failure.detail = f"body read failed after {size:,} bytes: {failure.detail}"
            failure.http_status = response.status
            raise failure from exc
        # The watchdog ends a body without Content-Length like a normal end of stream.
        if deadline.expired:
            raise deadline.failure(f"{size:,} bytes received")
    return b"".join(chunks)


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)],
                      getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), BaseException) else None])


def translate(exc: BaseException, deadline: Deadline | None, url: str) -> HttpFailure:
    """An exception from urllib3 or the socket layer as a reason code."""
    causes = list(_causes(exc))
    text = short(f"{type(exc).__name__}: {exc}")

    def caused_by(*types) -> bool:
        return any(isinstance(e, types) for e in causes)

    for e in causes:
        if isinstance(e, HttpFailure):
            return e
        if isinstance(e, AddressRefused):
            return HttpFailure(SSRF_BLOCKED, e.detail)
    if deadline is not None and deadline.expired:
        return deadline.failure()
    if caused_by(NameResolutionError, socket.gaierror):
        return HttpFailure(DNS_ERROR, f"cannot resolve the host of {short(url)}")
    if caused_by(NewConnectionError):  # (a subclass of ConnectTimeoutError in urllib3, yet a refusal)
        return HttpFailure(CONNECTION_ERROR, text)
    if caused_by(ReadTimeoutError, ConnectTimeoutError, socket.timeout):
        return HttpFailure(TIMEOUT, f"{text} ({short(url, 120)})")
    if caused_by(DecodeError):
        return HttpFailure(BAD_ENCODING, f"the body does not decode as its Content-Encoding says: {text}")
    if caused_by(IncompleteRead, http.client.IncompleteRead):
        return HttpFailure(TRUNCATED, f"the connection ended before the declared Content-Length: {text}")
    if caused_by(SSLError, ssl.SSLError, ssl.CertificateError):
        return HttpFailure(TLS_ERROR, text)
    if caused_by(LocationParseError, LocationValueError, http.client.InvalidURL):
        return HttpFailure(BAD_URL, f"invalid URL {short(url)!r}: {text}")
    if any(isinstance(e, http.client.HTTPException) and not isinstance(e, ConnectionError) for e in causes):
        return HttpFailure(BAD_RESPONSE, f"malformed HTTP response: {text}")
    if caused_by(NewConnectionError, ProtocolError, ProxyError, OSError):
        return HttpFailure(CONNECTION_ERROR, text)
    return HttpFailure(REQUEST_ERROR, text)
