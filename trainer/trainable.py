"""Which weights train: frozen vision tower (default), LoRA adapters or the whole language model; and how the
final model is saved (`save_pretrained`: an adapter folder, or the merged / full model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainer.config import TrainConfig

VISION_KEYS = ("vision_tower", "visual", "vision_model", "image_encoder")
PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector", "merger")


def _is_vision(name: str) -> bool:
    return any(k in name for k in VISION_KEYS) and not any(k in name for k in PROJECTOR_KEYS)


def _is_projector(name: str) -> bool:
    return any(k in name for k in PROJECTOR_KEYS)


def language_linear_modules(model: torch.nn.Module) -> list[str]:
    """Names of the Linear layers of the language model: LoRA's targets for `all-linear` (peft's own
    `all-linear` would also adapt the frozen vision tower)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _is_vision(name) and not _is_projector(name) \
                and not name.endswith("lm_head"):
            names.add(name.split(".")[-1])
    return sorted(names)


def prepare_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = (language_linear_modules(model) if cfg.lora_target_modules == "all-linear"
                   else [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()])
        # Restrict to the language model: a module name alone would also match the vision tower's layers.
        pattern = r"^(?!.*(" + "|".join(VISION_KEYS + PROJECTOR_KEYS) + r")).*\.(" + "|".join(targets) + r")$"
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=pattern, bias="none")
        model = get_peft_model(model, lora)
        if not cfg.freeze_projector:
            for name, p in model.named_parameters():
                if _is_projector(name):
                    p.requires_grad_(True)
    else:
        for name, p in model.named_parameters():
            frozen = (cfg.freeze_vision and _is_vision(name)) or (cfg.freeze_projector and _is_projector(name))
            p.requires_grad_(not frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: every parameter is frozen (check lora / freeze_* options)")
    return model


def save_final(model: torch.nn.Module, processor, folder: Path, *, merged: bool = False) -> Path:
    """A `save_pretrained` folder with the processor: the adapter (LoRA, default), or a full model."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload") and merged:
        model = model.merge_and_unload()
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
