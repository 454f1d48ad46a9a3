"""Top-k accuracy counts (on the device, or read back as ints)."""
from __future__ import annotations

import torch


def correct_topk_counts(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k capped at #classes), as one
    int64 tensor on the logits' device: nothing is read back, so a training step can add it up there."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    # hit[:, j]: the label is the (j+1)-th logit; a cumulative sum along j then says "among the top j+1"
    hits = top.eq(target.view(-1, 1)).cumsum(1).sum(0)
    return torch.stack([hits[min(k, kmax) - 1] for k in ks])  # views by Python index: no index tensor to copy


def correct_topk(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """``correct_topk_counts`` read back as Python ints."""
    return [int(c) for c in correct_topk_counts(logits, target, ks).tolist()]
