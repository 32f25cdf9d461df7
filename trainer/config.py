"""The one config object of a training run: a `TrainConfig` with the loss as a nested `LossConfig`, built from a
YAML file (nested keys) plus command-line overrides parsed by simple-parsing (`--max_steps 50`, `--loss.beta 0.3`,
`--lora true`), saved beside the run as config.yaml."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import simple_parsing
import yaml

from trainer.losses import PRESETS, LossConfig

REFERENCE_MODES = ("auto", "cached", "online")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A training run. Paths left empty resolve under the data root (`$MISP_DATA_ROOT`, default ./data)."""

    run_name: str = "misp"
    """Folder name under <data root>/runs/."""
    preset: str = "misp"
    """Loss preset: `dpo`, `mdpo`, `chip`, `random_multi`, `misp` (SPEC §4), or `sft` (the control: the chosen
    response's NLL alone). `loss` starts from it."""
    loss: LossConfig | None = None
    """The loss (trainer/losses.py LossConfig). None: the preset's; on the command line `--loss.beta 0.3`, in YAML
    a mapping `loss: {beta: 0.3}`: fields changed from the preset's values."""
    model: str = ""
    """Local HF VLM folder (save_pretrained). Empty: the world base model in <data root>/models/base, which
    `make base` builds (the trainer never does: a missing model is an error)."""
    shards: str = ""
    """Folder with manifest.json and shard=*.parquet. Empty: <data root>/shards."""
    data_root: str = ""
    """Empty: $MISP_DATA_ROOT or ./data."""
    output_dir: str = ""
    """Empty: <data root>/runs/<run_name>."""
    max_examples: int | None = None
    """Use only the first N examples of the shards (smoke runs)."""
    max_steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per optimizer step, over all processes (each example forwards 2 + K rows)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (memory); batch_size must divide by grad_accum x processes."""
    lr: float = 5e-5
    """Peak learning rate (AdamW; transformers' `get_cosine_schedule_with_warmup`: linear warmup from 0, then
    cosine decay to 0 at max_steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps: the LR of step s < warmup_steps is lr * s / warmup_steps (0 at the first step)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    max_length: int = 512
    """Tokens per row (prompt incl. image tokens + response); image tokens are never cut."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all language-model weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout (0 keeps the run deterministic)."""
    lora_target_modules: str = "all-linear"
    """peft target_modules: `all-linear` or a comma-separated list of module names."""
    freeze_vision: bool = True
    """Keep the vision tower (and projector when `freeze_projector`) frozen."""
    freeze_projector: bool = False
    """Also freeze the multimodal projector."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (recommended for 7B models on GPU)."""
    precision: str = "auto"
    """`auto` (bf16 on CUDA, fp32 on CPU), `no`, `bf16`, `fp16`."""
    reference: str = "auto"
    """`cached`: reference log-probs precomputed once into a Parquet cache; `online`: computed every step from the
    starting weights (a frozen copy; with LoRA the adapters disabled and frozen copies of any other trained
    module); `auto`: online when the loss remakes its negatives every step (`loss.fresh_negatives`, the mdpo and
    chip presets), else cached."""
    reference_check_every: int = 0
    """Every N steps, recompute the reference log-probs of a fixed probe batch (the first example) and log how far
    they moved since step 0 (`ref/probe_drift`, nats; must stay 0) and how far the policy moved
    (`ref/probe_policy_change`). 0: off."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed)."""
    log_every: int = 1
    """Write metrics every N steps."""
    save_merged: bool = False
    """With LoRA: save the final model with adapters merged (else an adapter folder)."""
    trust_remote_code: bool = False
    """Allow models whose folder ships its own code (off: nothing from the folder runs)."""
    resume: bool = True
    """Resume from the newest checkpoint of the run folder when there is one."""
    stop_after_steps: int | None = None
    """Stop this invocation after N steps (checkpointing first), as a time-sliced cluster job would; the next
    invocation resumes. None: run to max_steps."""
    seed: int = 0
    """Seed of init, data order, on-the-fly negatives and IS draws."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML 1.1 reads `1e-5` as a string
            value = getattr(self, f.name)
            if isinstance(f.default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        if self.loss is None:
            self.loss = PRESETS[self.preset]
        if not isinstance(self.loss, LossConfig):
            raise ValueError(f"loss={self.loss!r}: pass a LossConfig, e.g. LossConfig.from_preset({self.preset!r}, "
                             "beta=0.3), or build the config with TrainConfig.from_dict / load_config (which read a "
                             "mapping as changes to the preset's loss)")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference={self.reference!r}: use one of {REFERENCE_MODES}")
        if self.reference == "cached" and self.loss.fresh_negatives:
            raise ValueError(f"reference=cached with loss.fresh_negatives=True (preset {self.preset!r}): a new crop or "
                             "noise every step has no precomputed reference log-prob; set reference: online (or "
                             "auto), or loss.fresh_negatives: false for one fixed negative per example")
        if self.reference_check_every < 0:
            raise ValueError(f"reference_check_every={self.reference_check_every} must be >= 0 (0 = off)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {PRECISIONS}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (0 = no warmup)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")

    def reference_mode(self) -> str:
        """`cached` or `online`: what `auto` resolves to for this loss."""
        if self.reference != "auto":
            return self.reference
        return "online" if self.loss.fresh_negatives else "cached"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A config from a (YAML) mapping: top-level TrainConfig fields, `loss` a mapping of changes to the
        preset's LossConfig. Unknown keys are an error that lists the known ones."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a config is a mapping of TrainConfig fields, got {type(data).__name__}")
        data = dict(data)
        _check_keys(data, TrainConfig, source)
        loss = data.pop("loss", None) or {}
        if isinstance(loss, LossConfig):
            return cls(**data, loss=loss)
        if not isinstance(loss, dict):
            raise ValueError(f"{source}: `loss` is a mapping of LossConfig fields (e.g. loss: {{beta: 0.3}}), "
                             f"got {loss!r}")
        _check_keys(loss, LossConfig, f"{source}: loss")
        preset = data.get("preset", cls.preset)
        if preset not in PRESETS:
            raise ValueError(f"{source}: preset={preset!r} is not one of {sorted(PRESETS)}")
        return cls(**data, loss=LossConfig.from_preset(preset, **_floats(LossConfig, loss)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_keys(data: dict, cls: type, source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(known))}")


def _floats(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `1e-3` as a string: float fields get their float."""
    floats = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, float)}
    return {k: float(v) if k in floats and isinstance(v, (int, str)) and not isinstance(v, bool) else v
            for k, v in data.items()}


class _Parser(simple_parsing.ArgumentParser):
    """argparse exits the process on a bad option; a config error is a ValueError the caller can catch."""

    def error(self, message: str):
        raise ValueError(f"{message}; options look like --max_steps 100 or --loss.beta 0.3 (python -m trainer "
                         "--help lists them)")


def build_parser(default: TrainConfig, prog: str = "python -m trainer") -> simple_parsing.ArgumentParser:
    """The command line of a run: every TrainConfig field as `--name value`, every LossConfig field as
    `--loss.name value` (booleans: `--lora true`), with `default`'s values as defaults."""
    parser = _Parser(prog=prog, description="Train a VLM with MISP-DPO or a baseline preset (docs/trainer.md).",
                     argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
                     nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT, add_config_path_arg=False,
                     add_help=True, allow_abbrev=False)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file of TrainConfig fields (`loss` nested); options given here override it")
    parser.add_arguments(TrainConfig, dest="train", default=default)
    return parser


def load_config(path: str | Path | None = None, args: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + command-line options (`--max_steps 100`, `--max_steps=100`, `--loss.beta 0.3`).

    The loss starts from the preset named on the command line, else in the file, else `misp`; the file's `loss`
    mapping and then the `--loss.*` options change its fields. Unknown options are an error."""
    args = list(args or [])
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(args)
    path = known.config or path
    data: dict[str, Any] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
    if known.preset is not None:
        data = {**data, "preset": known.preset}
    default = TrainConfig.from_dict(data, source=str(path or "config"))
    parsed, rest = build_parser(default).parse_known_args(args)
    if rest:
        raise ValueError(f"unknown option {rest[0]}; every TrainConfig field is an option (--max_steps 100), every "
                         "LossConfig field one under --loss. (--loss.beta 0.3): see python -m trainer --help")
    return parsed.train
