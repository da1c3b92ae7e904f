"""The imagededup half of bench/dedup: runs inside bench/.venv-imagededup (imagededup and
its torch/numpy 2 stack must stay out of the project's venv). run.py calls it as a
subprocess and reads one JSON object from its stdout.

    search HASHES.npy THRESHOLD [SEARCH_METHOD]  time PHash.find_duplicates on given hashes
    planted DIR THRESHOLD                        PHash encode + find_duplicates on a folder
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

import numpy as np


def quiet_imagededup():
    warnings.filterwarnings("ignore")
    from imagededup.methods import PHash

    logging.getLogger("imagededup").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("imagededup"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return PHash(verbose=False)


def unique_pairs(duplicates: dict) -> set[tuple[str, str]]:
    return {tuple(sorted((first, second))) for first, others in duplicates.items() for second in others}


def search(hashes_path: str, threshold: int, search_method: str | None) -> dict:
    hashes = np.load(hashes_path)
    encoding_map = {f"{position}": f"{int(value):016x}" for position, value in enumerate(hashes)}
    phash = quiet_imagededup()
    options = {"search_method": search_method} if search_method else {}
    started = time.perf_counter()
    duplicates = phash.find_duplicates(encoding_map=encoding_map, max_distance_threshold=threshold, **options)
    seconds = time.perf_counter() - started
    pairs = unique_pairs(duplicates)
    return {"seconds": seconds, "pairs": len(pairs), "count": len(hashes)}


def planted(directory: str, threshold: int) -> dict:
    phash = quiet_imagededup()
    started = time.perf_counter()
    encodings = phash.encode_images(image_dir=directory, num_enc_workers=0)
    encoded = time.perf_counter()
    duplicates = phash.find_duplicates(encoding_map=encodings, max_distance_threshold=threshold)
    searched = time.perf_counter()
    return {
        "encode_seconds": encoded - started,
        "search_seconds": searched - encoded,
        "pairs": sorted(unique_pairs(duplicates)),
    }


def main(argv: list[str]) -> None:
    command = argv[0]
    if command == "search":
        result = search(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else None)
    elif command == "planted":
        result = planted(argv[1], int(argv[2]))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
