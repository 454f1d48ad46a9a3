"""Masked layers, the one top-k selector, and dense <-> masked conversion."""
from layers.convert import dense_state_dict, masked_layers, to_dense, to_masked
from layers.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from layers.maskset import DEFAULT_MIN_UNITS, LayerSparsity, MaskSet, NMShapeError
from layers.scores_init import SCORE_INITS, init_scores
from layers.selector import GRANULARITIES, SCOPES, SelectionError, n_keep, select_masks, select_nm, top_units

LAYER_TYPES = ("dense",) + GRANULARITIES

__all__ = [
    "DEFAULT_MIN_UNITS", "GRANULARITIES", "LAYER_TYPES", "SCOPES", "SCORE_INITS", "LayerSparsity", "MaskSet",
    "MaskedConv2d", "MaskedLayer", "MaskedLinear", "NMShapeError", "SelectionError", "dense_state_dict", "init_scores",
    "masked_layers", "n_keep", "select_masks", "select_nm", "to_dense", "to_masked", "top_units",
]
