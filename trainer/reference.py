"""The online reference: log-probs of the starting weights, computed every step, that never move.

Full fine-tuning keeps a frozen copy of the model. With LoRA the policy itself serves, adapters disabled. A
projector that trains in place outside the adapters would move that "reference" with every step (+7.4 nats after
3 steps at lr 1e-3 on the world VLM, issue 11); the trainer makes it peft's `modules_to_save` (a trained copy the
adapters switch off, and saved in the adapter folder). Anything else found training outside the adapters has its
starting values kept aside and swapped in for the reference forward. The reference forward runs in eval mode and under
the policy's autocast: at step 0 reference and policy log-probs are the same numbers, whatever the precision."""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from trainer.model_loading import EncodedBatch, response_logps_from_model


def is_adapter_parameter(name: str) -> bool:
    """What peft's `disable_adapter` turns off: LoRA / DoRA tensors (`lora_A`, `lora_B`, `lora_embedding_*`,
    `lora_magnitude_vector`) and the trained copies of `modules_to_save` (the projector: the original module
    serves while the adapters are off)."""
    return "lora_" in name or ".modules_to_save." in name


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, values: dict[str, torch.Tensor]):
    """Parameters `values` (by name) in place of the model's current data, restored on exit. Used without grad;
    the Parameter objects stay the same, so the optimizer and DDP never notice."""
    params = dict(model.named_parameters())
    saved = {}
    try:
        for name, value in values.items():
            saved[name] = params[name].data
            params[name].data = value
        yield
    finally:
        for name, data in saved.items():
            params[name].data = data


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class OnlineReference:
    """Build it from the (unwrapped) policy before the first update; `logps` gives reference log-probs of an
    encoded batch at any later step."""

    def __init__(self, model: torch.nn.Module, *, lora: bool, distributed_type: str = "NO"):
        self.rows, self.seconds = 0, 0.0  # what the reference cost this process (reference.json)
        self.copy = None
        self.starting: dict[str, torch.Tensor] = {}
        if not lora:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)
            return
        if not hasattr(model, "disable_adapter"):
            raise ValueError("lora=True but the model has no disable_adapter(): it is not a peft model")
        self.starting = {n: p.detach().clone() for n, p in model.named_parameters()
                         if p.requires_grad and not is_adapter_parameter(n)}
        if self.starting and distributed_type in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(
                f"reference=online with lora=true and trainable parameters outside the adapters "
                f"({sorted(self.starting)[:2]}...) cannot keep their starting values under {distributed_type} "
                "(sharded parameters): set freeze_projector: true, or reference: cached")

    @property
    def kept_parameters(self) -> list[str]:
        """Names of the non-adapter parameters whose starting values are kept (LoRA mode)."""
        return sorted(self.starting)

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module, batch: EncodedBatch, autocast=None) -> torch.Tensor:
        """(B,) reference log-probs. `policy`: the unwrapped policy (used with LoRA); `autocast`: the policy's
        autocast context-manager factory."""
        ctx = autocast() if autocast else contextlib.nullcontext()
        t0 = time.perf_counter()
        if self.copy is not None:
            with ctx:
                out = response_logps_from_model(self.copy, batch).double()
        else:
            with ctx, _eval_mode(policy), policy.disable_adapter(), _swapped(policy, self.starting):
                out = response_logps_from_model(policy, batch).double()
        self.rows += int(batch.input_ids.shape[0])
        self.seconds += time.perf_counter() - t0
        return out
