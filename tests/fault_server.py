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
  /redirect?to=<url>     302 to <url>
  /redirect-loop         302 to itself
Every request is recorded in `server.log` as (path, status, conditional?) and the
highest number of concurrent requests is kept in `server.max_concurrency`.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.server
import threading
import time
from urllib.parse import parse_qs, urlsplit


class FaultServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mtimes: dict[str, float] = {}
        self.log: list[tuple[str, int, bool]] = []
        self.counts: dict[str, int] = {}
        self.active = 0
        self.max_concurrency = 0
        self.delay_s = 0.0  # added to every /img response, to observe concurrency
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients hanging up on purpose is expected
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def put(self, name: str, data: bytes) -> str:
        self.files[name] = data
        self.mtimes[name] = time.time()
        return self.url(f"img/{name}")

    def requests_to(self, path_prefix: str) -> list[tuple[str, int, bool]]:
        return [entry for entry in self.log if entry[0].startswith(path_prefix)]

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
        return self._send(404, b"not found", content_type="text/plain")

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
