"""Evaluation of a model on a loader: loss, top-1 and top-5."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from configs.registry import Registry
from engine.metrics import correct_topk


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             device: torch.device) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) of ``model`` on ``loader``."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, c1, c5, n = 0.0, 0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss += float(criterion(logits, y))
        a, b = correct_topk(logits, y)
        c1, c5, n = c1 + a, c5 + b, n + y.shape[0]
    return {"loss": loss / max(n, 1), "top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}


# --val-method: how a model is evaluated each epoch and at the end. BiP/HYDRA configs name it; a
# robust evaluation (adversarial, smoothed) is a new entry.
EVALUATIONS: Registry = Registry("evaluation", flag="--val-method")
EVALUATIONS.add("base", evaluate)
