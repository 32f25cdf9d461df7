"""Checkpoints with exact resume, in open formats: trainable weights and RNG states as safetensors, optimizer
state with torch.save (read back with weights_only=True), everything else JSON. A checkpoint folder is written
under a temporary name and renamed when complete, so a crash never leaves a half checkpoint that looks whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, generators: dict[str, torch.Generator],
                    extra_modules: dict[str, torch.nn.Module] | None = None,
                    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    state: dict | None = None, keep: int = 2) -> Path:
    folder = Path(folder)
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for name, opt in (extra_optimizers or {}).items():
        torch.save(opt.state_dict(), tmp / f"optimizer-{name}.pt")
    for name, module in (extra_modules or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(tmp / f"{name}.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    rng.update({f"gen_{k}": g.get_state() for k, g in generators.items()})
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in Path(folder).glob(f"{PREFIX}*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler, generators: dict[str, torch.Generator],
                    extra_modules: dict[str, torch.nn.Module] | None = None,
                    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict:
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable tensors {sorted(missing)[:3]}...: it was written by "
                         "a run with other trainable parameters (lora / freeze options); start a new run_name")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    for name, opt in (extra_optimizers or {}).items():
        opt.load_state_dict(torch.load(path / f"optimizer-{name}.pt", weights_only=True))
    for name, module in (extra_modules or {}).items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for k, g in generators.items():
        g.set_state(rng[f"gen_{k}"])
    return json.loads((path / "state.json").read_text())
