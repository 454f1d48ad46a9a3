"""Checkpoints: atomic writes, ``weights_only`` reads, and HYDRA/BiP compatibility.

A checkpoint is a dict with HYDRA/BiP's keys ``epoch arch state_dict best_prec1 optimizer`` plus
``mask_optimizer masks config rng``. Everything in it is tensors and plain containers, so it loads
with ``torch.load(weights_only=True)``: a checkpoint never executes code.

Loading a state dict into a model is strict. The only keys allowed to be absent are the ones the
caller names (mask buffers are a function of the scores; a dense checkpoint has no scores when it
is about to be pruned); WRN checkpoints of the public code carry an unused ``sub_block1`` that is
dropped with a notice. Anything else that does not match is an error listing the keys.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from configs.errors import UserError

DROPPED_PREFIXES = ("sub_block1.",)  # HYDRA/BiP WideResNet: built, saved, never used


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (a temp file in the same folder, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth.tar", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint (ours, HYDRA's, BiP's, or a bare state dict) without executing code.

    Returns a dict that always has ``state_dict`` (with any DataParallel ``module.`` prefix removed).
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}; pass the path of a .pth.tar file written by a previous run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"{path}: refusing to load: it holds objects other than tensors and plain containers "
                        f"({first[:120]}); re-save it as a plain state dict") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}); "
                        "is the file complete and written by torch.save?") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    if "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = {"state_dict": obj}  # a bare state dict (e.g. from --save-dense)
        else:
            raise UserError(f"{path}: no 'state_dict' in the checkpoint (keys: {sorted(obj)[:6]}); "
                            "pass a checkpoint written by train.py, HYDRA or BiP")
    sd = obj["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        obj["state_dict"] = {k[len("module."):]: v for k, v in sd.items()}
    return obj


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
                     may_lack: Callable[[str], bool] = lambda key: False,
                     notice: Callable[[str], None] = print) -> list[str]:
    """Strictly load ``state_dict`` into ``model``; returns the model keys the checkpoint lacked.

    ``may_lack(key)`` says which model keys may be absent (they keep their current values).
    """
    dropped = [k for k in state_dict if k.startswith(DROPPED_PREFIXES)]
    if dropped:
        notice(f"{source}: dropping {len(dropped)} unused keys ({dropped[0].split('.')[0]}.*) of the public WRN code")
        state_dict = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    absent = sorted(set(own) - set(state_dict))
    missing = [k for k in absent if not may_lack(k)]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{source} does not fit this model: {'; '.join(parts)}; check --arch, --layer-type "
                        "and --dataset (class count) against the run that wrote it")
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(own[key].shape)}; check --arch, --num-classes and --dataset")
    merged = {**own, **state_dict}
    model.load_state_dict(merged, strict=True)
    return absent


# -- random number generator state: plain tensors/ints so that weights_only can read it back ---
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
