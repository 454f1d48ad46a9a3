"""Initialisations of the importance scores, by name (HYDRA's ``--scores-init-type``).

``scaled`` is HYDRA's scaled-score init: s = sqrt(6 / fan_in) * w / max|w|, written into the
scores' own storage (BiP aliases the scores to the weights here, a bug we do not repeat).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from layers.masked import MaskedLayer

_RELU_GAIN = nn.init.calculate_gain("relu")


def _scaled(layer: MaskedLayer) -> None:
    fan_in = nn.init._calculate_correct_fan(layer.popup_scores, "fan_in")
    w = layer.weight.detach()
    layer.popup_scores.copy_(math.sqrt(6 / fan_in) * w / w.abs().max().clamp_min(1e-12))


SCORE_INITS: dict[str, Callable[[MaskedLayer], object]] = {  # the return value is ignored
    "kaiming_uniform": lambda layer: nn.init.kaiming_uniform_(layer.popup_scores),
    "kaiming_normal": lambda layer: nn.init.kaiming_normal_(layer.popup_scores),
    "xavier_uniform": lambda layer: nn.init.xavier_uniform_(layer.popup_scores, gain=_RELU_GAIN),
    "xavier_normal": lambda layer: nn.init.xavier_normal_(layer.popup_scores, gain=_RELU_GAIN),
    "scaled": _scaled,
}


def init_scores(layers: dict[str, MaskedLayer], *, kind: str) -> None:
    """Initialise every layer's scores in place with the named scheme."""
    init = SCORE_INITS[kind]
    with torch.no_grad():
        for layer in layers.values():
            init(layer)
