"""Embedding throughput: our per-partition embedder vs a plain eager PyTorch loop, same files.

Both sides do the whole job a partition does, decode + preprocess + model + pooling + L2
norm, over the same images read from disk, on the same cores, alternating repeats so that
any background load hits both. Prints images/s (median of repeats), the ratio, how close
the two sides' vectors are, and the fraction of the CPU's FLOP peak each side reaches.

This is a benchmark: it prints numbers and never fails on them.

    nice -n 10 .venv/bin/python bench/embed/run.py            # CPU, 500 images, 3 repeats
    .venv/bin/python bench/embed/run.py --device cuda         # on a GPU machine
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.embed.embedder import ImageEmbedder, decode_for_model  # noqa: E402
from pipelines.embed.model import default_spec, load_classifier, model_version  # noqa: E402

CLIPART = Path("/usr/share/openclipart/png")
JPEG_LONG_SIDES = (400, 640, 800, 1024, 1280, 1600)  # typical product-photo sizes


def build_dataset(directory: Path, count: int, png_share: float, seed: int = 0) -> list[Path]:
    """~count images: JPEGs made from openclipart drawings composited on white at varied
    sizes, plus some original PNGs (with their transparency). Deterministic for a seed."""
    directory = directory / f"n{count}-png{png_share}-seed{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "dataset.json"
    if marker.is_file():
        return [directory / name for name in json.loads(marker.read_text())]
    sources = sorted(CLIPART.rglob("*.png"))
    if not sources:
        raise SystemExit(f"no PNGs under {CLIPART}: install the Debian package openclipart-png")
    rng = random.Random(seed)
    rng.shuffle(sources)
    names = []
    for source in sources:
        if len(names) == count:
            break
        try:
            with Image.open(source) as probe:
                too_big = probe.width * probe.height > 16_000_000  # a few clipart posters are 600 MP
        except (OSError, Image.DecompressionBombError):
            continue
        if too_big:
            continue
        index = len(names)
        if rng.random() < png_share:
            name = f"{index:04d}.png"
            (directory / name).write_bytes(source.read_bytes())
        else:
            image = Image.open(source).convert("RGBA")
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            photo = Image.alpha_composite(canvas, image).convert("RGB")
            long_side = rng.choice(JPEG_LONG_SIDES)
            scale = long_side / max(photo.size)
            photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                                 Image.Resampling.BICUBIC)
            name = f"{index:04d}.jpg"
            photo.save(directory / name, "JPEG", quality=rng.choice((80, 90, 95)))
        names.append(name)
    marker.write_text(json.dumps(names))
    return [directory / name for name in names]


# -- the plain loop everyone writes first ---------------------------------------------------------

def plain_loop(files: list[Path], backbone: torch.nn.Module, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """PIL decode per image, torchvision transforms, batch 32, fp32 NCHW, eager, no overlap."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize((127 / 255,) * 3, (128 / 255,) * 3)])

    def load(path: Path) -> Image.Image:
        image = Image.open(path)
        if image.mode != "RGB":
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        return image.convert("RGB")

    outputs = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            batch = torch.stack([transform(load(path)) for path in files[start:start + batch_size]]).to(device)
            features = backbone.forward_features(batch)
            pooled = features.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)  # GeM p=3, as ours
            outputs.append(F.normalize(pooled, dim=1).cpu())
    return torch.cat(outputs).numpy()


def ours(files: list[Path], embedder: ImageEmbedder) -> np.ndarray:
    def items():
        for path in files:
            data = path.read_bytes()
            yield hashlib.sha256(data).hexdigest(), data
    vectors = []
    for batch in embedder.embed_images(items()):
        vectors.extend(batch.embeddings["vector"])
        if len(batch.failures):
            raise SystemExit(f"unexpected decode failures: {batch.failures.to_dict('records')}")
    return np.stack(vectors)


# -- FLOP accounting -----------------------------------------------------------------------------

def model_flops_per_image(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.forward_features(torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def cpu_peak_flops(cores: int) -> tuple[float, str]:
    """Peak fp32 FLOP/s = cores x GHz x FLOPs/cycle; assumes two FMA pipes per core."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = re.search(r"^Flags:\s*(.*)$", lscpu, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    ghz = None
    for pattern in (r"^CPU max MHz:\s*([\d.]+)", r"^CPU MHz:\s*([\d.]+)"):
        found = re.search(pattern, lscpu, re.M)
        if found:
            ghz = float(found.group(1)) / 1000
            break
    if ghz is None:  # VMs often hide the clock from lscpu; cpuinfo still has the current one
        mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
        ghz = max(map(float, mhz)) / 1000 if mhz else 2.45
    if "avx512f" in flags:
        width, per_cycle = "AVX-512", 64
    elif "avx2" in flags and "fma" in flags:
        width, per_cycle = "AVX2+FMA", 32
    else:
        width, per_cycle = "SSE", 8
    model = re.search(r"^Model name:\s*(.*)$", lscpu, re.M)
    assumption = (f"{cores} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOPs/cycle ({width}: 2 FMA pipes x "
                  f"{per_cycle // 4} lanes x 2) on {model.group(1).strip() if model else 'unknown CPU'}")
    return cores * ghz * 1e9 * per_cycle, assumption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--png-share", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "catalog-index-bench-embed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="ours; default: the embedder's own choice")
    parser.add_argument("--decode-threads", type=int, default=None)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    files = build_dataset(args.data_dir, args.images, args.png_share)
    spec = default_spec()
    torch.set_num_threads(args.cores)
    baseline_model = load_classifier(spec).to(device)  # plain: unfused BN, NCHW, fp32
    embedder = ImageEmbedder(spec, device, batch_size=args.batch_size, cpu_budget=args.cores,
                             decode_threads=args.decode_threads)

    # warm-up with one full batch each: allocations, oneDNN/cuDNN kernel selection, nvJPEG start
    plain_loop(files[:32], baseline_model, device)
    ours(files[:embedder.batch_size], embedder)

    timings = {"plain": [], "ours": []}
    cpu_seconds = {"plain": [], "ours": []}  # less sensitive than wall time to a busy shared machine
    vectors = {}
    for _ in range(args.repeats):
        sides = [("ours", lambda: ours(files, embedder))]
        if not args.skip_baseline:
            sides.insert(0, ("plain", lambda: (torch.set_num_threads(args.cores),
                                               plain_loop(files, baseline_model, device))[1]))
        for name, run in sides:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, started_cpu = time.perf_counter(), time.process_time()
            vectors[name] = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(len(files) / (time.perf_counter() - started))
            cpu_seconds[name].append(time.process_time() - started_cpu)

    # the model alone on already-decoded pixels: how far the network itself is from the peak
    pixels = np.stack([decode_for_model(path.read_bytes(), spec.preprocessing)
                       for path in files[:embedder.batch_size]])
    model_only = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        embedder.embed_pixels(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_only.append(len(pixels) / (time.perf_counter() - started))

    flops = model_flops_per_image(load_classifier(spec))
    report = {"images": len(files), "pngs": sum(path.suffix == ".png" for path in files),
              "device": str(device), "cores": args.cores, "repeats": args.repeats,
              "model_version": model_version(spec), "batch_size_ours": embedder.batch_size,
              "decode_threads_ours": embedder.decode_threads, "model_gflops_per_image": round(flops / 1e9, 3)}
    for name, values in timings.items():
        if values:
            report[f"{name}_images_per_s"] = round(statistics.median(values), 1)
            report[f"{name}_all_runs"] = [round(v, 1) for v in values]
            report[f"{name}_images_per_cpu_s"] = round(len(files) / statistics.median(cpu_seconds[name]), 1)
    report["ours_model_only_images_per_s"] = round(statistics.median(model_only), 1)
    if timings["plain"]:
        report["speedup"] = round(report["ours_images_per_s"] / report["plain_images_per_s"], 2)
        report["speedup_per_cpu_s"] = round(report["ours_images_per_cpu_s"] / report["plain_images_per_cpu_s"], 2)
        cosine = np.sum(vectors["plain"] * vectors["ours"], axis=1)
        report["cosine_plain_vs_ours_min"] = round(float(cosine.min()), 4)
        report["cosine_plain_vs_ours_median"] = round(float(np.median(cosine)), 4)
    if device.type == "cpu":
        peak, assumption = cpu_peak_flops(args.cores)
        report["cpu_peak_gflops"] = round(peak / 1e9, 1)
        report["peak_assumption"] = assumption
        for name in ("plain", "ours", "ours_model_only"):
            if report.get(f"{name}_images_per_s"):
                report[f"{name}_fraction_of_peak"] = round(report[f"{name}_images_per_s"] * flops / peak, 4)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
