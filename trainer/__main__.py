"""`python -m trainer --config configs/world.yaml [--key value ...]` (see trainer/train.py)."""

import argparse
import sys

from trainer.config import load_config
from trainer.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     epilog="Any TrainConfig field can be overridden: --max_steps 50 "
                                            "--loss.beta 0.3 --preset dpo (see trainer/config.py).")
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig fields")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    final = train(cfg)
    print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
