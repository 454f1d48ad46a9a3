"""Checkpoints: atomic writes, ``weights_only`` reads checked for shape, and HYDRA/BiP compatibility.

A checkpoint is a dict with HYDRA/BiP's keys ``epoch arch state_dict best_prec1 optimizer`` plus
``mask_optimizer trainer_state masks masks_frozen config rng history``. Everything in it is
tensors and plain containers, so it loads with ``torch.load(weights_only=True)``: a checkpoint
never executes code. ``load_checkpoint`` checks the structure every caller relies on and
``check_resumable`` what a resumed run needs, so a damaged or foreign file is one clear error
here instead of a traceback deep in the run.

Every file of a run folder that is rewritten (checkpoints, summary.json, metrics.csv) goes through
``engine.files.atomic_write``, the project's one writer: a temporary ``.tmp-*`` file in the same
folder, fsync, then a rename, with SIGINT/SIGTERM held until the file is complete. A crash leaves
the previous file whole and at worst a stale temporary file, which the next write into that folder
(or ``remove_stale_temps``, when the run is resumed) deletes.

Loading a state dict into a model is strict. The only keys allowed to be absent are the ones the
caller names (mask buffers are a function of the scores; a dense checkpoint has no scores when it
is about to be pruned); WRN checkpoints of the public code carry an unused ``sub_block1`` that is
dropped with a notice. Anything else that does not match is an error listing the keys.
"""
from __future__ import annotations

import numbers
import os
import pickle
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from configs.errors import UserError
from engine.files import TMP_PREFIX, atomic_write
from engine.files import is_storage_error as is_storage_error  # re-exported: train.py asks it of a failed write

DROPPED_PREFIXES = ("sub_block1.",)  # HYDRA/BiP WideResNet: built, saved, never used
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch.save's zip format; the legacy pickle format


# -- writing: the one atomic writer (engine.files) -------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


# -- reading --------------------------------------------------------------------------------------
def rewind_checkpoint(folder: str, epoch: int) -> str:
    """Where a pretrain run with --rewind-epoch keeps its weights after ``epoch`` epochs (LTH's rewind point)."""
    return os.path.join(folder, f"rewind_epoch_{epoch}.pth.tar")


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint (ours, HYDRA's, BiP's, or a bare state dict) without executing code.

    Returns a dict that always has ``state_dict`` (with any DataParallel ``module.`` prefix
    removed) mapping names to tensors; ``masks`` and ``config``, where present, are checked too.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}; pass the path of a .pth.tar file written by a previous run")
    if os.path.basename(path).startswith(TMP_PREFIX):
        raise UserError(f"{path} is the temporary file of an unfinished checkpoint write; "
                        "pass checkpoint.pth.tar or model_best.pth.tar of the same folder")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror}); check the path and its permissions") from None
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        what = "it is empty" if not head else f"it starts with {head!r}"
        raise UserError(f"{path}: not a PyTorch checkpoint ({what}); pass a .pth.tar file written by torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"{path}: refusing to load: it holds objects other than tensors and plain containers "
                        f"({first[:120]}); re-save it as a plain state dict") from None
    except Exception as exc:  # parsing a damaged file can fail in many ways; none is a bug of ours
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}); "
                        "is the file complete and written by torch.save?") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    if "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = {"state_dict": obj}  # a bare state dict (e.g. from --save-dense)
        else:
            raise UserError(f"{path}: no 'state_dict' in the checkpoint (keys: {sorted(map(str, obj))[:6]}); "
                            "pass a checkpoint written by train.py, HYDRA or BiP")
    _check_structure(obj, path)
    sd = obj["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        obj["state_dict"] = {k[len("module."):]: v for k, v in sd.items()}
    return obj


def _bad(path: str, what: str) -> UserError:
    return UserError(f"{path}: {what}; the file is damaged or not a model checkpoint "
                     "(pass one written by train.py, HYDRA or BiP)")


def _check_structure(obj: dict[str, Any], path: str) -> None:
    sd = obj["state_dict"]
    if not isinstance(sd, dict):
        raise _bad(path, f"'state_dict' is a {type(sd).__name__}, expected a mapping of parameter names to tensors")
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise _bad(path, f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
    masks = obj.get("masks")
    if masks is not None:
        if not isinstance(masks, dict):
            raise _bad(path, f"'masks' is a {type(masks).__name__}, expected a mapping of layer names to bool tensors")
        for name, mask in masks.items():
            if not isinstance(name, str) or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                what = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
                raise _bad(path, f"masks[{name!r}] is {what}, expected a bool tensor")
            weight = sd.get(f"{name}.weight", sd.get(f"module.{name}.weight"))
            if weight is not None and weight.shape != mask.shape:
                raise _bad(path, f"masks[{name!r}] has shape {tuple(mask.shape)} but {name}.weight has "
                                 f"{tuple(weight.shape)}")
    config = obj.get("config")
    if config is not None and not isinstance(config, dict):
        raise _bad(path, f"'config' is a {type(config).__name__}, expected a mapping of option: value")


def check_resumable(ckpt: dict[str, Any], source: str) -> None:
    """What ``--resume`` needs beyond ``load_checkpoint``: the run's config, its epoch and best
    accuracy, optimizer state, RNG state and (since it exists) the per-epoch history."""
    if not ckpt.get("config"):
        raise UserError(f"{source} was not written by this train.py (no config in it); "
                        "use --source-net to start from it instead of --resume")
    epoch = ckpt.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise _bad(source, f"'epoch' is {epoch!r}, expected the number of completed epochs")
    best = ckpt.get("best_prec1")
    if isinstance(best, bool) or not isinstance(best, numbers.Real):
        raise _bad(source, f"'best_prec1' is {best!r}, expected a number")
    state = ckpt.get("trainer_state")
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise _bad(source, "no usable 'trainer_state' (optimizer state) to continue from")
    if ckpt.get("masks_frozen") and not isinstance(ckpt.get("masks"), dict):
        raise _bad(source, "'masks_frozen' is set but it holds no masks")
    try:
        _rng_parts(ckpt.get("rng"))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise _bad(source, f"no usable 'rng' state ({reason})") from None
    history = ckpt.get("history")
    if history is not None:
        if not isinstance(history, list) or not all(isinstance(row, dict) and isinstance(row.get("epoch"), int)
                                                    for row in history):
            raise _bad(source, "'history' is not a list of per-epoch rows")


def classifier_name(model: nn.Module) -> str | None:
    """The model's classifier: its last ``nn.Linear`` in module order (None if it has none)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


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
    head = classifier_name(model)
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            shapes = f"{source}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}"
            if head is not None and key.startswith(head + ".") and value.shape[:1] != own[key].shape[:1]:
                raise UserError(f"{shapes}: its classifier has {value.shape[0]} classes, this model "
                                f"{own[key].shape[0]}; pass --reset-head to start a fresh classifier (or the "
                                "--dataset / --num-classes it was trained on)")
            raise UserError(f"{shapes}; check --arch, --num-classes and --dataset")
    merged = {**own, **state_dict}
    model.load_state_dict(merged, strict=True)
    return absent


# -- random number generator state: plain tensors/ints so that weights_only can read it back ---
def rng_state() -> dict[str, Any]:
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # the global RandomState (MT19937) gives the legacy tuple
    kind, keys, pos, has_gauss, cached = legacy
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_parts(state: Any) -> tuple[torch.Tensor, tuple, tuple, list | None]:
    """(torch, numpy, python, cuda) states from ``rng_state()``'s dict, each tried on a fresh
    generator so that a malformed one raises here (TypeError/ValueError) and not mid-run."""
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
        raise ValueError("expected torch, numpy and python entries")
    t, n, py, cuda = state["torch"], state["numpy"], state["python"], state.get("cuda")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise TypeError("the torch state is not a uint8 tensor")
    torch.Generator().set_state(t)
    if not isinstance(n, dict) or not isinstance(n.get("keys"), torch.Tensor) or n["keys"].shape != (624,):
        raise TypeError("the numpy state has no key tensor of MT19937's 624 words")
    np_state = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.RandomState().set_state(np_state)
    if not isinstance(py, (tuple, list)) or len(py) != 3 or not isinstance(py[1], (tuple, list)):
        raise TypeError("the python state is not (version, internal state, gauss)")
    py_state = (py[0], tuple(py[1]), py[2])
    random.Random().setstate(py_state)
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(c, torch.Tensor) for c in cuda)):
        raise TypeError("the cuda state is not a list of tensors")
    return t, np_state, py_state, cuda


def set_rng_state(state: dict[str, Any]) -> None:
    t, np_state, py_state, cuda = _rng_parts(state)
    torch.set_rng_state(t)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
