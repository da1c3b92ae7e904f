"""`catalog-index serve`: an HTTP search service that follows the live snapshot.

    ServeSettings(snapshot_dir="/srv/catalog-index")     # or warehouse="s3://search/warehouse"
    app = create_app(settings)                           # FastAPI; uvicorn runs it (`run_server`)

Modules: settings (what the service is told), live (load, verify, follow and swap snapshots),
model (decode and embed query images, batching concurrent requests), queries (read and check
request bodies: uploads, image URLs through the crawler's guarded fetcher, vectors), metrics
(Prometheus), app (routes, auth, errors), page.html (the search page).

The service trusts nothing it is sent: bodies are read up to a cap, images are decoded with a
pixel cap, and every bad input gets a 4xx with a reason. It trusts nothing it reads from a
warehouse either: a snapshot is served only after `pull` (or the local verification) accepted
it and it opened; a snapshot that fails either is refused and the previous one keeps serving.
This package must never import the index build (`pipelines.index`) nor Spark, Airflow or Great
Expectations: serving hosts install only `requirements-serve.txt`.
"""
from pipelines.serve.app import create_app, run_server
from pipelines.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run_server"]
