"""Dedup benchmark (issue 4): our pHash and pair search against imagehash and imagededup.

    .venv/bin/python bench/dedup/run.py                 # everything, ~15 min on 2 cores
    .venv/bin/python bench/dedup/run.py --quick         # smaller sizes, one repeat

Prints three tables: hashing speed, pair-search time, precision/recall on planted
duplicates. imagededup runs in bench/.venv-imagededup (see README.md) through
imagededup_side.py. Results are numbers, not pass/fail; they also go to RESULTS.json in
the work directory.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(HERE))

import planted  # noqa: E402
from synthetic import synthetic_hashes  # noqa: E402
from pipelines.dedup.confirmation import CONFIRMATION_THRESHOLD, confirmation_scores  # noqa: E402
from pipelines.dedup.near_duplicates import (  # noqa: E402
    CANDIDATE_MAX_DISTANCE,
    find_near_duplicates,
    hamming_distance,
    plan_bands,
)
from pipelines.dedup.phash import phash_hex, phash_many  # noqa: E402

IMAGEDEDUP_PYTHON = REPOSITORY / "bench" / ".venv-imagededup" / "bin" / "python"
IMAGEDEDUP_THRESHOLD = 10  # imagededup's default max_distance_threshold


def timed(function, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds over ``repeats`` runs, and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def imagededup(*arguments) -> dict:
    if not IMAGEDEDUP_PYTHON.exists():
        raise SystemExit(f"{IMAGEDEDUP_PYTHON} missing: see bench/dedup/README.md")
    output = subprocess.run(
        [str(IMAGEDEDUP_PYTHON), str(HERE / "imagededup_side.py"), *map(str, arguments)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- hashing


def bench_hashing(workdir: Path, count: int, repeats: int) -> dict:
    files = planted.make_catalog_jpegs(workdir / "catalog_jpegs", count, seed=1)
    blobs = [path.read_bytes() for path in files]
    print(f"\n== 1. Hashing {len(blobs)} catalog JPEGs (openclipart on white, quality 90), one thread, "
          f"median of {repeats}")

    def reference():
        return [imagehash.phash(Image.open(io.BytesIO(data))) for data in blobs]

    wall, _, reference_hashes = timed(reference, repeats)
    reference_hex = [str(value) for value in reference_hashes]
    rows = [("imagehash.phash", wall, 1.0, "reference")]
    results = {"images": len(blobs), "imagehash_seconds": wall}
    for label, draft_size in (("phash_many (exact)", None), ("phash_many draft 128", 128), ("phash_many draft 64", 64)):
        ours_wall, _, hashes = timed(lambda: phash_many(blobs, draft_size=draft_size), repeats)
        reference_values = np.array([int(text, 16) for text in reference_hex], dtype=np.uint64)
        distance = hamming_distance(hashes, reference_values)
        agreement = (
            f"equal to imagehash {np.mean(distance == 0):.1%}, "
            f"differ >2 bits {np.mean(distance > 2):.1%}, median {np.median(distance):.0f} bits"
        )
        if draft_size is None:
            assert [phash_hex(value) for value in hashes] == reference_hex, "exact mode must equal imagehash"
        rows.append((label, ours_wall, wall / ours_wall, agreement))
        results[label] = {
            "seconds": ours_wall,
            "speedup": wall / ours_wall,
            "equal": float(np.mean(distance == 0)),
            "differ_over_2_bits": float(np.mean(distance > 2)),
        }
    print(f"{'method':24s} {'images/s':>9s} {'vs imagehash':>12s}  agreement")
    for label, seconds, ratio, agreement in rows:
        print(f"{label:24s} {len(blobs) / seconds:9.0f} {ratio:11.1f}x  {agreement}")
    return results


# ----------------------------------------------------------------------------- pair search


def bench_pair_search(workdir: Path, sizes: list[int], big: int, repeats: int, big_repeats: int,
                      imagededup_sizes: list[int], imagededup_full: bool) -> dict:
    threshold = IMAGEDEDUP_THRESHOLD
    hashes = synthetic_hashes(max(big, *sizes))
    print(f"\n== 2. All pairs within {threshold} bits (synthetic uniform hashes, 1% planted near copies); "
          f"ours: median of {repeats}, 2 threads")
    results = {"threshold": threshold, "ours": {}, "imagededup": {}}
    print(f"{'hashes':>9s} {'ours wall':>10s} {'ours CPU':>9s} {'imagededup':>11s} {'ratio':>8s} {'pairs':>8s}  bands")
    measured = {}
    runs = sorted(set(imagededup_sizes) | set(sizes) | ({big} if big else set()))
    for count in runs:
        subset = hashes[:count]
        count_repeats = big_repeats if count == big else repeats
        wall, cpu, found = timed(lambda: find_near_duplicates(subset, threshold), count_repeats)
        results["ours"][count] = {"wall": wall, "cpu": cpu, "pairs": len(found.i)}
        theirs, note = "", ""
        run_imagededup = count in imagededup_sizes or (imagededup_full and count in sizes)
        if run_imagededup:
            path = workdir / f"hashes_{count}.npy"
            np.save(path, subset)
            reply = imagededup("search", path, threshold)
            measured[count] = reply["seconds"]
            results["imagededup"][count] = reply
            if reply["pairs"] != len(found.i):
                note = f"  PAIR COUNT DIFFERS: imagededup {reply['pairs']}"
            theirs = f"{reply['seconds']:10.1f}s {reply['seconds'] / wall:7.0f}x"
        bands = plan_bands(threshold, count)
        layout = " ".join(f"{band.width}b/r{band.radius}" for band in bands) if bands else "direct"
        print(f"{count:9d} {wall:9.2f}s {cpu:8.2f}s {theirs:>20s} {len(found.i):8d}  {layout}{note}")

    if len(measured) >= 2:
        small, large = sorted(measured)[-2:]
        exponent = math.log(measured[large] / measured[small]) / math.log(large / small)
        for count in sizes:
            if count in measured:
                continue
            estimate = measured[large] * (count / large) ** exponent
            ours = results["ours"][count]["wall"]
            results["imagededup"][f"{count}_extrapolated"] = {"seconds": estimate, "exponent": exponent}
            print(f"{count:9d}  imagededup extrapolated from {small}/{large} hashes (time ~ n^{exponent:.2f}): "
                  f"{estimate:.0f}s = {estimate / ours:.0f}x ours")
    return results


# ----------------------------------------------------------------------------- precision/recall


def score_pairs(pairs: set[tuple[str, str]], labels: dict) -> dict:
    """Recall and precision per transform; a found pair counts for the transform of each
    copy in it (a pair of two originals only counts overall)."""
    copy_of = {copy["file"]: copy for copy in labels["copies"]}
    truth = {tuple(sorted((copy["file"], copy["original"]))) for copy in labels["copies"]}

    def evaluate(keep) -> dict:
        found, correct = defaultdict(int), defaultdict(int)
        planted_count, recalled = defaultdict(int), defaultdict(int)
        for pair in pairs:
            if not keep(pair):
                continue
            is_true = pair in truth
            for name in pair:
                if name in copy_of:
                    found[copy_of[name]["transform"]] += 1
                    correct[copy_of[name]["transform"]] += is_true
            found["all"] += 1
            correct["all"] += is_true
        for copy in labels["copies"]:
            key = tuple(sorted((copy["file"], copy["original"])))
            if not keep(key):
                continue
            for bucket in (copy["transform"], "all"):
                planted_count[bucket] += 1
                recalled[bucket] += key in pairs
        return {
            bucket: {
                "recall": recalled[bucket] / planted_count[bucket] if planted_count[bucket] else math.nan,
                "precision": correct[bucket] / found[bucket] if found[bucket] else math.nan,
                "found": found[bucket],
                "planted": planted_count[bucket],
            }
            for bucket in (*planted.TRANSFORMS, "all")
        }

    return evaluate(lambda pair: True)


def bench_planted(workdir: Path, originals: int, run_imagededup: bool, generated_stars: bool = False) -> dict:
    directory = workdir / ("planted-generated-stars" if generated_stars else "planted")
    labels = planted.make_planted_set(directory, originals, seed=0, generated_stars=generated_stars)
    names = labels["originals"] + [copy["file"] for copy in labels["copies"]]
    what = "the generated star polygons (left out of the sample catalog)" if generated_stars else "the sample catalog"
    print(f"\n== {4 if generated_stars else 3}. Planted duplicates from {what}: {len(labels['originals'])} originals + "
          f"{len(labels['copies'])} copies ({len(labels['copies']) // len(planted.TRANSFORMS)} per transform), seed 0")

    systems = {}
    if run_imagededup:
        reply = imagededup("planted", directory, IMAGEDEDUP_THRESHOLD)
        systems[f"imagededup PHash, threshold {IMAGEDEDUP_THRESHOLD}"] = {tuple(pair) for pair in reply["pairs"]}

    blobs = [(directory / name).read_bytes() for name in names]
    hashes = phash_many(blobs)
    plain = find_near_duplicates(hashes, IMAGEDEDUP_THRESHOLD)
    systems[f"ours pHash only, {IMAGEDEDUP_THRESHOLD} bits"] = {
        tuple(sorted((names[i], names[j]))) for i, j in zip(plain.i, plain.j)
    }
    images = [Image.open(io.BytesIO(data)) for data in blobs]
    results = {"systems": {}}
    for label, draft_size in (("", None), (" (draft 64)", 64)):
        mode_hashes = hashes if draft_size is None else phash_many(blobs, draft_size=draft_size)
        candidates = find_near_duplicates(mode_hashes, CANDIDATE_MAX_DISTANCE)
        started = time.perf_counter()
        scores = confirmation_scores(images, candidates.i, candidates.j)
        confirm_seconds = time.perf_counter() - started
        confirmed = scores >= CONFIRMATION_THRESHOLD
        systems[f"ours{label} pHash <={CANDIDATE_MAX_DISTANCE} + confirm >={CONFIRMATION_THRESHOLD}"] = {
            tuple(sorted((names[i], names[j]))) for i, j in zip(candidates.i[confirmed], candidates.j[confirmed])
        }
        print(f"confirmation{label}: {len(candidates.i)} candidate pairs scored in {confirm_seconds:.1f}s "
              f"({confirm_seconds / max(1, len(candidates.i)) * 1e3:.1f} ms/pair)")
        results[f"candidates{label}"] = int(len(candidates.i))
        results[f"confirmation_seconds{label}"] = confirm_seconds

    for system, pairs in systems.items():
        results["systems"][system] = score_pairs(pairs, labels)
    print("\nrecall / precision")
    print(f"{'system':48s}" + "".join(f"{bucket:>17s}" for bucket in (*planted.TRANSFORMS, "all")))
    for system in systems:
        table = results["systems"][system]
        cells = "".join(
            f"{table[bucket]['recall']:8.3f}/{table[bucket]['precision']:.3f}" for bucket in (*planted.TRANSFORMS, "all")
        )
        print(f"{system:48s}{cells}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/catalog-index-bench-dedup"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes and one repeat, to check the script")
    parser.add_argument("--skip-imagededup", action="store_true")
    parser.add_argument("--imagededup-full", action="store_true",
                        help="run imagededup at 100,000 hashes (over an hour here) instead of extrapolating")
    parser.add_argument("--sections", default="hash,search,planted,stars",
                        help="comma-separated: hash, search, planted, stars (the generated star polygons)")
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    sections = set(arguments.sections.split(","))
    repeats = 1 if arguments.quick else arguments.repeats
    results = {}
    if "hash" in sections:
        results["hashing"] = bench_hashing(arguments.workdir, 300 if arguments.quick else 2000, repeats)
    if "search" in sections:
        results["pair_search"] = bench_pair_search(
            arguments.workdir,
            sizes=[20_000] if arguments.quick else [100_000],
            big=0 if arguments.quick else 1_000_000,
            repeats=repeats,
            big_repeats=1,
            imagededup_sizes=[] if arguments.skip_imagededup else ([2_000, 4_000] if arguments.quick else [5_000, 10_000, 20_000]),
            imagededup_full=arguments.imagededup_full,
        )
    if "planted" in sections:
        results["planted"] = bench_planted(
            arguments.workdir, 200 if arguments.quick else 1000, run_imagededup=not arguments.skip_imagededup
        )
    if "stars" in sections:
        results["planted_generated_stars"] = bench_planted(
            arguments.workdir, 100 if arguments.quick else 200, run_imagededup=not arguments.skip_imagededup,
            generated_stars=True,
        )
    (arguments.workdir / "RESULTS.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {arguments.workdir / 'RESULTS.json'}")


if __name__ == "__main__":
    main()
