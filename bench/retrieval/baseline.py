"""The baseline: what a plain eager-PyTorch + exact-search image search looks like.

* same network and weights as ours (timm `tf_efficientnet_lite0` with the packaged
  EfficientNet-Lite0 weights), in plain eager mode: BatchNorm not folded, NCHW, fp32;
* torchvision's standard evaluation preprocessing: PIL decode, `Resize(256, bicubic)`,
  `CenterCrop(224)`, `ToTensor`, `Normalize` with the weights' own (x - 127) / 128
  (ImageNet mean/std would feed these TF-trained weights the wrong range);
  transparency composited on white (dropping alpha would put clipart on black, a strawman);
* timm's standard pooling: global *average* pooling (`num_classes=0`), L2-normalised;
* one image at a time through decode + transform, batches of 32 through the model;
* every catalog image is embedded (no near-duplicate merging); exact inner-product search
  with `faiss.IndexFlatIP`; hits are collapsed to products, best first.

This module never touches the warehouse or the snapshot: it is given bytes.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.retrieval.queries import flatten_on_white

DESCRIPTION = ("timm tf_efficientnet_lite0 (same packaged weights), eager fp32 NCHW, unfolded BN; torchvision "
               "Resize(256, bicubic)+CenterCrop(224)+Normalize((x-127)/128); alpha on white; global average "
               "pooling; L2; batch 32; faiss IndexFlatIP exact search over every catalog image")


class PlainEmbedder:
    def __init__(self, batch_size: int = 32):
        from torchvision import transforms as T

        from pipelines.embed.model import default_spec, load_classifier

        self.model = load_classifier(default_spec())  # eval mode, CPU, fp32, unfused
        self.model.reset_classifier(0)                 # timm: forward() -> average-pooled features
        self.batch_size = batch_size
        self.transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                                    T.ToTensor(), T.Normalize((127 / 255,) * 3, (128 / 255,) * 3)])

    def _load(self, data: bytes) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.transform(flatten_on_white(Image.open(io.BytesIO(data))))

    def embed(self, blobs: Sequence[bytes]) -> np.ndarray:
        outputs = []
        with torch.no_grad():
            for start in range(0, len(blobs), self.batch_size):
                batch = torch.stack([self._load(data) for data in blobs[start:start + self.batch_size]])
                outputs.append(F.normalize(self.model(batch), dim=1))
        return torch.cat(outputs).numpy().astype(np.float32) if outputs else np.empty((0, 1280), np.float32)


class ExactProductSearch:
    """IndexFlatIP over one vector per distinct image; each vector maps to every product with those bytes."""

    def __init__(self, vectors: np.ndarray, products_of_vector: list[list[tuple[str, str]]]):
        import faiss

        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.products_of_vector = products_of_vector  # vector id -> [(product_id, category), ...]

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
        """Top-k products per query, each once (its best image), best first; ties by product id."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = min(self.index.ntotal, 4 * k)
        scores, ids = self.index.search(queries, depth)
        results = []
        for row in range(len(queries)):
            ranked = self._collapse(scores[row], ids[row])
            if len(ranked) < k and depth < self.index.ntotal:  # many products per image: search it all
                full_scores, full_ids = self.index.search(queries[row:row + 1], self.index.ntotal)
                ranked = self._collapse(full_scores[0], full_ids[0])
            results.append(ranked[:k])
        return results

    def _collapse(self, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        best: dict[str, dict] = {}
        for score, vector_id in zip(scores, ids):
            if vector_id < 0:
                continue
            for product_id, category in self.products_of_vector[vector_id]:
                best.setdefault(product_id, {"product_id": product_id, "category": category,
                                             "score": float(score), "vector_id": int(vector_id)})
        return sorted(best.values(), key=lambda hit: (-hit["score"], hit["product_id"]))
