"""`python -m trainer --config configs/world.yaml [--max_steps 50 --loss.beta 0.3 ...]` (see trainer/train.py;
`--help` lists every option with its default and docstring)."""

import sys

from trainer.config import load_config
from trainer.train import train


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(None, sys.argv[1:] if argv is None else argv)
    except ValueError as err:  # a config error: the message says what to change, a traceback would bury it
        print(f"python -m trainer: error: {err}", file=sys.stderr)
        return 2
    final = train(cfg)
    print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
