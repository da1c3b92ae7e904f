"""A real HTTP server on 127.0.0.1 that misbehaves on purpose, for crawl tests.

Routes:
  /img/<name>            bytes from `server.files[name]`, strong ETag + Last-Modified, conditional GET
  /status/<code>         always answers <code>
  /flaky/<name>/<n>      503 for the first n requests of that path, then /img/<name>
  /slow/<name>           sends /img/<name> one small chunk every 0.3 s (a trickling server)
  /hang                  accepts, then sends nothing for 30 s
  /html-as-jpeg          an HTML error page served as image/jpeg
  /empty                 200 with zero bytes
  /lying-length/<name>   Content-Length larger than the body, then closes
  /huge                  Content-Length: 10 GB (never sends it)
  /redirect?to=<url>     302 to <url> (sent as given: malformed Locations too)
  /redirect-loop         302 to itself
  /redirect-no-location  302 without a Location header
  /trickle-body          200, Content-Length 1 MB, then one byte every 0.2 s, forever
  /trickle-headers       a status line, then header bytes one every 0.2 s, forever
  /gzip/<name>, /br/<name>, /deflate/<name>
                         /img/<name> sent with that Content-Encoding (Content-Length: the encoded size)
  /bad-gzip              Content-Encoding: gzip over bytes that are not gzip
  /gzip-bomb/<mb>        <mb> MB of zeros, gzip-encoded (a few KB on the wire)
  /busy/<seconds>/<n>/<name>
                         503 with Retry-After: <seconds> for the first n requests, then /img/<name>
  /many-headers          200 with 500 headers (more than any HTTP client accepts)
  /not-http              a line that is not HTTP, then the connection closes
  /close-early           closes the connection without answering
Every request is recorded in `server.log` as (path, status, conditional?), with its raw
request target and Host header in `server.raw_log`; accepted connections are counted
in `server.connections`, and the highest number of concurrent requests is kept in
`server.max_concurrency`. `FaultServer(host=...)` binds another loopback address.
"""
from __future__ import annotations

import email.utils
import gzip
import hashlib
import http.server
import threading
import time
import zlib
from urllib.parse import parse_qs, urlsplit


class FaultServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None):
        self.files: dict[str, bytes] = {}
        self.mtimes: dict[str, float] = {}
        self.log: list[tuple[str, int, bool]] = []
        self.raw_log: list[tuple[str, str | None]] = []
        self.counts: dict[str, int] = {}
        self.connections = 0
        self.active = 0
        self.max_concurrency = 0
        self.delay_s = 0.0  # added to every /img response, to observe concurrency
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients hanging up on purpose is expected
        self.httpd.verify_request = self._count_connection
        self.scheme = "http"
        if tls:  # (certfile, keyfile): serve https
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _count_connection(self, request, address) -> bool:
        with self._lock:
            self.connections += 1
        return True

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def put(self, name: str, data: bytes) -> str:
        self.files[name] = data
        self.mtimes[name] = time.time()
        return self.url(f"img/{name}")

    def requests_to(self, path_prefix: str) -> list[tuple[str, int, bool]]:
        """Requests answered with a status line and headers (see `received` for all)."""
        return [entry for entry in self.log if entry[0].startswith(path_prefix)]

    def received(self, path_prefix: str) -> int:
        """Requests that arrived for paths starting with `path_prefix`, answered or not."""
        return sum(1 for target, _ in self.raw_log if urlsplit(target).path.startswith(path_prefix))

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server_state: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        state = self.server_state
        with state._lock:
            state.active += 1
            state.max_concurrency = max(state.max_concurrency, state.active)
            state.counts[self.path] = state.counts.get(self.path, 0) + 1
            count = state.counts[self.path]
            state.raw_log.append((self.path, self.headers.get("Host")))
        try:
            self._route(count)
        finally:
            with state._lock:
                state.active -= 1

    def end_headers(self):
        # Record the request before the client can see the response, so tests never race the log.
        conditional = "If-None-Match" in self.headers or "If-Modified-Since" in self.headers
        with self.server_state._lock:
            self.server_state.log.append((urlsplit(self.path).path, self._status, conditional))
        super().end_headers()

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def _send(self, status, body=b"", headers=None, content_type="application/octet-stream"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)
        return status

    def _route(self, count: int) -> int:
        parts = urlsplit(self.path)
        path = parts.path.strip("/").split("/")
        state = self.server_state
        head = path[0]
        if head == "img":
            return self._image("/".join(path[1:]))
        if head == "status":
            return self._send(int(path[1]), b"error page", content_type="text/html")
        if head == "flaky":
            if count <= int(path[2]):
                return self._send(503, b"busy", content_type="text/plain")
            return self._image(path[1])
        if head == "slow":
            data = state.files[path[1]]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(0, len(data), 64):
                    self.wfile.write(data[i:i + 64])
                    self.wfile.flush()
                    time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return 200
        if head == "hang":
            time.sleep(30)
            return 0
        if head == "html-as-jpeg":
            return self._send(200, b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
                              content_type="image/jpeg")
        if head == "empty":
            return self._send(200, b"", content_type="image/png")
        if head == "lying-length":
            data = state.files[path[1]]
            self._send(200, data[: len(data) // 2], headers={"Content-Length": str(len(data)), "Connection": "close"},
                       content_type="image/png")
            self.close_connection = True
            return 200
        if head == "huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10 * 1024 ** 3))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return 200
        if head == "redirect":
            return self._send(302, headers={"Location": parse_qs(parts.query)["to"][0]})
        if head == "redirect-loop":
            return self._send(302, headers={"Location": "/redirect-loop"})
        if head == "redirect-no-location":
            return self._send(302)
        if head == "trickle-body":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            return self._trickle(b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20))
        if head == "trickle-headers":
            self._status = 200
            with state._lock:  # logged now: the headers never end, so end_headers never runs
                state.log.append((parts.path, 200, False))
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            return self._trickle(b"X-Slow: " + b"a" * (1 << 20))
        if head in ("gzip", "br", "deflate"):
            data = state.files[path[1]]
            encoded = {"gzip": gzip.compress, "deflate": zlib.compress, "br": _brotli}[head](data)
            return self._send(200, encoded, headers={"Content-Encoding": head}, content_type="image/png")
        if head == "bad-gzip":
            return self._send(200, b"this is not gzip at all" * 10, headers={"Content-Encoding": "gzip"},
                              content_type="image/png")
        if head == "gzip-bomb":
            bomb = gzip.compress(b"\0" * (int(path[1]) << 20), compresslevel=9)
            return self._send(200, bomb, headers={"Content-Encoding": "gzip"}, content_type="image/png")
        if head == "busy":
            if count <= int(path[2]):
                return self._send(503, b"busy", headers={"Retry-After": path[1]}, content_type="text/plain")
            return self._image(path[3])
        if head == "many-headers":
            return self._send(200, b"x", headers={f"X-H{i}": "v" for i in range(500)})
        if head == "not-http":
            self._status = 0
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6 not an HTTP server\r\n\r\n")
            self.close_connection = True
            return 0
        if head == "close-early":
            self._status = 0
            self.close_connection = True
            return 0
        return self._send(404, b"not found", content_type="text/plain")

    def _trickle(self, data: bytes) -> int:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True
        return self._status

    def _image(self, name: str) -> int:
        state = self.server_state
        if name not in state.files:
            return self._send(404, b"not found", content_type="text/plain")
        if state.delay_s:
            time.sleep(state.delay_s)
        data = state.files[name]
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(state.mtimes[name], usegmt=True)}
        if self.headers.get("If-None-Match") == etag:
            return self._send(304, headers={**headers, "Content-Length": "0"})
        return self._send(200, data, headers=headers, content_type="image/png")


def _brotli(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data)
