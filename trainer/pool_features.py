"""Tensors of each example's candidate pool (proposal q, IS features) from shard rows."""

from __future__ import annotations

import torch

from trainer.proposal import candidate_features


def pool_tensors(examples: list[dict], num_latents: int, with_features: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q (B, C), mask (B, C), features (B, C, num_latents + 2) or None), pools padded to the longest."""
    width = max([len(ex["pool"]) for ex in examples] + [1])
    b = len(examples)
    q = torch.zeros(b, width, dtype=torch.float64)
    mask = torch.zeros(b, width, dtype=torch.bool)
    n_top = max([len(c["code_idx"]) for ex in examples for c in ex["pool"]] + [1])
    idx = torch.zeros(b, width, n_top, dtype=torch.long)
    val = torch.zeros(b, width, n_top, dtype=torch.float32)
    score = torch.zeros(b, width)
    sim = torch.zeros(b, width)
    for i, ex in enumerate(examples):
        for j, c in enumerate(ex["pool"]):
            q[i, j], mask[i, j], score[i, j], sim[i, j] = c["q"], True, c["score"], c["clip_sim"]
            if with_features:
                n = len(c["code_idx"])
                idx[i, j, :n] = torch.tensor(c["code_idx"], dtype=torch.long)
                val[i, j, :n] = torch.tensor(c["code_val"], dtype=torch.float32)
    feats = candidate_features(idx, val, score, sim, num_latents) if with_features else None
    return q, mask, feats
