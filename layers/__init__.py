"""Masked layers, the one top-k selector, and dense <-> masked conversion."""
from configs.choices import GRANULARITIES, LAYER_TYPES, SCOPES
from layers.convert import dense_state_dict, masked_layers, to_dense, to_masked
from layers.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from layers.maskset import (
    DEFAULT_MIN_UNITS,
    LayerSparsity,
    MaskSet,
    NMShapeError,
    build_maskset,
    dense_masks,
    read_layer_k,
)
from layers.scores_init import SCORE_INITS, init_scores
from layers.selector import SelectionError, n_keep, select_masks, select_nm, top_units

__all__ = [
    "DEFAULT_MIN_UNITS", "GRANULARITIES", "LAYER_TYPES", "SCOPES", "SCORE_INITS", "LayerSparsity", "MaskSet",
    "MaskedConv2d", "MaskedLayer", "MaskedLinear", "NMShapeError", "SelectionError", "build_maskset", "dense_masks",
    "dense_state_dict", "init_scores", "masked_layers", "n_keep", "select_masks", "select_nm", "to_dense",
    "read_layer_k", "to_masked", "top_units",
]
