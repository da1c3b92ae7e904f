"""Projection head: a small linear map trained on frozen embeddings, adopted only if it helps.

`train_head` takes the canonical images of a dedup run that have a vector for the base model
version, labels each with its category, splits them by product (a product, and every image
it shares with other products, lands wholly in train or wholly in held-out), and trains
`ProjectionHead` (Linear(d -> dim, no bias) + L2 norm, initialised to the training set's top
`dim` principal directions) with a supervised contrastive loss (Khosla et al. 2020) on batches
streamed by petastorm (`pipelines.petastorm_loaders`). Training is deterministic for a seed.

Evaluation, `precision_at_k`: every held-out image queries the other held-out images by exact
cosine similarity; precision@10 is the fraction of its 10 nearest neighbours with the same
category, averaged over queries. The gallery is the held-out split alone, so neither side of a
comparison was seen in training; it is computed the same way for the raw vectors and the head.

The head is adopted only if its precision@10 beats the raw vectors' by at least `min_gain`
and by more than two standard errors of the paired per-query differences (a head that only
wins by noise is not worth a new index). Outputs, through Storage:

    models/heads/<head_version>/head.pt       state dict + dims + base model version (adopted heads only)
    models/heads/<head_version>/metrics.json
    models/heads/ADOPTED.json                 the latest decision: the head to apply, or "not adopted"
                                              with the numbers (then consumers use raw vectors)

Category precision is the gate, not the whole story: a head pulled towards categories can blur
visual near-matches inside a category, so look at search results before serving one.

This module must never change the embeddings cache or the dedup tables, and never adopt a head
without the held-out comparison that justifies it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from pipelines import layout
from pipelines.config import HeadSettings  # noqa: F401  (re-exported: the head's public settings)
from pipelines.embed.loaders import open_embedding_loader, read_labelled_vectors
from pipelines.embed.stage import spec_from_settings
from pipelines.errors import StageRefused
from pipelines.readers import read_dedup_images, read_embeddings
from pipelines.storage import Storage, open_storage

HEADS_PREFIX = layout.HEADS_PREFIX
ADOPTED_KEY = layout.ADOPTED_HEAD_KEY
ARCHITECTURE = "linear-l2"


class HeadError(StageRefused):
    """train-head cannot run on this input; the message says what to do."""


@dataclass
class HeadResult:
    run_id: str
    base_model_version: str
    adopted: bool
    head_version: str | None
    raw_precision_at_k: float
    head_precision_at_k: float
    gain: float
    gain_stderr: float
    chance_precision_at_k: float
    k: int
    train_images: int
    heldout_images: int
    train_products: int
    heldout_products: int
    categories: int
    images_without_vector: int
    epochs: int
    seed: int
    dim: int
    final_loss: float
    epoch_losses: list[float]
    settings: dict
    elapsed_s: float = 0.0
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# -- the model ---------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """Linear(in_dim -> dim, no bias) then L2 normalisation: cosine search stays cosine search."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.projection = nn.Linear(in_dim, dim, bias=False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(vectors), dim=1)


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon: for every anchor, -mean log-softmax over the batch of its same-label partners.

    Anchors without a partner in the batch carry no signal and are left out.
    """
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_partner = counts > 0
    if not has_partner.any():
        return embeddings.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_partner] / counts[has_partner]
    return per_anchor.mean()


# -- labels, split, metric -----------------------------------------------------------------------

def canonical_categories(dedup: pd.DataFrame) -> pd.Series:
    """canonical sha256 -> category: the most common category of the rows it stands for (ties: first by name)."""
    counts = dedup.groupby(["canonical_sha256", "category"]).size().reset_index(name="rows")
    counts = counts.sort_values(["canonical_sha256", "rows", "category"], ascending=[True, False, True])
    return counts.drop_duplicates("canonical_sha256").set_index("canonical_sha256")["category"]


def split_by_product(dedup: pd.DataFrame, images: set[str], holdout: float,
                     seed: int) -> tuple[set[str], set[str], int, int]:
    """(train sha256s, held-out sha256s, train products, held-out products) over `images`.

    Products and the canonical images they use form connected groups (two products sharing an
    image are one group); whole groups go to one side, in a seeded random order, until the
    held-out side holds `holdout` of the images.
    """
    rows = dedup[dedup["canonical_sha256"].isin(images)][["product_id", "canonical_sha256"]].drop_duplicates()
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        root = node
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    for product, sha in zip(rows["product_id"], rows["canonical_sha256"]):
        a, b = find("p:" + product), find("i:" + sha)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for node in list(parent):
        groups.setdefault(find(node), []).append(node)
    ordered = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(ordered))
    target = holdout * len(images)
    heldout_images: set[str] = set()
    heldout_products = train_products = 0
    train_images: set[str] = set()
    for index in order:
        members = groups[ordered[index]]
        shas = {m[2:] for m in members if m.startswith("i:")}
        products = sum(1 for m in members if m.startswith("p:"))
        if len(heldout_images) < target:
            heldout_images |= shas
            heldout_products += products
        else:
            train_images |= shas
            train_products += products
    return train_images, heldout_images, train_products, heldout_products


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = 10, block: int = 1024) -> np.ndarray:
    """Per-query category precision@k of exact cosine kNN within `vectors` (each query excludes itself)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    count = len(vectors)
    k = min(k, count - 1)
    if k < 1:
        raise HeadError("precision@k needs at least 2 held-out images")
    matrix = torch.from_numpy(vectors)
    label_tensor = torch.from_numpy(np.asarray(labels))
    result = []
    for start in range(0, count, block):
        similarity = matrix[start:start + block] @ matrix.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = float("-inf")
        neighbours = similarity.topk(k, dim=1).indices
        result.append((label_tensor[neighbours] == label_tensor[start:start + block, None]).float().mean(dim=1))
    return torch.cat(result).numpy()


def chance_precision(labels: np.ndarray) -> float:
    """Expected precision@k of neighbours drawn at random from the same gallery (for context)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return float(np.mean((counts[inverse] - 1) / max(1, len(labels) - 1)))


# -- training ----------------------------------------------------------------------------------

def principal_directions(storage: Storage, model_version: str, labels: Mapping[str, int], dim: int,
                         local_parts_dir: str | None = None) -> np.ndarray:
    """Top-`dim` eigenvectors of the training vectors' second-moment matrix, streamed (dim, in_dim).

    Starting there, the head's first epoch already ranks about like the raw vectors do; the
    loss then only has to move it towards the categories.
    """
    moment = None
    count = 0
    with open_embedding_loader(storage, model_version, labels, batch_size=4096, shuffle=False,
                               local_parts_dir=local_parts_dir) as loader:
        for batch in loader:
            x = batch["vector"].double()
            moment = x.T @ x if moment is None else moment + x.T @ x
            count += len(x)
    if moment is None:
        raise HeadError("no training vectors")
    if dim > moment.shape[0]:
        raise HeadError(f"--dim {dim} is larger than the embedding dimension {moment.shape[0]}")
    # numpy's LAPACK eigh: several times faster than torch's on this CPU for a 1280 x 1280 matrix
    _, eigenvectors = np.linalg.eigh((moment / count).numpy())  # ascending eigenvalues
    top = eigenvectors[:, ::-1][:, :dim].T
    signs = np.sign(top[np.arange(dim), np.abs(top).argmax(axis=1)])  # a fixed sign per direction
    return np.ascontiguousarray(top * signs[:, None], dtype=np.float32)


def train_projection_head(storage: Storage, model_version: str, labels: Mapping[str, int], settings: HeadSettings,
                          on_epoch=None, local_parts_dir: str | None = None) -> tuple[ProjectionHead, list[float]]:
    """Train a ProjectionHead on the labelled vectors; returns it (eval mode) and the mean loss per epoch.

    `local_parts_dir` keeps S3 parts on disk across epochs (see open_embedding_loader).
    """
    with _torch_threads(1):
        return _train(storage, model_version, labels, settings, on_epoch, local_parts_dir)


@contextlib.contextmanager
def _torch_threads(count: int):
    # The head's matrices are tiny: a second intra-op thread buys nothing, and on a busy
    # machine spinning OpenMP threads made every backward pass ~10x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(storage, model_version, labels, settings, on_epoch, local_parts_dir):
    init = principal_directions(storage, model_version, labels, settings.dim, local_parts_dir)
    torch.manual_seed(settings.seed)  # nothing is random in the model today; any future dropout stays seeded
    head = ProjectionHead(init.shape[1], settings.dim)
    with torch.no_grad():
        head.projection.weight.copy_(torch.from_numpy(init))
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    losses = []
    for epoch in range(settings.epochs):
        head.train()
        # A fresh, differently seeded shuffle each epoch, reproducible from (seed, epoch).
        epoch_seed = int(np.random.SeedSequence([settings.seed, epoch]).generate_state(1)[0] >> 1)
        total, batches = 0.0, 0
        with open_embedding_loader(storage, model_version, labels, batch_size=settings.batch_size,
                                   seed=epoch_seed, local_parts_dir=local_parts_dir) as loader:
            for batch in loader:
                if len(batch["label"]) < 2:
                    continue
                loss = supervised_contrastive_loss(head(batch["vector"]), batch["label"], settings.temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
        losses.append(round(total / max(1, batches), 5))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return head.eval(), losses


def project(head: ProjectionHead, vectors: np.ndarray, block: int = 8192) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([head(torch.from_numpy(np.ascontiguousarray(vectors[start:start + block], dtype=np.float32)))
                          for start in range(0, len(vectors), block)]).numpy()


# -- the command -------------------------------------------------------------------------------

def train_head(settings, run_id: str, head_settings: HeadSettings = HeadSettings(), *,
               model_version: str | None = None, progress=None) -> HeadResult:
    """Train, compare on the held-out split, save and adopt only when the head wins. See the module doc.

    `progress(epoch, mean_loss)` is called after every epoch.
    """
    started = time.monotonic()
    storage = open_storage(settings.warehouse, settings.s3)
    if model_version is None:
        # torch: kept out of import time
        from pipelines.embed.model import model_version as version_of

        model_version = version_of(spec_from_settings(settings.embed))
    dedup = read_dedup_images(storage, run_id)
    categories_of = canonical_categories(dedup)
    embedded = set(read_embeddings(storage, model_version, columns=["sha256"])["sha256"])
    images = set(categories_of.index) & embedded
    if not images:
        raise HeadError(f"no canonical image of dedup run {run_id} has a vector for model version {model_version} "
                        f"in {storage.uri}: run `catalog-index embed --run-id {run_id}` first")
    names = sorted(set(categories_of[sorted(images)]))
    if len(names) < 2:
        raise HeadError(f"dedup run {run_id} has a single category ({names[0]}): there is nothing to separate")
    label_of = {name: index for index, name in enumerate(names)}
    train_images, heldout_images, train_products, heldout_products = split_by_product(
        dedup, images, head_settings.holdout, head_settings.seed)
    if len(heldout_images) < 2 or len(train_images) < 2:
        raise HeadError(f"{len(images)} images give {len(train_images)} for training and {len(heldout_images)} "
                        f"held out at --holdout {head_settings.holdout}: need at least 2 on each side")
    train_labels = {sha: label_of[categories_of[sha]] for sha in train_images}
    heldout_labels = {sha: label_of[categories_of[sha]] for sha in heldout_images}

    # One download of the embeddings parts for every pass below (a no-op for local warehouses).
    with tempfile.TemporaryDirectory(prefix="catalog-index-head-") as parts_dir:
        _, heldout_vectors, heldout_y = read_labelled_vectors(storage, model_version, heldout_labels,
                                                              local_parts_dir=parts_dir)
        raw = precision_at_k(heldout_vectors, heldout_y, head_settings.k)
        head, losses = train_projection_head(storage, model_version, train_labels, head_settings, progress,
                                             local_parts_dir=parts_dir)
    projected = precision_at_k(project(head, heldout_vectors), heldout_y, head_settings.k)
    differences = projected - raw
    gain = float(differences.mean())
    # Queries share neighbours, so this standard error is somewhat optimistic; min_gain backs it up.
    stderr = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else float("inf")
    adopted = gain >= head_settings.min_gain and gain > 2 * stderr

    result = HeadResult(
        run_id=run_id, base_model_version=model_version, adopted=adopted, head_version=None,
        raw_precision_at_k=round(float(raw.mean()), 4), head_precision_at_k=round(float(projected.mean()), 4),
        gain=round(gain, 4), gain_stderr=round(stderr, 4), chance_precision_at_k=round(chance_precision(heldout_y), 4),
        k=min(head_settings.k, len(heldout_y) - 1), train_images=len(train_images), heldout_images=len(heldout_images),
        train_products=train_products, heldout_products=heldout_products, categories=len(names),
        images_without_vector=len(set(categories_of.index) - embedded), epochs=head_settings.epochs,
        seed=head_settings.seed, dim=head_settings.dim, final_loss=losses[-1], epoch_losses=losses,
        settings=asdict(head_settings))
    if adopted:
        result.head_version = head_version(model_version, head, head_settings)
        prefix = layout.head_prefix(result.head_version)
        result.elapsed_s = round(time.monotonic() - started, 3)
        storage.write_bytes(prefix + "head.pt", head_bytes(head, model_version, result.head_version, names))
        storage.write_text(prefix + "metrics.json", result.to_json())
    result.elapsed_s = round(time.monotonic() - started, 3)
    decision = {"adopted": adopted, "head_version": result.head_version,
                "head_key": f"{layout.head_prefix(result.head_version)}head.pt" if adopted else None,
                "reason": None if adopted else _not_adopted_reason(result, head_settings),
                "metrics": json.loads(result.to_json())}
    storage.write_text(ADOPTED_KEY, json.dumps(decision, indent=2, sort_keys=True))  # written last: the pointer
    return result


def _not_adopted_reason(result: HeadResult, head_settings: HeadSettings) -> str:
    if result.gain < head_settings.min_gain:
        return (f"precision@{result.k} {result.head_precision_at_k} (head) vs {result.raw_precision_at_k} (raw): "
                f"gain {result.gain} is below {head_settings.min_gain}")
    return f"gain {result.gain} is within two standard errors ({result.gain_stderr}) of zero: not a reliable win"


def head_version(model_version: str, head: ProjectionHead, head_settings: HeadSettings) -> str:
    """`<base model version>-head-<12 hex>`: digest of the weights and the settings that made them."""
    hasher = hashlib.sha256(json.dumps(asdict(head_settings), sort_keys=True).encode())
    for name, tensor in sorted(head.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().contiguous().numpy().tobytes())
    return f"{model_version}-head-{hasher.hexdigest()[:12]}"


def head_bytes(head: ProjectionHead, model_version: str, version: str, categories: list[str]) -> bytes:
    buffer = io.BytesIO()
    weight = head.projection.weight
    torch.save({"architecture": ARCHITECTURE, "head_version": version, "base_model_version": model_version,
                "in_dim": int(weight.shape[1]), "dim": int(weight.shape[0]), "categories": categories,
                "state_dict": head.state_dict()}, buffer)
    return buffer.getvalue()


def load_adopted_head(storage: Storage) -> tuple[ProjectionHead, dict] | None:
    """The adopted head (eval mode) and its ADOPTED.json record, or None when raw vectors are to be used."""
    if not storage.exists(ADOPTED_KEY):
        return None
    decision = json.loads(storage.read_text(ADOPTED_KEY))
    if not decision.get("adopted"):
        return None
    saved = torch.load(io.BytesIO(storage.read_bytes(decision["head_key"])), map_location="cpu", weights_only=True)
    if saved.get("architecture") != ARCHITECTURE:
        raise HeadError(f"{decision['head_key']} holds a {saved.get('architecture')!r} head; "
                        f"this version reads {ARCHITECTURE!r} heads")
    head = ProjectionHead(saved["in_dim"], saved["dim"])
    head.load_state_dict(saved["state_dict"])
    return head.eval(), decision
