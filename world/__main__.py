"""Generate a scene world from the command line.

    python -m world --preset tiny --seed 0 --out data/world/tiny
    python -m world --preset default            # -> $MISP_DATA_ROOT/world/default
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from world.config import PRESETS, preset
from world.generate import generate_world


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m world", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS), help="size of the world")
    ap.add_argument("--seed", type=int, default=None, help="root seed (default: the preset's, 0)")
    ap.add_argument("--out", default=None, help="output folder (default: <data root>/world/<preset>)")
    ap.add_argument("--overwrite", action="store_true", help="replace a world generated from another config")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    cfg = preset(args.preset) if args.seed is None else preset(args.preset, seed=args.seed)
    if args.out is None:
        from store.paths import data_root

        out = data_root() / "world" / args.preset
    else:
        out = args.out
    t0 = time.perf_counter()
    try:
        summary = generate_world(cfg, out, overwrite=args.overwrite, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    report = {k: str(v) if hasattr(v, "as_posix") else v for k, v in summary._asdict().items()}
    report["seconds"] = round(seconds, 2)
    if summary.generated and seconds > 0:
        report["scenes_per_s"] = round(cfg.n_scenes / seconds, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
