"""Writing a model so that it runs without this project, and the compact sparse storage.

- ``save_program``: a ``torch.export`` program (``.pt2``); ``torch.export.load(path).module()``
  runs it with PyTorch alone. The batch dimension is dynamic, the image size fixed.
- ``save_onnx``: ONNX (``.onnx``) at the pinned torch's default opset, batch dimension dynamic;
  ``check_onnx`` runs it with onnxruntime against the torch outputs.
- ``save_sparse`` / ``load_sparse``: unstructured masks stored as a bitmask plus the kept values
  (1 bit per weight + the survivors, instead of 32 bits per weight); ``load_sparse`` gives back
  the dense plain state dict (masks applied), which loads strictly into the architecture.

Every writer goes through a temporary file in the target folder and a rename, so a failed export
leaves nothing that looks finished.
"""
from __future__ import annotations

import copy
import importlib
import io
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from configs.errors import UserError
from engine.checkpoint import save_checkpoint
from engine.files import atomic_write, atomic_write_path
from layers import masked_layers
from layers.convert import PLAIN_TWIN

SPARSE_FORMAT = "pruning-trainer-sparse-v1"


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, then rename to ``path`` (``engine.files.atomic_write_path``): for writers that
    need a path (torch.export, ONNX)."""
    atomic_write_path(path, write)


class _ApplyMask(nn.Module):
    """weight -> weight * mask, as a parametrization: the exported graph multiplies at run time."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))  # 1 byte per weight in the file

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def exportable_masked(model: nn.Module) -> nn.Module:
    """A copy of a masked model that export can trace: plain layers whose weight is parametrized as
    weight * mask (no scores, no mask-set hook, no cached multiplier), same outputs."""
    twin = copy.deepcopy(model).eval()
    twin._forward_pre_hooks.clear()  # the MaskSet's re-selection hook: masks are fixed here
    for name, layer in masked_layers(twin).items():
        plain = cast(nn.Linear | nn.Conv2d, PLAIN_TWIN[type(layer)](layer))
        with torch.no_grad():
            plain.weight.copy_(layer.weight)
            bias = getattr(layer, "bias", None)  # Conv2d/Linear: a Parameter or None
            if bias is not None:
                assert plain.bias is not None
                plain.bias.copy_(bias)
        parametrize.register_parametrization(plain, "weight", _ApplyMask(layer.mask.detach()))
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, plain)
    return twin


def _frozen(model: nn.Module) -> nn.Module:
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    # torch.export specialises a dimension whose example size is 0 or 1: trace with two samples so
    # that the batch stays dynamic.
    return example[:1].expand(2, *example.shape[1:]).clone()


def save_program(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """A torch.export program of ``model`` (eval mode) with a dynamic batch dimension."""
    model, example = _frozen(model), _batch_of_two(example)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    # Serialised in memory, then written by the atomic writer: torch.export's own file writer aborts the
    # process (SIGABRT) on a full disk, where a write of bytes is an OSError naming the file.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


def load_program(path: str) -> nn.Module:
    return torch.export.load(path).module()


ONNX_EXTRA = "pip install 'pruning-trainer[onnx]'"


def require_onnx_exporter() -> None:
    """torch.onnx's exporter imports onnx and onnxscript; a UserError naming the extra when one is missing
    (they are optional: only .onnx files need them)."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"exporting to .onnx needs the {name} package: {ONNX_EXTRA}") from None


def save_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """ONNX at the default opset of the installed torch, dynamic batch dimension."""
    require_onnx_exporter()
    model, example = _frozen(model), _batch_of_two(example)

    def write(tmp: str) -> None:
        with torch.no_grad():
            torch.onnx.export(model, (example,), tmp, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim.AUTO},), external_data=False,
                              verbose=False)

    write_atomic(path, write)


def onnx_outputs(path: str, x: torch.Tensor) -> torch.Tensor:
    """Run an ONNX file with onnxruntime on CPU."""
    import onnxruntime  # optional: only exports to ONNX need it

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


# -- compact sparse storage -------------------------------------------------------------------------
def sparse_state(model: nn.Module) -> dict[str, Any]:
    """The masked model's plain weights: masked layers as bitmask + kept values, the rest as they are."""
    layers = masked_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("popup_scores", "mask"):
            continue
        if owner in layers and leaf == "weight":
            mask = layers[owner].mask.detach().cpu()
            bits = np.packbits(mask.flatten().numpy())
            sparse[key] = {"shape": list(value.shape), "bitmask": torch.from_numpy(bits),
                           "values": value.detach().cpu().flatten()[mask.flatten()].clone()}
        else:
            tensors[key] = value.detach().cpu().clone()
    return {"format": SPARSE_FORMAT, "tensors": tensors, "sparse": sparse}


def dense_from_sparse(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The dense plain state dict (zeros where pruned) of a ``sparse_state``."""
    if state.get("format") != SPARSE_FORMAT:
        raise ValueError(f"not a {SPARSE_FORMAT} file (format {state.get('format')!r})")
    out = dict(state["tensors"])
    for key, entry in state["sparse"].items():
        shape = torch.Size(entry["shape"])
        bits = np.unpackbits(entry["bitmask"].numpy(), count=shape.numel()).astype(bool)
        mask = torch.from_numpy(bits)
        dense = torch.zeros(shape.numel(), dtype=entry["values"].dtype)
        dense[mask] = entry["values"]
        out[key] = dense.view(shape)
    return out


def save_sparse(model: nn.Module, path: str, *, meta: dict[str, Any] | None = None) -> None:
    state = {**sparse_state(model), "meta": dict(meta or {})}
    save_checkpoint(state, path)


def load_sparse(path: str) -> dict[str, torch.Tensor]:
    """The dense plain state dict stored in a sparse file (read with weights_only: no code runs)."""
    return dense_from_sparse(torch.load(path, map_location="cpu", weights_only=True))

