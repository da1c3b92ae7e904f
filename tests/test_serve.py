"""`catalog-index serve`: a real uvicorn server on 127.0.0.1, real HTTP clients, real snapshots of
sample images embedded with the real model, built and published by the real build code.

What a user would notice: the service answers what `catalog-index search` answers; every bad
request gets a 4xx with a reason (also when sent all at once), never a 500; it follows new
snapshots under load without failing a request, refuses a damaged one and keeps serving, and
loads a new model version with its snapshot; /metrics says all of it.
"""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from pipelines.client import SnapshotClient
from pipelines.layout import snapshot_prefix
from pipelines.serve import ServeSettings
from serving import OPENCLIPART, Service, pulled_catalog

pytestmark = pytest.mark.skipif(not OPENCLIPART.is_dir(), reason="sample catalog (openclipart-png) not installed")

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return pulled_catalog(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def service(catalog):
    settings = ServeSettings(snapshot_dir=str(catalog.dest), port=0, allow_private_image_urls=True,
                             body_timeout_s=1.0, max_upload_bytes=2_000_000, max_k=50)
    with Service(settings) as running:
        yield running


def cli_search(capsys, dest, paths, k, category=None) -> list[dict]:
    import pipelines.cli as cli

    argv = ["search", "--snapshot-dir", str(dest), "--image", *map(str, paths), "--k", str(k), "--json"]
    assert cli.main(argv + (["--category", category] if category else [])) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def ranked(results: list[dict]) -> list[tuple[str, str, str, float]]:
    return [(r["product_id"], r["category"], r["image_url"], round(r["score"], 4)) for r in results]


def test_answers_are_those_of_the_search_cli_for_uploads_urls_and_vectors(catalog, service, capsys, fault_server):
    queries = [catalog.images[i] for i in (0, 6, 13)]
    for category in (None, "tools"):
        expected = cli_search(capsys, catalog.dest, [path for _, _, path in queries], 6, category)
        params = {"k": 6, **({"category": category} if category else {})}
        for (product, _, path), line in zip(queries, expected):
            data = path.read_bytes()
            answers = [
                requests.post(service.url + "/v1/search", params=params, files={"image": (path.name, data)}),
                requests.post(service.url + "/v1/search", params=params, data=data,
                              headers={"Content-Type": "image/png"}),
                requests.post(service.url + "/v1/search", params=params,
                              json={"image_url": fault_server.put(path.name, data)}),
            ]
            for answer in answers:
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["snapshot_id"] == catalog.first["snapshot_id"] == answer.headers["X-Snapshot-Id"]
                assert body["model_version"] == catalog.first["model"]["version"] and body["took_ms"] > 0
                assert ranked(body["results"]) == ranked(line["results"])
                ids = [r["product_id"] for r in body["results"]]
                assert len(ids) == len(set(ids)) == (6 if category is None else 5)  # 5 tools in all
                assert [r["score"] for r in body["results"]] == sorted((r["score"] for r in body["results"]), reverse=True)
                if category is None:
                    assert ids[0] == product and body["results"][0]["score"] > 0.99
    client = SnapshotClient(catalog.dest)
    for key in sorted(catalog.features)[:3]:
        vector = np.asarray(catalog.features[key], dtype=np.float32)
        answer = requests.post(service.url + "/v1/search?k=5", json={"vector": vector.tolist()}).json()
        assert ranked(answer["results"]) == ranked([h.to_json() for h in client.search_vectors(vector, 5)[0]])
    more = requests.get(service.url + f"/v1/similar/{catalog.images[0][0]}", params={"k": 4}).json()
    assert len(more["results"]) == 4 and catalog.images[0][0] not in {r["product_id"] for r in more["results"]}
    info = requests.get(service.url + "/v1/snapshot").json()
    assert info["snapshot_id"] == catalog.first["snapshot_id"] and info["image_search"] and info["memory_mapped"]
    assert info["counts"]["products"] == len(catalog.images) and info["verified"] and info["age_s"] >= 0
    assert info["categories"] == sorted({c for _, c, _ in catalog.images})
    for step in ("fetch", "decode", "embed", "search", "merge"):
        assert service.metric("catalog_index_step_seconds_count", endpoint="/v1/search", step=step) > 0, step
    assert service.metric("catalog_index_snapshot_info", snapshot_id=catalog.first["snapshot_id"]) == 1
    assert service.metric("catalog_index_snapshot_age_seconds") > 0
    docs = requests.get(service.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(service.url + "/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/similar/{product_id}", "/v1/snapshot", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert requests.get(service.url + "/readyz").json()["ready"] is True


def _png(size, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


class Chunked(list):
    """Body parts sent chunked, without a Content-Length."""


def _multipart(boundary: str, body: bytes) -> dict:
    return {"data": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def hostile_requests(catalog, url: str) -> list[tuple[str, str, dict, int, str]]:
    """(name, method+path, requests kwargs, expected status, expected error code)."""
    good = catalog.images[0][2].read_bytes()
    dim = catalog.first["dimension"]
    return [
        ("not an image", "POST /v1/search", {"files": {"image": ("x.png", b"<html>nope</html>")}}, 415, "not_an_image"),
        ("truncated png", "POST /v1/search", {"files": {"image": ("x.png", good[:len(good) // 2])}}, 422, "truncated"),
        ("decompression bomb", "POST /v1/search", {"files": {"image": ("b.png", _png((9000, 9000), "1"))}}, 413,
         "decompression_bomb"),
        ("too large (declared)", "POST /v1/search", {"data": b"\x89PNG" + bytes(2_100_000),
                                                     "headers": {"Content-Type": "image/png"}}, 413, "too_large"),
        ("too large (chunked)", "POST /v1/search", {"data": Chunked([bytes(500_000)] * 5),
                                                    "headers": {"Content-Type": "image/png"}}, 413, "too_large"),
        ("empty body", "POST /v1/search", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty_body"),
        ("unknown category", "POST /v1/search?category=garden", {"files": {"image": ("x.png", good)}}, 422,
         "unknown_category"),
        ("k = 0", "POST /v1/search?k=0", {"files": {"image": ("x.png", good)}}, 422, "invalid_request"),
        ("k past max", "POST /v1/search?k=51", {"files": {"image": ("x.png", good)}}, 422, "invalid_request"),
        ("k not a number", "POST /v1/search?k=ten", {"files": {"image": ("x.png", good)}}, 422, "invalid_request"),
        ("wrong dimension", "POST /v1/search", {"json": {"vector": [0.1] * (dim - 1)}}, 422, "wrong_dimension"),
        ("NaN vector", "POST /v1/search", {"data": b'{"vector": [NaN, 1.0]}',
                                           "headers": {"Content-Type": "application/json"}}, 422, "bad_vector"),
        ("zero vector", "POST /v1/search", {"json": {"vector": [0.0] * dim}}, 422, "bad_vector"),
        ("vector of strings", "POST /v1/search", {"json": {"vector": ["a"] * dim}}, 422, "bad_vector"),
        ("bad json", "POST /v1/search", {"data": b'{"vector": [1,', "headers": {"Content-Type": "application/json"}},
         400, "bad_json"),
        ("deep json", "POST /v1/search", {"data": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
         400, "bad_json"),
        ("both inputs", "POST /v1/search", {"json": {"vector": [1.0] * dim, "image_url": "http://a.example/x"}},
         400, "bad_query"),
        ("text body", "POST /v1/search", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("multipart without image", "POST /v1/search", {"files": {"photo": ("x.png", good)}}, 400, "missing_image"),
        ("broken multipart", "POST /v1/search", _multipart("zz", b"--zz\r\nContent-Disposition: form-data\r\n\r\nx"),
         400, "bad_multipart"),
        ("image_url to a metadata address", "POST /v1/search", {"json": {"image_url": "http://169.254.169.254/x"}},
         422, "image_url_failed"),
        ("image_url file://", "POST /v1/search", {"json": {"image_url": "file:///etc/passwd"}}, 422, "bad_image_url"),
        ("image_url 404", "POST /v1/search", {"json": {"image_url": url + "/no-such-image.png"}}, 422,
         "image_url_failed"),
        ("image_url not an image", "POST /v1/search", {"json": {"image_url": url + "/openapi.json"}}, 415,
         "not_an_image"),
        ("unknown product", "GET /v1/similar/no-such-product", {}, 404, "unknown_product"),
        ("similar k past max", "GET /v1/similar/x?k=500", {}, 422, "invalid_request"),
        ("unknown path", "GET /v2/nothing", {}, 404, "not_found"),
        ("wrong method", "GET /v1/search", {}, 405, "method_not_allowed"),
    ]


def _send(service, method_path: str, kwargs: dict) -> requests.Response:
    method, path = method_path.split(" ", 1)
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("data"), Chunked):
        kwargs["data"] = iter(kwargs["data"])  # a generator: sent with Transfer-Encoding: chunked
    return requests.request(method, service.url + path, timeout=30, **kwargs)


def test_bad_input_gets_a_clear_4xx_one_by_one_and_all_at_once(catalog, service):
    cases = hostile_requests(catalog, service.url)
    for name, method_path, kwargs, status, code in cases:
        answer = _send(service, method_path, kwargs)
        assert (answer.status_code, answer.json().get("error")) == (status, code), (name, answer.text[:300])
        assert len(answer.json().get("detail", "")) > 10, name  # says what is wrong
    good = catalog.images[1][2].read_bytes()
    mixed = cases * 2 + [("good", "POST /v1/search?k=3", {"files": {"image": ("g.png", good)}}, 200, None)] * 16
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda case: (case, _send(service, case[1], case[2])), mixed))
    for (name, _, _, status, code), answer in answers:
        assert answer.status_code == status, (name, answer.text[:300])
        if status == 200:
            assert answer.json()["results"][0]["product_id"] == catalog.images[1][0]
    # A client that sends headers and then trickles nothing gets 408 once the body deadline passes.
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
        reply = raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    text = requests.get(service.url + "/metrics").text
    assert 'status="5' not in text and 'status="413"' in text and 'status="415"' in text


def test_api_key_guards_everything_but_healthz(catalog):
    key_settings = ServeSettings(snapshot_dir=str(catalog.dest), port=0, api_key=KEY)
    with Service(key_settings) as service:
        image = {"files": {"image": ("q.png", catalog.images[2][2].read_bytes())}}
        assert requests.get(service.url + "/healthz").status_code == 200
        for path in ("/v1/snapshot", "/metrics", "/readyz", "/docs", "/openapi.json", "/", "/v1/similar/x"):
            answer = requests.get(service.url + path)
            assert answer.status_code == 401 and "WWW-Authenticate" in answer.headers, path
            assert requests.get(service.url + path, headers={"Authorization": "Bearer wrong-key-0123456789"}
                                ).status_code == 401, path
        assert requests.post(service.url + "/v1/search", **image).status_code == 401
        assert requests.post(service.url + "/v1/reload").status_code == 401
        answer = requests.post(service.url + "/v1/search", headers={"Authorization": f"Bearer {KEY}"}, **image)
        assert answer.status_code == 200 and answer.json()["results"][0]["product_id"] == catalog.images[2][0]
        assert requests.get(service.url + "/", auth=("anyone", KEY)).status_code == 200  # the browser's prompt
        assert requests.get(service.url + "/", auth=("anyone", "not-the-key")).status_code == 401
        assert service.metric("catalog_index_requests_total", headers={"Authorization": f"Bearer {KEY}"},
                              endpoint="/v1/search", status="401") == 1


def test_a_bug_of_ours_is_a_logged_json_500_that_is_counted_and_the_service_keeps_serving(catalog, caplog):
    """The last-resort path: an exception no handler knows (here the loaded snapshot's search breaks)
    answers a JSON 500 that says it is logged, /metrics counts it, and the next request is served."""
    with Service(ServeSettings(snapshot_dir=str(catalog.dest), port=0, workers=1)) as service:
        snapshot = service.app.state.live.current.snapshot
        product = catalog.images[1][0]

        def broken(*args, **kwargs):
            raise RuntimeError("an internal bug")

        snapshot.similar_products = broken
        answer = requests.get(f"{service.url}/v1/similar/{product}")
        assert answer.status_code == 500
        assert answer.json() == {"error": "internal", "detail": "the service failed on this request; it is logged"}
        assert "an internal bug" in caplog.text
        del snapshot.similar_products
        answer = requests.get(f"{service.url}/v1/similar/{product}")
        assert answer.status_code == 200 and answer.json()["results"]
        assert service.metric("catalog_index_requests_total", endpoint="/v1/similar/{product_id}", status="500") == 1
        assert service.metric("catalog_index_requests_total", endpoint="/v1/similar/{product_id}", status="200") == 1


def test_follows_latest_under_load_refuses_a_damaged_snapshot_and_swaps_models(catalog, tmp_path):
    """--warehouse: new snapshots are pulled and swapped while clients search (no request fails); a
    snapshot whose shard was damaged after publishing is refused and the old one keeps serving; a
    snapshot of another model version is served with that model."""
    settings = ServeSettings(warehouse=catalog.uri, cache_dir=str(tmp_path / "cache"), port=0, refresh_s=0.3)
    images = [(product, path.read_bytes()) for product, _, path in catalog.images[:6]]
    with Service(settings) as service:
        served, failures, stop = set(), [], threading.Event()

        def client(number: int) -> None:
            while not stop.is_set():
                product, data = images[number % len(images)]
                answer = requests.post(service.url + "/v1/search?k=3", files={"image": ("q.png", data)}, timeout=30)
                body = answer.json()
                if answer.status_code != 200 or body["results"][0]["product_id"] != product:
                    failures.append((answer.status_code, answer.text[:200]))
                served.add(body.get("snapshot_id"))
                number += 1

        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in clients:
            thread.start()
        try:
            second = catalog.publish()
            _wait_for(service, second["snapshot_id"])
            time.sleep(1.0)  # searches on the new snapshot

            # Damaged after publishing (same size, other bytes) before the follower looks: its reload
            # lock is held meanwhile, or a follower quicker than this test would pull the good bytes.
            with service.app.state.live._reload_lock:
                third = catalog.publish()
                shard_file = third["shards"][0]["files"]["index"]["path"]
                key = snapshot_prefix("catalog", third["snapshot_id"]) + shard_file
                data = bytearray(catalog.storage.read_bytes(key))
                data[len(data) // 2] ^= 0xFF
                catalog.storage.write_bytes(key, bytes(data))
            deadline = time.monotonic() + 30
            while service.metric("catalog_index_reloads_total", outcome="refused") < 1:
                assert time.monotonic() < deadline, "the damaged snapshot was never refused"
                time.sleep(0.2)
            assert service.metric("catalog_index_refused_snapshot_info", snapshot_id=third["snapshot_id"],
                                  reason="verification") > 0
            assert requests.get(service.url + "/v1/snapshot").json()["snapshot_id"] == second["snapshot_id"]
            reload = requests.post(service.url + "/v1/reload")
            assert reload.status_code == 409 and reload.json()["outcome"] == "refused"
            assert shard_file in reload.json()["detail"] and reload.json()["serving"] == second["snapshot_id"]
        finally:
            stop.set()
            for thread in clients:
                thread.join(60)
        assert not failures, failures[:3]
        assert {catalog.first["snapshot_id"], second["snapshot_id"]} <= served and third["snapshot_id"] not in served

        pca = catalog.pca_spec(dim=8)
        fourth = catalog.publish(pca)
        assert fourth["model"]["version"] != catalog.first["model"]["version"] and fourth["dimension"] == 8
        _wait_for(service, fourth["snapshot_id"])
        product, data = images[2]
        answer = requests.post(service.url + "/v1/search?k=3", files={"image": ("q.png", data)}).json()
        assert answer["model_version"] == fourth["model"]["version"]
        assert answer["results"][0]["product_id"] == product and answer["results"][0]["score"] > 0.99
        assert requests.post(service.url + "/v1/search", json={"vector": [0.5] * 1280}).status_code == 422
        assert requests.post(service.url + "/v1/search", json={"vector": [0.5] * 8}).status_code == 200
        assert service.metric("catalog_index_reloads_total", outcome="loaded") == 3
        assert 'status="5' not in requests.get(service.url + "/metrics").text


def _wait_for(service, snapshot_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(service.url + "/v1/snapshot").json()["snapshot_id"] != snapshot_id:
        assert time.monotonic() < deadline, f"snapshot {snapshot_id} was never served"
        time.sleep(0.1)
