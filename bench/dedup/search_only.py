"""Pair search alone, on synthetic hashes: wall and CPU seconds of `find_near_duplicates`.

    .venv/bin/python bench/dedup/search_only.py --hashes 1000000 --max-distance 10 --repeats 3
    taskset -c 0,1 python3 bench/dedup/search_only.py ...     # pinned to two cores

Needs only numpy, scipy and Pillow (no imagehash/imagededup), so it also runs on a machine
where the project's virtualenv is not installed. Prints one JSON line per repeat and the
median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from synthetic import synthetic_hashes  # noqa: E402

from pipelines.dedup.near_duplicates import find_near_duplicates, plan_bands  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hashes", type=int, default=1_000_000, help="number of synthetic hashes")
    parser.add_argument("--max-distance", type=int, default=10, help="Hamming radius (imagededup's default: 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for the search")
    arguments = parser.parse_args()
    hashes = synthetic_hashes(arguments.hashes)
    bands = plan_bands(arguments.max_distance, len(hashes))
    walls = []
    for repeat in range(arguments.repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        found = find_near_duplicates(hashes, arguments.max_distance, workers=arguments.threads)
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
        walls.append(wall)
        print(json.dumps({"repeat": repeat, "hashes": len(hashes), "max_distance": arguments.max_distance,
                          "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "pairs": len(found.i),
                          "cores_allowed": len(os.sched_getaffinity(0)),
                          "bands": [f"{b.width}b/r{b.radius}" for b in bands] if bands else "direct"}), flush=True)
    print(f"median wall {statistics.median(walls):.2f} s over {len(walls)} runs")


if __name__ == "__main__":
    main()
