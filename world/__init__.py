"""The scene world: a deterministic generator of images with exact ground truth, captions, prompts and
preference examples, written as ordinary files (PNG + Parquet) so that the pipeline reads it like user data.

    from world import PRESETS, generate_world
    summary = generate_world(PRESETS["tiny"], "data/world/tiny")

CLI: `python -m world --preset tiny --seed 0 --out data/world/tiny`. See docs/world.md.
"""

from world.config import ERROR_TYPES, PRESETS, PROMPT_KINDS, WORLD_VERSION, WorldConfig, preset
from world.generate import WorldSummary, generate_world, read_scenes

__all__ = [
    "ERROR_TYPES", "PRESETS", "PROMPT_KINDS", "WORLD_VERSION", "WorldConfig", "WorldSummary",
    "generate_world", "preset", "read_scenes",
]
