"""Robust training and evaluation (HYDRA's reason to exist): the objectives every trainer takes its
step on (``objectives``), the PGD attack (``attacks``) and randomized-smoothing certification
(``certify``). Imports configs only; trainers and engine import it."""
from robust.objectives import OBJECTIVES, build_objective

__all__ = ["OBJECTIVES", "build_objective"]
