"""The world's closed vocabulary: every shape, colour, size, position and background it can name.

The grammar and the parser work over this whole library, not over one config's subset, so that a caption
from any world (or a model's invented mention of a shape its world never showed) parses the same way.
Category words are disjoint except `grey` (a background and the look of a hidden object), which the parser
tells apart by the word `background` that closes a context clause.
"""

from __future__ import annotations

# name -> RGB. Saturated and far from every background, so colour is the easy attribute to see.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 95, 235),
    "yellow": (245, 225, 35),
    "purple": (155, 55, 205),
    "orange": (250, 140, 25),
    "white": (248, 248, 248),
    "cyan": (35, 215, 225),
    "pink": (250, 130, 195),
    "brown": (140, 85, 35),
}
# What a hidden object looks like (`WorldConfig.uncertain_p`): a dull grey, not a colour an object is drawn from,
# so it is not in COLOURS (a config's palette). It shares its word with the `grey` background; the parser tells
# them apart by the word `background` that closes a context clause.
UNCERTAIN_COLOUR = "grey"
PIXEL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, UNCERTAIN_COLOUR: (165, 165, 165)}
"""Every colour an object can be drawn in: the palette and the hidden look."""
COLOUR_WORDS: tuple[str, ...] = tuple(PIXEL_COLOURS)
"""Every colour word a caption may say of an object."""
DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")

# Rendered by `world.render`; the first five are the default set (look-alikes at small size: circle,
# square, diamond and hexagon differ by a few pixels at 8 px, which is what makes shape the hard attribute).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ring")
DEFAULT_SHAPES: tuple[str, ...] = SHAPES[:5]

SIZES: tuple[str, ...] = ("small", "large")

# Backgrounds are greys or grey textures: none can be mistaken for an object colour.
BACKGROUNDS: tuple[str, ...] = ("grey", "dark", "striped", "checkered", "dotted", "gradient")
DEFAULT_BACKGROUNDS: tuple[str, ...] = ("grey", "dark", "striped")

# Cells of the 3x3 grid in reading order (row-major); the order captions list objects in.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
CELL: dict[str, tuple[int, int]] = {name: divmod(i, 3) for i, name in enumerate(POSITIONS)}  # name -> (row, col)

# The canonical preposition of each cell: "at the top left", "on the left", "in the centre".
PREPOSITION: dict[str, str] = {p: "at" for p in POSITIONS} | {"left": "on", "right": "on", "centre": "in"}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Spelling variants a generated caption may use; mapped before parsing so they are not counted as errors.
SYNONYMS: dict[str, str] = {
    "center": "centre", "middle": "centre", "gray": "grey", "big": "large", "little": "small",
    "tiny": "small", "color": "colour", "upper": "top", "lower": "bottom", "violet": "purple",
}
