"""Which weights train: frozen vision tower (default), LoRA adapters or the whole language model; and how the
final model is saved (`save_pretrained`: an adapter folder, or the merged / full model)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from trainer.config import TrainConfig

VISION_KEYS = ("vision_tower", "visual", "vision_model", "image_encoder")
# The modules between the vision tower and the language model: LLaVA's projector (and LLaVA-NeXT's learned
# `image_newline`), Qwen2-VL's patch merger, Idefics3 / SmolVLM's connector, PaliGemma's projector.
PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector", "merger", "connector", "image_newline")


def _is_vision(name: str) -> bool:
    return any(k in name for k in VISION_KEYS) and not any(k in name for k in PROJECTOR_KEYS)


def _is_projector(name: str) -> bool:
    return any(k in name for k in PROJECTOR_KEYS)


def projector_modules(model: torch.nn.Module) -> list[str]:
    """Full names of the outermost projector / connector modules (not their children, not bare parameters)."""
    names = [name for name, module in model.named_modules()
             if name and _is_projector(name.split(".")[-1]) and any(True for _ in module.parameters())]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def language_model_prefix(model: torch.nn.Module) -> str | None:
    """Qualified name of the language model inside a VLM (`model.language_model`, Idefics3's `model.text_model`),
    found by identity with the model's `get_decoder()`; None when the model does not say (then names decide)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        return None
    return next((name for name, module in model.named_modules() if module is decoder and name), None)


def _in_language_model(name: str, prefix: str | None) -> bool:
    if prefix is not None:
        return name.startswith(prefix + ".")
    return not _is_vision(name) and not _is_projector(name)


def language_linear_modules(model: torch.nn.Module) -> list[str]:
    """Names of the Linear layers of the language model: LoRA's targets for `all-linear` (peft's own
    `all-linear` would also adapt the frozen vision tower and the projector / connector)."""
    prefix = language_model_prefix(model)
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and _in_language_model(name, prefix)})


def lora_target_pattern(model: torch.nn.Module, targets: list[str]) -> str:
    """peft `target_modules` regex: the named layers inside the language model only (a module name alone also
    matches vision-tower layers: Qwen2.5-VL's vision MLP has `gate_proj` too), never a vision or projector one."""
    prefix = language_model_prefix(model)
    inside = re.escape(prefix) + r"\..*" if prefix is not None else ".*"
    return (r"^(?!.*(" + "|".join(VISION_KEYS + PROJECTOR_KEYS) + r"))" + inside
            + r"\.(" + "|".join(map(re.escape, targets)) + r")$")


def prepare_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = (language_linear_modules(model) if cfg.lora_target_modules == "all-linear"
                   else [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()])
        # A trained projector must reach the adapter folder (`final/`), or evaluating the run would silently use
        # the base's projector: peft saves it only as a `modules_to_save` module. A projector *parameter* outside
        # such a module (LLaVA-NeXT's `image_newline`) cannot be saved in an adapter, so it stays frozen.
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_target_pattern(model, targets), bias="none",
                          modules_to_save=None if cfg.freeze_projector else projector_modules(model) or None)
        model = get_peft_model(model, lora)
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
