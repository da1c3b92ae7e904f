"""Turn image bytes into embedding vectors, one batch stream (a Spark partition) at a time.

`ImageEmbedder.embed_frames` is the plain function the embed stage maps over partitions:
pandas frames of (sha256, image bytes) in, frames of (sha256, vector) out, plus the
images that could not be decoded with a reason code. Decoding runs in a thread pool one
batch ahead of the model, so the CPU never waits for one while doing the other.

This module must never crash on a bad image (it reports it and moves on), never pick a
GPU on its own (the Spark task's resources do; see `model.choose_device`), and never
preprocess in a way the spec does not describe (the spec is what `model_version` hashes).
The one tolerated difference: on CUDA, nvJPEG + GPU resize + fp16 give vectors within
cosine ~0.99 of the CPU path (median 0.999 on the benchmark set), not bit-equal ones.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageChops

from pipelines.decode import (
    DECODE_ERRORS,
    ImageDecodeError,
    decode_failure,
    flatten_alpha,
    open_image,
)
from pipelines.embed.model import (
    FEATURE_DIM,
    ModelSpec,
    PcaProjection,
    Preprocessing,
    load_embedding_model,
    model_version,
    pixels_to_input,
)
from pipelines.spark import task_cpus
from schemas.reasons import CORRUPT, DECOMPRESSION_BOMB, NOT_AN_IMAGE, TRUNCATED  # noqa: F401 (re-exported)

EMBEDDING_COLUMNS = ["sha256", "vector"]
FAILURE_COLUMNS = ["sha256", "reason", "detail"]

_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "lanczos": Image.Resampling.LANCZOS}


def center_crop_box(width: int, height: int, preprocessing: Preprocessing) -> tuple[float, float, float, float]:
    """The source rectangle that "resize shorter side, then center crop" would keep.

    Same arithmetic as torchvision's Resize(int) + CenterCrop, expressed in source
    pixels so that PIL can crop and resize in a single pass.
    """
    short, long = (width, height) if width <= height else (height, width)
    resized_short = preprocessing.resize_shorter
    resized_long = int(resized_short * long / short)
    resized_w, resized_h = (resized_short, resized_long) if width <= height else (resized_long, resized_short)
    crop = preprocessing.crop
    left = int(round((resized_w - crop) / 2.0))
    top = int(round((resized_h - crop) / 2.0))
    scale_x, scale_y = width / resized_w, height / resized_h
    return (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)


def trim_layout(content: tuple[int, int, int, int], preprocessing: Preprocessing) -> tuple[int, int, int, int]:
    """Where the trimmed content goes in the crop x crop frame: (left, top, width, height).

    Its longer side fills the frame less `trim_padding` on each side; it is centred, and the
    rest of the frame is background (a wide product is letterboxed, never cut)."""
    left, top, right, bottom = content
    content_w, content_h = max(1, right - left), max(1, bottom - top)
    frame = preprocessing.crop
    scale = frame * (1 - 2 * preprocessing.trim_padding) / max(content_w, content_h)
    width = min(frame, max(1, int(round(content_w * scale))))
    height = min(frame, max(1, int(round(content_h * scale))))
    return (frame - width) // 2, (frame - height) // 2, width, height


def content_box(image: Image.Image, preprocessing: Preprocessing) -> tuple[int, int, int, int]:
    """The smallest box holding every pixel that differs from the background by more than
    `trim_tolerance` on some channel; the whole image when there is no such pixel (a blank
    image stays a blank image)."""
    background = Image.new("RGB", image.size, preprocessing.background)
    tolerance = preprocessing.trim_tolerance
    mask = ImageChops.difference(image, background).point(lambda v: 255 if v > tolerance else 0)
    return mask.getbbox() or (0, 0, image.width, image.height)


def _trimmed_frame(image: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    """`framing="trim"`: the content box, resized whole and centred on a background frame."""
    box = content_box(image, preprocessing)
    left, top, width, height = trim_layout(box, preprocessing)
    resized = image.resize((width, height), _RESAMPLING[preprocessing.interpolation], box=box,
                           reducing_gap=preprocessing.reducing_gap)
    frame = Image.new("RGB", (preprocessing.crop, preprocessing.crop), preprocessing.background)
    frame.paste(resized, (left, top))
    return frame


def trimmed_frame_tensor(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """`framing="trim"` for a decoded CHW uint8 RGB tensor on any device (the nvJPEG path):
    the same content box and layout as the PIL path, resized with torchvision."""
    from torchvision.transforms.v2 import functional as TF

    background = torch.tensor(preprocessing.background, dtype=torch.int16, device=image.device)
    differs = (image.to(torch.int16) - background[:, None, None]).abs().amax(0) > preprocessing.trim_tolerance
    rows, cols = differs.any(1).nonzero(), differs.any(0).nonzero()
    height, width = image.shape[-2:]
    if len(rows):
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    else:
        box = (0, 0, int(width), int(height))
    left, top, out_w, out_h = trim_layout(box, preprocessing)
    content = TF.resize(image[:, box[1]:box[3], box[0]:box[2]], [out_h, out_w],
                        interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    frame = background.to(torch.uint8)[:, None, None].expand(3, preprocessing.crop, preprocessing.crop).clone()
    frame[:, top:top + out_h, left:left + out_w] = content
    return frame


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB, with any transparency composited on `background` (a product shot on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    image = flatten_alpha(image, background)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_for_model(data: bytes, preprocessing: Preprocessing, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes -> (crop, crop, 3) uint8 RGB, exactly as the model expects it.

    JPEGs are decoded at reduced size in the DCT domain (`draft`), never below the
    resize target. Raises ImageDecodeError with a reason code; nothing else escapes.
    `max_pixels`: images whose header declares more are a decompression_bomb (the crawl
    checked stored images already; the search service passes its limit for uploads).
    """
    def draft(width: int, height: int):
        if not preprocessing.jpeg_draft:
            return None
        # draft picks the largest 1/2, 1/4, 1/8 scale that keeps both sides >= the request
        factor = preprocessing.resize_shorter / min(width, height)
        return "RGB", (int(np.ceil(width * factor)), int(np.ceil(height * factor)))

    header_size: list[int] = []
    image = open_image(data, max_pixels=max_pixels, draft=draft,
                       check=lambda opened: header_size.extend(opened.size))
    width, height = header_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about EXIF/palette quirks we handle anyway
            if image.mode != "RGB":
                # before resizing: palettes resample as nearest-neighbour, and alpha needs compositing
                image = _to_rgb(image, preprocessing.background)
            if preprocessing.framing == "trim":
                framed = _trimmed_frame(image, preprocessing)
            else:
                # The crop is computed on the original size and scaled to the drafted one: computed
                # on the drafted size, rounding moves it by up to a pixel, which sharp-edged product
                # graphics notice (cosine 0.97 instead of 0.999 against a full-size decode).
                left, top, right, bottom = center_crop_box(width, height, preprocessing)
                scale_x, scale_y = image.width / width, image.height / height
                box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
                size = (preprocessing.crop, preprocessing.crop)
                framed = image.resize(size, _RESAMPLING[preprocessing.interpolation], box=box,
                                      reducing_gap=preprocessing.reducing_gap)
            pixels = np.array(framed, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays
    except DECODE_ERRORS as exc:
        raise decode_failure(exc) from None
    if pixels.shape != (preprocessing.crop, preprocessing.crop, 3):
        raise ImageDecodeError(CORRUPT, f"decoded to unexpected shape {pixels.shape}")
    return pixels


@dataclass
class EmbeddedBatch:
    """One model batch: vectors for the images that decoded, reasons for those that did not."""
    embeddings: pd.DataFrame  # sha256: str, vector: np.ndarray (float32 or float16)
    failures: pd.DataFrame    # sha256: str, reason: str, detail: str


def default_cpu_budget() -> int:
    """Cores this task may use: spark.task.cpus inside a Spark task, else the whole machine."""
    cpus = task_cpus()
    if cpus is not None:
        return cpus
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class ImageEmbedder:
    """A loaded model plus the decode pool that feeds it; create once per process, reuse per partition.

    CPU: fp32, BN folded, channels_last, `inference_mode`, `cpu_budget` intra-op threads
    and a decode pool running one batch ahead (decoding mostly releases the GIL).
    CUDA: fp16 autocast, pinned staging buffer, non-blocking copies, and JPEGs decoded on
    the GPU with nvJPEG when `gpu_jpeg_decode` (other formats and failures go through PIL).
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu", batch_size: int | None = None,
                 cpu_budget: int | None = None, decode_threads: int | None = None,
                 vector_dtype: str = "float32", gpu_jpeg_decode: bool = True):
        if vector_dtype not in ("float32", "float16"):
            raise ValueError(f"vector_dtype must be float32 or float16, got {vector_dtype!r}")
        self.spec = spec
        self.version = model_version(spec)
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.cpu_budget = cpu_budget or default_cpu_budget()
        # 64 keeps the 2-core CPU's caches busy without much memory; GPUs want far more in flight.
        self.batch_size = batch_size or (256 if self.on_cuda else 64)
        # On CPU decode competes with the model for cores, and the model is ~5x the work, so
        # one decode thread per two cores keeps the model fed; on GPU the CPU only decodes.
        self.decode_threads = decode_threads or (self.cpu_budget if self.on_cuda else max(1, self.cpu_budget // 2))
        self.vector_dtype = np.dtype(vector_dtype)
        self.gpu_jpeg_decode = gpu_jpeg_decode and self.on_cuda and _nvjpeg_available()
        if not self.on_cuda:
            torch.set_num_threads(self.cpu_budget)
        else:
            torch.backends.cudnn.benchmark = True  # every batch has the same shape
        self.model = load_embedding_model(spec, self.device)
        crop = spec.preprocessing.crop
        self._staging = (torch.empty((self.batch_size, crop, crop, 3), dtype=torch.uint8).pin_memory()
                         if self.on_cuda else None)
        self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- public entry points -------------------------------------------------------------

    def embed_frames(self, frames: Iterable[pd.DataFrame]) -> Iterator[EmbeddedBatch]:
        """Frames with columns `sha256`, `image` (bytes) -> one EmbeddedBatch per model batch."""
        def rows() -> Iterator[tuple[str, bytes]]:
            for frame in frames:
                missing = {"sha256", "image"} - set(frame.columns)
                if missing:
                    raise KeyError(f"embedding input needs columns sha256 and image; missing {sorted(missing)} "
                                   f"(found: {', '.join(map(str, frame.columns))})")
                yield from zip(frame["sha256"].tolist(), frame["image"].tolist())
        return self.embed_images(rows())

    def embed_images(self, items: Iterable[tuple[str, bytes]]) -> Iterator[EmbeddedBatch]:
        """(sha256, bytes) pairs -> EmbeddedBatch per model batch, decoding one batch ahead."""
        in_flight: deque[tuple[list[str], list[Future]]] = deque()
        for chunk in _chunks(items, self.batch_size):
            in_flight.append(self._start_decoding(chunk))
            if len(in_flight) > 1:  # the batch before this one is (mostly) decoded by now
                yield self._finish(*in_flight.popleft())
        while in_flight:
            yield self._finish(*in_flight.popleft())

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 RGB -> (N, dim) float32 vectors; no decoding involved."""
        with torch.inference_mode():
            return self._run_model(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()

    # -- internals -----------------------------------------------------------------------

    def _start_decoding(self, chunk: list[tuple[str, bytes]]) -> tuple[list[str], list[Future]]:
        keys = [sha for sha, _ in chunk]
        preprocessing = self.spec.preprocessing
        futures = []
        for _, data in chunk:
            if self.gpu_jpeg_decode and _is_complete_jpeg(data):
                futures.append(_done(_JpegForGpu(data)))  # decoded later on the GPU, with its batch-mates
            else:
                futures.append(self._pool.submit(decode_for_model, data, preprocessing))
        return keys, futures

    def _finish(self, keys: list[str], futures: list[Future]) -> EmbeddedBatch:
        results = {}
        for index, future in enumerate(futures):
            try:
                results[index] = future.result()
            except ImageDecodeError as error:
                results[index] = error
        if self.gpu_jpeg_decode:
            self._decode_jpegs_on_gpu(results)
        decoded = [(keys[i], result) for i, result in results.items() if not isinstance(result, ImageDecodeError)]
        failures = [(keys[i], result.reason, result.detail) for i, result in results.items()
                    if isinstance(result, ImageDecodeError)]
        vectors = np.empty((0, self.spec.output_dim), dtype=np.float32)
        if decoded:
            with torch.inference_mode():
                vectors = self._run_model(self._as_batch([pixels for _, pixels in decoded])).numpy()
        return EmbeddedBatch(
            embeddings=pd.DataFrame({"sha256": [key for key, _ in decoded],
                                     "vector": list(vectors.astype(self.vector_dtype, copy=False))},
                                    columns=EMBEDDING_COLUMNS),
            failures=pd.DataFrame(failures, columns=FAILURE_COLUMNS))

    def _as_batch(self, images: list) -> torch.Tensor:
        """Stack HWC uint8 numpy images (and, with nvJPEG, CHW tensors already on the GPU) into NHWC."""
        if self.on_cuda and any(isinstance(image, torch.Tensor) for image in images):
            return torch.stack([image.permute(1, 2, 0) if isinstance(image, torch.Tensor)
                                else torch.from_numpy(image).to(self.device, non_blocking=True)
                                for image in images])
        if self.on_cuda:
            staging = self._staging[: len(images)]
            np.stack(images, out=staging.numpy())
            return staging
        return torch.from_numpy(np.stack(images))

    def _run_model(self, nhwc_uint8: torch.Tensor) -> torch.Tensor:
        count = nhwc_uint8.shape[0]
        batch = pixels_to_input(nhwc_uint8.to(self.device, non_blocking=True), self.spec.preprocessing)
        if not self.on_cuda:
            return self.model(batch)
        if count < self.batch_size:
            # cudnn.benchmark tunes every new shape (seconds each); a partition's last batch
            # would cost one tuning per distinct size, so it is padded to the usual shape.
            padding = batch.new_zeros((self.batch_size - count, *batch.shape[1:]))
            batch = torch.cat([batch, padding]).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            vectors = self.model(batch)
        return vectors[:count].float().cpu()

    def _decode_jpegs_on_gpu(self, results: dict[int, object]) -> None:
        """Replace every _JpegForGpu in `results` by a CHW uint8 tensor on the GPU (nvJPEG), or by
        PIL's result (pixels or ImageDecodeError) when nvJPEG refuses the batch."""
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as TF

        preprocessing = self.spec.preprocessing
        pending = [i for i, result in results.items() if isinstance(result, _JpegForGpu)]
        if not pending:
            return
        try:
            blobs = [torch.frombuffer(bytearray(results[i].data), dtype=torch.uint8) for i in pending]
            images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = None  # one bad file fails the whole nvJPEG call: this batch goes through PIL
        if images is not None:
            for i, image in zip(pending, images):
                if preprocessing.framing == "trim":
                    results[i] = trimmed_frame_tensor(image, preprocessing)
                    continue
                height, width = image.shape[-2:]
                left, top, right, bottom = center_crop_box(width, height, preprocessing)
                crop = image[:, int(top):int(np.ceil(bottom)), int(left):int(np.ceil(right))]
                results[i] = TF.resize(crop, [preprocessing.crop, preprocessing.crop],
                                       interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            return
        fallbacks = {i: self._pool.submit(decode_for_model, results[i].data, preprocessing) for i in pending}
        for i, future in fallbacks.items():
            try:
                results[i] = future.result()
            except ImageDecodeError as error:
                results[i] = error


@dataclass(frozen=True)
class _JpegForGpu:
    data: bytes


def _is_complete_jpeg(data: bytes) -> bool:
    # nvJPEG decodes a truncated JPEG "fine"; requiring the end-of-image marker sends such a
    # file to PIL, which reports it as truncated instead of embedding half a picture.
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0").endswith(b"\xff\xd9")


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _chunks(items: Iterable[tuple[str, bytes]], size: int) -> Iterator[list[tuple[str, bytes]]]:
    chunk: list[tuple[str, bytes]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _nvjpeg_available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


# -- once per executor process ----------------------------------------------------------------

_EMBEDDERS: dict[tuple, ImageEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(spec: ModelSpec, device: torch.device | str = "cpu", **options) -> ImageEmbedder:
    """The process-wide embedder for (model version, device): Spark reuses Python workers, so
    the model is loaded once per executor process, not once per partition."""
    # Options (batch size, vector dtype...) are part of the key: a caller asking for float16
    # vectors must not get the float32 embedder another caller created first.
    key = (model_version(spec), str(torch.device(device)), tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = ImageEmbedder(spec, device, **options)
        return _EMBEDDERS[key]


def embed_partition(frames: Iterable[pd.DataFrame], spec: ModelSpec, device: torch.device | str = "cpu",
                    **options) -> Iterator[pd.DataFrame]:
    """mapInPandas-shaped: one output frame per model batch with columns
    sha256, vector (None for failures), failure_reason and failure_detail (None for successes)."""
    embedder = get_embedder(spec, device, **options)
    for batch in embedder.embed_frames(frames):
        ok = batch.embeddings.assign(failure_reason=None, failure_detail=None)
        failed = pd.DataFrame({"sha256": batch.failures["sha256"], "vector": None,
                               "failure_reason": batch.failures["reason"],
                               "failure_detail": batch.failures["detail"]})
        yield pd.concat([ok, failed], ignore_index=True) if len(failed) else ok


# -- PCA / whitening ---------------------------------------------------------------------------

def fit_pca(vectors: np.ndarray, output_dim: int, whiten: bool = True, eps: float = 1e-6) -> PcaProjection:
    """PCA (optionally whitening) on L2-normalised catalog vectors, for `ModelSpec(pca=...)`.

    Needs at least `output_dim` + 1 vectors. Deterministic: the SVD of the same input gives the
    same basis; signs are fixed so the largest loading of every component is positive.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != FEATURE_DIM:
        raise ValueError(f"fit_pca expects an (n, {FEATURE_DIM}) array, got {vectors.shape}")
    if not 0 < output_dim <= min(FEATURE_DIM, vectors.shape[0] - 1):
        raise ValueError(f"output_dim={output_dim} needs 0 < dim <= min({FEATURE_DIM}, n-1={vectors.shape[0] - 1})")
    mean = vectors.mean(axis=0)
    _, singular_values, basis = np.linalg.svd(vectors - mean, full_matrices=False)
    basis = basis[:output_dim]
    signs = np.sign(basis[np.arange(output_dim), np.abs(basis).argmax(axis=1)])
    basis = basis * signs[:, None]
    if whiten:
        variance = singular_values[:output_dim] ** 2 / max(1, vectors.shape[0] - 1)
        basis = basis / np.sqrt(variance + eps)[:, None]
    return PcaProjection(mean=mean.astype(np.float32), components=basis.astype(np.float32))


def apply_pca(vectors: np.ndarray, pca: PcaProjection) -> np.ndarray:
    """Project already-computed full-dimension vectors; same maths as the model's PCA layer."""
    projected = (np.asarray(vectors, dtype=np.float32) - pca.mean) @ pca.components.T
    return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)
