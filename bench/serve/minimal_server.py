"""The server a serving team would otherwise write: FastAPI + the same model + one faiss.IndexFlatIP
over the same vectors. No verification, no merge, no limits, no metrics. For bench/serve only.

    python bench/serve/minimal_server.py SNAPSHOT_DIR PORT
"""
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import uvicorn
from fastapi import FastAPI, UploadFile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipelines.client import model_spec_from_manifest  # noqa: E402
from pipelines.embed import decode_for_model, get_embedder  # noqa: E402

root = Path(sys.argv[1]).resolve()
manifest = json.loads((root / "manifest.json").read_text())
spec = model_spec_from_manifest(manifest["model"], root)
embedder = get_embedder(spec, "cpu")
vectors, products = [], []
for shard in manifest["shards"]:
    index = faiss.read_index(str(root / shard["files"]["index"]["path"]))
    vectors.append(index.reconstruct_n(0, index.ntotal))
    table = pq.read_table(root / shard["files"]["idmap"]["path"]).to_pylist()
    first = {}
    for row in table:
        first.setdefault(row["vector_id"], row["product_id"])
    products += [first[i] for i in range(index.ntotal)]
flat = faiss.IndexFlatIP(manifest["dimension"])
flat.add(np.vstack(vectors))
app = FastAPI()


@app.post("/search")
def search(image: UploadFile, k: int = 10):
    pixels = decode_for_model(image.file.read(), spec.preprocessing)
    vector = embedder.embed_pixels(pixels[None])[0]
    vector = vector / np.linalg.norm(vector)
    scores, ids = flat.search(vector[None].astype(np.float32), k)
    return {"results": [{"product_id": products[i], "score": float(s)} for s, i in zip(scores[0], ids[0])]}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
