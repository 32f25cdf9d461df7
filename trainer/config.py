"""The one config object of a training run: built from a YAML file plus `--key value` overrides, saved beside
the run, read back on resume."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    response's NLL alone)."""
    loss: dict = field(default_factory=dict)
    """Overrides of the preset's LossConfig, e.g. {beta: 0.3, is_mode: learned, k_prime: 2}."""
    model: str = ""
    """Local HF VLM folder (save_pretrained). Empty: the world base model (<data root>/models/base; `make base`)."""
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
    """Peak learning rate (AdamW; linear warmup then cosine)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
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
        self.loss_config()  # validates the overrides
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference={self.reference!r}: use one of {REFERENCE_MODES}")
        if self.reference == "cached" and self.loss_config().fresh_negatives:
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
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")

    def reference_mode(self) -> str:
        """`cached` or `online`: what `auto` resolves to for this loss."""
        if self.reference != "auto":
            return self.reference
        return "online" if self.loss_config().fresh_negatives else "cached"

    def loss_config(self) -> LossConfig:
        try:
            return LossConfig.from_preset(self.preset, **self.loss)
        except TypeError as err:
            raise ValueError(f"unknown loss override in {sorted(self.loss)}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _scalar(raw: str) -> Any:
    """YAML scalar, plus the numbers YAML 1.1 leaves as strings (`1e-3`)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(raw: str, current: Any) -> Any:
    """A command-line string in the type of the field it overrides."""
    if isinstance(current, bool):
        value = yaml.safe_load(raw)
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        return value
    if isinstance(current, str):
        return raw
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    return _scalar(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + overrides `--key value` / `--key=value`, dotted keys into `loss`
    (`--loss.beta 0.3`). Unknown keys are an error that lists the known ones."""
    data: dict[str, Any] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file is a YAML mapping of TrainConfig fields")
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    tokens = list(overrides or [])
    defaults = TrainConfig()
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}; overrides look like --max_steps 100")
        key, _, value = token[2:].partition("=")
        if not _:
            if not tokens:
                raise ValueError(f"--{key} needs a value")
            value = tokens.pop(0)
        key = key.replace("-", "_")
        if key.startswith("loss."):
            data.setdefault("loss", {})[key[5:]] = _scalar(value)
            continue
        if key not in names:
            raise ValueError(f"unknown option --{key}; known: {', '.join(sorted(names))}")
        data[key] = _coerce(value, getattr(defaults, key))
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {', '.join(sorted(names))}")
    return TrainConfig(**data)


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
