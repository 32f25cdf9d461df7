"""World generation throughput (scenes/s, end to end: sample, render, PNG, parquet), per preset.

    .venv/bin/python bench/world_gen.py [--presets tiny prior_tiny] [--repeats 3] [--quick]

The speed claim that used to be a test (tests never assert wall-clock times): the tiny world generates in about
a second. Prints a table and writes reports/bench/world.json. Run serially on a quiet machine; medians reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from world import generate_world, preset


def seconds_to_generate(name: str, repeats: int) -> tuple[int, list[float]]:
    cfg = preset(name)
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_world(cfg, Path(tmp) / "w", progress=False)
            times.append(time.perf_counter() - t0)
    return cfg.n_scenes + cfg.n_text, times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "prior_tiny"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset, one repeat")
    ap.add_argument("--out", default="reports/bench/world.json")
    args = ap.parse_args(argv)
    presets, repeats = (["tiny"], 1) if args.quick else (args.presets, args.repeats)
    rows = []
    print(f"{'preset':<12} {'scenes+texts':>12} {'median s':>9} {'scenes/s':>9}")
    for name in presets:
        n, times = seconds_to_generate(name, repeats)
        med = statistics.median(times)
        rows.append({"preset": name, "items": n, "seconds": times, "median_seconds": med, "per_second": n / med})
        print(f"{name:<12} {n:>12} {med:>9.2f} {n / med:>9.0f}")
    result = {"machine": platform.processor() or platform.machine(), "repeats": repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
