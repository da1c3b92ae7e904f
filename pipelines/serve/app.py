"""The FastAPI app of `catalog-index serve`: routes, auth, error handling, metrics, the page.

    POST /v1/search?k=10&category=C    multipart `image` | image/* body | {"image_url"} | {"vector"}
    GET  /v1/similar/{product_id}?k=10 more like this product (its stored vector)
    GET  /v1/snapshot                  the live snapshot: id, model, counts, recall, latency, age
    POST /v1/reload                    check for a new snapshot now (what the follower does every refresh_s)
    GET  /healthz, /readyz, /metrics, /docs, /
A request reads `live.current` once and finishes on that snapshot, whatever a swap does
meanwhile. Every failure a client can cause is an ApiError (4xx, JSON {"error", "detail"});
503 while no snapshot is loaded. With `--workers N` (`run_server`) every response carries
`X-Worker: <pid>` and a worker takes connections only once its first snapshot is loaded. This module
must never let a client's input become a 500.
"""
from __future__ import annotations

import base64
import hmac
import logging
import os
import shutil
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from fastapi import FastAPI, Path as PathParam, Query as QueryParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from pipelines.search import Hit, SnapshotError
from pipelines.decode import ImageDecodeError
from pipelines.serve.live import Loaded, LiveSnapshot
from pipelines.serve.metrics import MULTIPROC_ENV, ServiceMetrics
from pipelines.serve.model import timed
from pipelines.serve.queries import (ApiError, decode_error, fetch_image, image_fetcher, parse_query,
                                     read_body)
from pipelines.serve.settings import ENV_SETTINGS_FILE, ServeSettings

PAGE = Path(__file__).with_name("page.html")
OPEN_PATHS = {"/healthz"}                       # no token needed
FIRST_LOAD_WAIT_S = 60.0                        # --workers N: how long a worker's startup waits for its snapshot
log = logging.getLogger("catalog_index.serve")

SEARCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "the query image"}}}},
        "application/json": {"schema": {"oneOf": [
            {"type": "object", "required": ["image_url"], "properties": {
                "image_url": {"type": "string", "description": "http(s) URL of the query image, fetched by "
                                                               "the crawler's guarded client"}}},
            {"type": "object", "required": ["vector"], "properties": {
                "vector": {"type": "array", "items": {"type": "number"},
                           "description": "a query vector of the snapshot's dimension (normalised here)"}}}]}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
SEARCH_RESPONSE = {"description": "products, best first, each once", "content": {"application/json": {"example": {
    "snapshot_id": "20261123T031500.123Z-ab12", "model_version": "effnet-lite0-…", "took_ms": 41.2,
    "results": [{"product_id": "p-1", "category": "shoes", "score": 0.93, "image_url": "https://…"}]}}}}
ERRORS = {status: {"description": text, "content": {"application/json": {"example": {"error": code, "detail": "…"}}}}
          for status, text, code in [(400, "malformed request", "bad_json"), (401, "missing or wrong token",
                                     "unauthorized"), (413, "body or image too large", "too_large"),
                                     (415, "not an image", "not_an_image"), (422, "invalid parameter or input",
                                     "invalid_request"), (503, "no snapshot loaded yet", "no_snapshot")]}


def create_app(settings: ServeSettings, live: LiveSnapshot | None = None) -> FastAPI:
    several = settings.workers > 1  # this app is one of several worker processes (`run_server`)
    metrics = ServiceMetrics(across_workers=several)
    live = live or LiveSnapshot(settings, metrics)
    fetcher = image_fetcher(settings.max_upload_bytes, settings.image_url_timeout_s, settings.allow_private_image_urls)
    worker = [(b"x-worker", str(os.getpid()).encode())] if several else []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        live.start()
        if several:
            # A worker accepts connections once its first snapshot is loaded (or failed): a worker
            # started to replace a dead one must not answer 503 while its siblings could answer.
            # Bounded, so that a service whose warehouse has nothing yet still starts (and says 503).
            await run_in_threadpool(live.first_check_done.wait, FIRST_LOAD_WAIT_S)
        try:
            yield
        finally:
            live.stop()
            fetcher.close()
            metrics.close()

    app = FastAPI(title="catalog-index search", version="1", lifespan=lifespan,
                  description="Visual search over the live catalog-index snapshot. Send a product photo, get "
                              "the most similar products. Every endpoint except /healthz needs "
                              "`Authorization: Bearer <key>` when the service was started with --api-key-file.")
    app.state.live, app.state.metrics, app.state.settings = live, metrics, settings

    # -- cross-cutting: auth, metrics, errors ----------------------------------------------

    async def auth_and_metrics(scope: dict, receive, send, call_app) -> None:
        started = time.perf_counter()
        status: list[int] = []  # the status the response started with, once it has

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if worker:
                    message["headers"] = [*message.get("headers", ()), *worker]
            await send(message)

        try:
            if settings.api_key and scope["path"] not in OPEN_PATHS:
                _check_token(Request(scope), settings.api_key)
            await call_app(scope, receive, send_counted)
        except ApiError as error:
            await _error_response(error)(scope, receive, send_counted)
        except Exception:  # a bug of ours, not the client's: say so, count it, keep serving
            log.exception("unexpected error")
            if status:  # the response has begun: all that is left is to end the connection
                raise
            await JSONResponse({"error": "internal", "detail": "the service failed on this request; it is "
                                                               "logged"}, status_code=500)(scope, receive, send_counted)
        endpoint = _endpoint(app, scope)
        metrics.requests.labels(endpoint, str(status[0] if status else 500)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    # A plain ASGI middleware, not @app.middleware("http"): Starlette's BaseHTTPMiddleware runs each
    # request through a task group and a memory stream. Measured, 1 client on 2 cores: GET /v1/snapshot
    # 840 -> 715 us, a 1280-d vector search 2.43 -> 1.98 ms; image queries at 4 clients 0.90 -> 0.94 of
    # the minimal server's queries/s (bench/serve).
    app.add_middleware(AsgiHook, hook=auth_and_metrics)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in error.errors())
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        detail = {404: f"no endpoint {request.url.path[:200]}: the API is listed at /docs",
                  405: f"{request.method} is not allowed on {request.url.path[:200]}: the API is listed at /docs"
                  }.get(error.status_code, str(error.detail))
        return JSONResponse({"error": code, "detail": detail}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    def loaded() -> Loaded:
        current = live.current
        if current is None:
            detail = live.last_outcome.detail if live.last_outcome else "loading"
            raise ApiError(503, "no_snapshot", f"no verified snapshot is loaded yet ({detail})",
                           {"Retry-After": str(int(min(settings.refresh_s, 30)) or 1)})
        return current

    def check_category(current: Loaded, category: str | None) -> None:
        if category is not None and category not in current.snapshot.categories:
            known = current.snapshot.categories
            raise ApiError(422, "unknown_category", f"category {category!r} is not in snapshot "
                           f"{current.snapshot.snapshot_id}; known: {', '.join(known[:50])}"
                           + (f" and {len(known) - 50} more" if len(known) > 50 else ""))

    def answer(current: Loaded, hits: list[Hit], started: float, timings: dict, endpoint: str) -> JSONResponse:
        for step, seconds in timings.items():
            metrics.steps.labels(endpoint, step).observe(seconds)
        body = {"snapshot_id": current.snapshot.snapshot_id, "model_version": current.snapshot.model_version,
                "took_ms": round((time.perf_counter() - started) * 1000, 2),
                "results": [hit.to_json() for hit in hits]}
        return JSONResponse(body, headers={"X-Snapshot-Id": current.snapshot.snapshot_id})

    # -- search ----------------------------------------------------------------------------

    @app.post("/v1/search", summary="search by image upload, image URL or vector",
              openapi_extra={"requestBody": SEARCH_BODY}, responses={200: SEARCH_RESPONSE, **ERRORS})
    async def search(request: Request,
                     k: int = QueryParam(10, ge=1, le=settings.max_k, description="products to return"),
                     category: str | None = QueryParam(None, max_length=256, description="only this category")):
        started = time.perf_counter()
        current = loaded()  # this request's snapshot, whatever a swap does meanwhile
        check_category(current, category)
        body = await read_body(request, settings.max_upload_bytes, settings.body_timeout_s)
        query = await parse_query(request, body)
        timings: dict[str, float] = {}
        if query.kind == "vector":
            vector = np.asarray(query.vector, dtype=np.float32)
            if vector.shape[0] != current.snapshot.dimension:
                raise ApiError(422, "wrong_dimension", f"vector has dimension {vector.shape[0]}, snapshot "
                               f"{current.snapshot.snapshot_id} holds {current.snapshot.dimension}-d vectors of "
                               f"model {current.snapshot.model_version}")
        else:
            if current.model is None:
                raise ApiError(409, "vector_only_snapshot", f"snapshot {current.snapshot.snapshot_id} holds "
                               f"vectors this service cannot compute from images ({current.model_error}); "
                               "send {\"vector\": [...]}")
            step = time.perf_counter()
            if query.image_url is not None:
                query.image = await run_in_threadpool(fetch_image, fetcher, query.image_url)
                step = timed(timings, "fetch", step)
            try:
                pixels = await run_in_threadpool(current.model.decode, query.image)
            except ImageDecodeError as error:
                raise decode_error(error) from None
            step = timed(timings, "decode", step)
            vector = await current.model.embed(pixels)
            timed(timings, "embed", step)
        try:
            hits = await run_in_threadpool(current.snapshot.search_vectors, vector, k, category, timings=timings)
        except SnapshotError as error:
            raise ApiError(422, "bad_vector", str(error)) from None
        return answer(current, hits[0], started, timings, "/v1/search")

    @app.get("/v1/similar/{product_id}", summary="products most like this one (from its stored vector)",
             responses={200: SEARCH_RESPONSE, **ERRORS})
    async def similar(product_id: str = PathParam(..., min_length=1, max_length=512),
                      k: int = QueryParam(10, ge=1, le=settings.max_k, description="products to return")):
        started = time.perf_counter()
        current = loaded()
        timings: dict[str, float] = {}
        hits = await run_in_threadpool(current.snapshot.similar_products, product_id, k, timings=timings)
        if hits is None:
            raise ApiError(404, "unknown_product", f"product {product_id[:200]!r} is not in snapshot "
                                                   f"{current.snapshot.snapshot_id}")
        return answer(current, hits, started, timings, "/v1/similar/{product_id}")

    # -- the snapshot ----------------------------------------------------------------------

    @app.get("/v1/snapshot", summary="the live snapshot")
    async def snapshot_info():
        current = loaded()
        return JSONResponse(describe(current, live))

    @app.post("/v1/reload", summary="look for a new snapshot now (the follower does it every --refresh-s)")
    async def reload():
        outcome = await run_in_threadpool(live.check)
        status = 200 if outcome.outcome in ("loaded", "unchanged") else 409
        return JSONResponse({**outcome.to_json(), "serving": live.current.snapshot.snapshot_id
                             if live.current else None}, status_code=status)

    # -- probes, metrics, page ---------------------------------------------------------------

    @app.get("/healthz", summary="200 once a verified snapshot is loaded")
    async def healthz():
        current = live.current
        if current is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "snapshot_id": current.snapshot.snapshot_id}

    @app.get("/readyz", summary="200 when searches can be answered now (snapshot and model loaded)")
    async def readyz():
        current = live.current
        if current is None:
            return JSONResponse({"ready": False, "reason": "no snapshot loaded"}, status_code=503)
        return {"ready": True, "snapshot_id": current.snapshot.snapshot_id, "image_search": current.model is not None}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    return app


def describe(current: Loaded, live: LiveSnapshot) -> dict:
    manifest = current.snapshot.manifest
    latencies = [s.get("search_latency_ms") for s in manifest["shards"] if s.get("search_latency_ms")]
    return {
        "snapshot_id": manifest["snapshot_id"],
        "index_name": manifest["index_name"],
        "model_version": manifest["model"]["version"],
        "model_name": manifest["model"]["name"],
        "dimension": manifest["dimension"],
        "image_search": current.model is not None,
        "counts": {key: manifest["totals"][key] for key in ("shards", "vectors", "products")},
        "categories": current.snapshot.categories,
        "recall_at_10": manifest["recall_at_10"],
        "search_latency_ms": {"p50_max": max(l["p50"] for l in latencies),
                              "p99_max": max(l["p99"] for l in latencies)} if latencies else None,
        "created_at": manifest["created_at"],
        "published_at": manifest["published_at"],
        "source_run_id": manifest["source_run_id"],
        "age_s": round(time.time() - current.created_at, 1) if current.created_at else None,
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current.loaded_at)),
        "memory_mapped": current.snapshot.mmap,
        "verified": current.snapshot.verified,
        "last_reload": live.last_outcome.to_json() if live.last_outcome else None,
    }


class AsgiHook:
    """Wraps the app for HTTP requests: `hook(scope, receive, send, app)` decides how the app runs."""

    def __init__(self, app, hook):
        self.app, self.hook = app, hook

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        else:
            await self.hook(scope, receive, send, self.app)


def _endpoint(app: FastAPI, scope: dict) -> str:
    """The route template a request matched ("/v1/similar/{product_id}"), also for requests refused
    before routing (401); "other" for paths no route matches (bounded label values)."""
    route = scope.get("route")
    if route is None:
        for candidate in app.router.routes:
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "other"


def _check_token(request: Request, key: str) -> None:
    """Bearer <key>, or HTTP Basic with <key> as the password (what a browser sends after its prompt)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = ""
    if not given or not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
        browser = request.url.path in ("/", "/docs", "/openapi.json") or "text/html" in request.headers.get("accept", "")
        challenge = 'Basic realm="catalog-index", charset="UTF-8"' if browser else 'Bearer realm="catalog-index"'
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <key> (the key in the service's "
                                            "--api-key-file)" if not given else "wrong API key",
                       {"WWW-Authenticate": challenge})


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.headers)


def run_server(settings: ServeSettings) -> None:
    """Run uvicorn in the foreground: one process, or `settings.workers` worker processes under
    uvicorn's supervisor (it restarts a worker that dies; SIGTERM stops them all). Each worker loads
    its own model and follows the snapshot on its own; the memory-mapped shards share the page cache;
    /metrics merges every worker's counts through a private directory removed on exit."""
    # uvicorn: kept out of import time (the CLI's --help imports this package's parent)
    import uvicorn

    common = dict(host=settings.host, port=settings.port, log_level="info", timeout_keep_alive=5,
                  limit_concurrency=512, h11_max_incomplete_event_size=64 * 1024)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    with _worker_environment(settings):
        uvicorn.run("pipelines.serve.app:app_from_env", factory=True, workers=settings.workers, **common)


SERVICE_DIR_PREFIX = "catalog-index-serve-"


@contextmanager
def _worker_environment(settings: ServeSettings) -> Iterator[None]:
    """What the workers (fresh interpreters) inherit: the path of the settings file, and a fresh directory
    for Prometheus' multiprocess files (set before they import prometheus_client), both in a private
    directory removed afterwards. One left by a service killed with kill -9 is removed at the next start."""
    _remove_abandoned_service_dirs()
    root = Path(tempfile.mkdtemp(prefix=SERVICE_DIR_PREFIX))  # mode 0700
    (root / "parent.pid").write_text(str(os.getpid()))
    settings.write_private(root / "settings.json")
    (root / "metrics").mkdir(mode=0o700)
    saved = {name: os.environ.get(name) for name in (ENV_SETTINGS_FILE, MULTIPROC_ENV)}
    os.environ[ENV_SETTINGS_FILE], os.environ[MULTIPROC_ENV] = str(root / "settings.json"), str(root / "metrics")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)


def _remove_abandoned_service_dirs() -> None:
    """Private directories of services (this user's) whose parent process is gone. A directory whose
    parent cannot be told is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(SERVICE_DIR_PREFIX + "*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / "parent.pid").read_text())
            if pid > 0:
                os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue


def app_from_env() -> FastAPI:
    """uvicorn's factory for `--workers N`: the settings come from the parent through the environment."""
    return create_app(ServeSettings.from_env())
