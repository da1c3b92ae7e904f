"""A small HTTP proxy in front of an S3-compatible server that injects faults, for the fault-injection tests.

Every request is numbered; a `plan` {request number: fault} decides what happens to it:

    slowdown   answer 503 SlowDown without forwarding (S3 throttling)
    reset      close the connection without forwarding (a reset before the server saw the request)
    lost       forward it (the server acts on it), then close the connection without answering:
               the client cannot tell whether a write happened, and retries it
    slow       forward it after a pause (a slow network)

Signatures are kept valid by forwarding the Host header unchanged (neither moto nor SeaweedFS checks them
against their own address). 127.0.0.1 only.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')
FAULTS = ("slowdown", "reset", "lost", "slow")


class S3FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.plan: dict[int, str] = {}
        self.targets: list[tuple[str, str, str]] = []   # (method, path part, fault): once, at the next match
        self.count = 0
        self.injected: list[tuple[int, str, str, str]] = []   # (request number, fault, method, path)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    number = proxy.count
                    proxy.count += 1
                    fault = proxy.plan.get(number)
                    for target in list(proxy.targets):
                        method, path_part, kind = target
                        if self.command == method and path_part in self.path:
                            fault = kind
                            proxy.targets.remove(target)
                            break
                    if fault:
                        proxy.injected.append((number, fault, self.command, self.path))
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                if fault == "reset":
                    self._reset()
                    return
                if fault == "slow":
                    time.sleep(0.4)
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    connection.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                if fault == "lost":
                    self._reset()
                    return
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD answer has no body but the object's length: pass that on, as S3 does.
                head_length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", head_length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reset(self):
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "S3FaultProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def arm(self, plan: dict[int, str], targets: list[tuple[str, str, str]] | None = None) -> None:
        """Number requests from 0 again and inject `plan` from now on; each of `targets` hits the next
        request with that method whose path contains that part (e.g. ("PUT", "/LATEST", "lost"))."""
        with self.lock:
            self.plan, self.count, self.targets = dict(plan), 0, list(targets or [])
