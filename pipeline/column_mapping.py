"""Which source columns hold the id, prompt, responses and image of a preference example.

A user's manifest rarely uses our canonical names (`id, prompt, chosen, rejected, image`). A `ColumnMapping`
names the source column of each canonical field; a name may be a dotted path into a nested struct or into a
column that holds JSON text (`text.question` for RLHF-V). Presets cover the public multimodal preference sets;
docs/ingest.md cites where their column names come from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

CANONICAL_FIELDS: tuple[str, ...] = ("id", "prompt", "chosen", "rejected", "image")
PROMPT_FORMATS: tuple[str, ...] = ("plain", "llava")


@dataclass(frozen=True)
class ColumnMapping:
    """Source column (or dotted path) of each canonical field of a preference example."""

    id: str | None = "id"
    """Unique example id. None, or a column the source does not have: ids are derived from content (`derive_id`)."""
    prompt: str = "prompt"
    """Instruction / question."""
    chosen: str = "chosen"
    """Preferred response y_p."""
    rejected: str | None = "rejected"
    """Dispreferred response y_n; None when the source has none (every example then has a null `rejected`)."""
    image: str = "image"
    """Path of the positive image, relative to the image root (or absolute inside it)."""
    image_bytes: str | None = None
    """Column holding the image itself as bytes (the Hugging Face `Image` struct {bytes, path}, as RLAIF-V and
    RLHF-V are distributed). A row with bytes there uses them: ingest writes each distinct image once to a
    content-addressed folder under the data root and checks it like any file. A row without bytes (or a manifest
    without the column) uses `image`."""
    prompt_format: str = "plain"
    """`plain`: the prompt is the question. `llava`: a full LLaVA-v1 conversation prompt ("... USER: <image>\\nQ
    ASSISTANT:") from which ingest keeps only Q, so that the CLIP text encoder and the trainer's own chat
    template see the question, not the system prompt."""

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "image"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ColumnMapping.{name}={value!r}: name the source column that holds the {name}")
        for name in ("id", "rejected", "image_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"ColumnMapping.{name}={value!r}: a source column name, or None")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"ColumnMapping.prompt_format={self.prompt_format!r}: use one of {list(PROMPT_FORMATS)}")

    @staticmethod
    def resolve(option: str | Mapping[str, Any] | ColumnMapping | None) -> ColumnMapping:
        """A mapping from a preset name, a dict of canonical -> source names, its JSON text, or a mapping.

        A dict may start from a preset with `"preset": name` and override single fields, e.g.
        `{"preset": "rlaif_v", "image": "file_name"}`. Unknown presets or keys raise ValueError listing the valid ones.
        """
        if option is None:
            return PRESETS["canonical"]
        if isinstance(option, ColumnMapping):
            return option
        if isinstance(option, str):
            text = option.strip()
            if text.startswith("{"):
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"column mapping {option!r} looks like JSON but does not parse: {exc}") from None
                return ColumnMapping.resolve(parsed)
            return _preset(text)
        if isinstance(option, Mapping):
            fields = dict(option)
            base = _preset(str(fields.pop("preset"))) if "preset" in fields else PRESETS["canonical"]
            valid = [f.name for f in dataclasses.fields(ColumnMapping)]
            unknown = sorted(set(fields) - set(valid))
            if unknown:
                raise ValueError(f"column mapping keys {unknown} are unknown; use {valid} (and optionally 'preset')")
            return dataclasses.replace(base, **fields)
        raise ValueError(f"column mapping {option!r}: give a preset name, a dict, its JSON text or a ColumnMapping")

    def source_columns(self) -> dict[str, str]:
        """Canonical field -> source path, for the fields that are mapped."""
        return {f: getattr(self, f) for f in CANONICAL_FIELDS if getattr(self, f) is not None}

    def top_level_columns(self) -> set[str]:
        """Top-level source columns the mapping reads (the rest of a row is carried through as extra columns)."""
        cols = {path.split(".")[0] for path in self.source_columns().values()} | set(self.source_columns().values())
        return cols | ({self.image_bytes} if self.image_bytes else set())


PRESETS: dict[str, ColumnMapping] = {
    # Our own manifest (docs/data.md), also what the world generator writes.
    "canonical": ColumnMapping(),
    # mDPO's VLFeedback subset (vlfeedback_llava_10k.json, a JSON array; luka-group/mDPO data/sample_data.json):
    # {"img_path", "prompt" (full LLaVA-v1 prompt), "chosen", "rejected"}, no id.
    "vlfeedback_mdpo": ColumnMapping(id=None, image="img_path", prompt_format="llava"),
    # openbmb/RLHF-V-Dataset: `text` is a JSON string {"question", "chosen", "rejected"}; `idx` int64; `image_path`.
    "rlhf_v": ColumnMapping(
        id="idx", prompt="text.question", chosen="text.chosen", rejected="text.rejected", image="image_path",
        image_bytes="image",
    ),
    # openbmb/RLAIF-V-Dataset: flat `question`, `chosen`, `rejected`; `idx` string; `image_path`; `image` the
    # Hugging Face Image struct {bytes, path} holding the image itself.
    "rlaif_v": ColumnMapping(id="idx", prompt="question", image="image_path", image_bytes="image"),
}
ALIASES: dict[str, str] = {"mdpo": "vlfeedback_mdpo", "rlhfv": "rlhf_v", "rlaifv": "rlaif_v"}


def _preset(name: str) -> ColumnMapping:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(
            f"unknown column-mapping preset {name!r}; presets: {sorted(PRESETS)} (aliases: {sorted(ALIASES)}), "
            "or give a dict / JSON object of canonical -> source column names"
        )
    return PRESETS[key]


class FieldError(ValueError):
    """A dotted path ran into a JSON-text column that does not parse."""


_MISSING = object()


def lookup(row: Mapping[str, Any], path: str) -> Any:
    """The value at `path` in `row`, or `MISSING`.

    An exact key wins over a dotted path (a flat column may be called `text.question`). Along a path, a string is
    parsed as JSON (RLHF-V's `text` column) and an integer part indexes a list.
    """
    if path in row:
        return row[path]
    parts = path.split(".")
    if len(parts) == 1:
        return _MISSING
    cur: Any = row
    for depth, part in enumerate(parts):
        if depth > 0 and isinstance(cur, str):
            try:
                cur = json.loads(cur)
            except json.JSONDecodeError as exc:
                column = ".".join(parts[:depth])
                raise FieldError(f"column {column!r} is not valid JSON ({exc}), so {path!r} cannot be read") from None
        if isinstance(cur, Mapping):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit():
            if int(part) >= len(cur):
                return _MISSING
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


MISSING = _MISSING


def derive_id(image: Any, prompt: Any, chosen: Any, rejected: Any) -> str:
    """Deterministic id of an example without one: 16 hex chars of sha1 over its content as JSON.

    `sha1(json.dumps([image, prompt, chosen, rejected], ensure_ascii=False))[:16]` on the source values (before
    any prompt-template stripping). Identical examples get identical ids, so exact copies become `duplicate_id`.
    """
    payload = json.dumps([image, prompt, chosen, rejected], ensure_ascii=False, default=str)
    return hashlib.sha1(payload.encode("utf-8", "backslashreplace")).hexdigest()[:16]


_LLAVA_USER = re.compile(r"^.*?\bUSER:\s*", re.DOTALL)
_LLAVA_ASSISTANT = re.compile(r"\s*ASSISTANT:\s*$")
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


def strip_llava_prompt(prompt: str) -> str:
    """The question inside a LLaVA-v1 prompt: drop the system text up to `USER:`, the `<image>` token and the
    trailing `ASSISTANT:`. A prompt without `USER:` is only cleaned of `<image>` and a trailing `ASSISTANT:`."""
    text = _LLAVA_USER.sub("", prompt, count=1)
    text = _LLAVA_ASSISTANT.sub("", text)
    text = _IMAGE_TOKEN.sub("\n", text)
    return text.strip()
