"""The bundled sample catalog: Debian's openclipart-png drawings as a product catalog.

`build_sample_manifest` turns the ~6,750 PNGs in 22 category folders into manifest rows
(several images per product: `name_01.png`, `name_02.png` belong to one product).
Left out: the package's 1,370 generated star polygons (`shapes/stars/star_NNptKKstep.png`,
100x100 px line patterns from one script). They are test patterns rather than products, and
hundreds of them are rings no person, pHash or CNN tells apart once re-encoded, so as
"products" they would only measure noise (bench/dedup reports them separately).
`serve_images` serves the folder over real HTTP with ETag and Last-Modified, so the demo
crawl (and the incremental re-crawl) is a real HTTP crawl.
"""
from __future__ import annotations

import csv
import email.utils
import hashlib
import http.server
import re
import threading
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
DEFAULT_SAMPLE_SIZE = 1000
GENERATED_PATTERNS = re.compile(r"^shapes/stars/star_\d+pt\d+step\.png$")


class SampleCatalogError(RuntimeError):
    pass


def list_sample_images(root: Path = OPENCLIPART_DIR) -> list[tuple[str, Path]]:
    """(category, path) for every PNG except the generated star polygons, sorted; category =
    top-level folder."""
    if not root.is_dir():
        raise SampleCatalogError(f"{root} not found: install the Debian package openclipart-png "
                                 "(`make setup` does: apt-get install openclipart-png)")
    images = [(p.relative_to(root).parts[0], p) for p in root.rglob("*.png")
              if len(p.relative_to(root).parts) > 1 and not GENERATED_PATTERNS.match(p.relative_to(root).as_posix())]
    return sorted(images, key=lambda item: item[1].relative_to(root).as_posix())


def product_id_for(category: str, path: Path) -> str:
    stem = re.sub(r"_\d+$", "", path.stem)
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "item"
    return f"{category}-{slug}"


def build_sample_manifest(base_url: str, size: int | None = DEFAULT_SAMPLE_SIZE,
                          root: Path = OPENCLIPART_DIR) -> list[dict[str, str]]:
    """Manifest rows for `size` images (None = all): every category keeps its share (at least
    one image), picked evenly within it. Deterministic: the same size gives the same rows."""
    images = list_sample_images(root)
    if size is not None and size < len(images):
        images = _stratified(images, size)
    rows = []
    for category, path in images:
        rel = path.relative_to(root).as_posix()
        rows.append({
            "product_id": product_id_for(category, path),
            "category": category,
            "image_url": f"{base_url.rstrip('/')}/{quote(rel)}",
            "title": re.sub(r"[_-]+", " ", re.sub(r"_\d+$", "", path.stem)).strip(),
        })
    return rows


def _stratified(images: list[tuple[str, Path]], size: int) -> list[tuple[str, Path]]:
    by_category: dict[str, list[tuple[str, Path]]] = {}
    for item in images:
        by_category.setdefault(item[0], []).append(item)
    quota = {c: max(1, round(size * len(items) / len(images))) for c, items in by_category.items()}
    while sum(quota.values()) > size:  # rounding overshoot: trim the largest categories
        quota[max(quota, key=quota.get)] -= 1
    while sum(quota.values()) < size:
        quota[max(by_category, key=lambda c: len(by_category[c]) - quota[c])] += 1
    picked = []
    for category, items in by_category.items():
        if quota[category] == 0:  # fewer images asked for than there are categories
            continue
        step = len(items) / quota[category]
        picked.extend(items[int(i * step)] for i in range(quota[category]))
    return sorted(picked, key=lambda item: item[1].as_posix())


def write_manifest_csv(rows: list[dict[str, str]], dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["product_id", "category", "image_url", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return dest


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files under `root`, with strong ETags and conditional requests."""

    root: Path
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: the crawl has its own progress bar
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        path = (self.root / rel).resolve()
        if self.root not in path.parents or not path.is_file():
            self._send(404, b"not found", "text/plain", head)
            return
        stat = path.stat()
        etag = '"' + hashlib.sha1(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20] + '"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        headers = {"ETag": etag, "Last-Modified": last_modified, "Cache-Control": "max-age=3600"}
        if_none_match = self.headers.get("If-None-Match")
        if_modified_since = self.headers.get("If-Modified-Since")
        not_modified = (if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]) or (
            if_none_match is None and if_modified_since is not None
            and _parse_http_date(if_modified_since) >= int(stat.st_mtime))
        if not_modified:
            self._send(304, b"", None, head, headers)
            return
        self._send(200, path.read_bytes(), "image/png", head, headers)

    def _send(self, status: int, body: bytes, content_type: str | None, head: bool, headers: dict | None = None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0" if status == 304 else str(len(body)))
        self.end_headers()
        if not head and status != 304:
            self.wfile.write(body)


def _parse_http_date(value: str) -> float:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return -1.0


class ImageServer:
    """A threaded HTTP server for a folder; use as a context manager or start()/stop()."""

    def __init__(self, root: Path = OPENCLIPART_DIR, host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_ImageHandler,), {"root": Path(root).resolve()})
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ImageServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_forever(root: Path, host: str, port: int) -> None:
    server = ImageServer(root, host, port)
    print(f"serving {root} at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()

