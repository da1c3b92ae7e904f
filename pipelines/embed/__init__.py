"""Embed stage: canonical images -> L2-normalised vectors in the embeddings cache, on Spark.

Public, light (no torch at import): `run_embed` (the stage), `EmbedSummary`, `EmbedError`,
`spec_from_settings`, `read_embeddings`. Public, loaded on first use because they import torch:
the model (`default_spec`, `model_version`, `ModelSpec`, `Preprocessing`, `PcaProjection`),
the embedder (`get_embedder`, `ImageEmbedder`, `decode_for_model`) and the projection head
(`train_head`, `load_adopted_head`). Modules: stage (driver and Spark tasks), model (weights,
preprocessing, model version), embedder (bytes -> vectors), head (metric-learning head),
loaders (petastorm readers for training).
"""
from importlib import import_module

from pipelines.embed.stage import (
    EmbedError,
    EmbedSummary,
    run_embed,
    spec_from_settings,
)
from pipelines.readers import read_embeddings

# name -> module: these import torch, so they load when first asked for, not with the package
# (`catalog-index --help` and the Spark driver of other stages never pay for torch).
_HEAVY = {
    "default_spec": "model", "model_version": "model", "ModelSpec": "model", "Preprocessing": "model",
    "PcaProjection": "model", "FEATURE_DIM": "model",
    "get_embedder": "embedder", "ImageEmbedder": "embedder", "decode_for_model": "embedder",
    "train_head": "head", "load_adopted_head": "head",
}


def __getattr__(name: str):
    if name in _HEAVY:
        return getattr(import_module(f"pipelines.embed.{_HEAVY[name]}"), name)
    raise AttributeError(f"module 'pipelines.embed' has no attribute {name!r}")


__all__ = ["EmbedError", "EmbedSummary", "run_embed", "spec_from_settings", "read_embeddings", *_HEAVY]
