"""One call from a masked model to a file: ``export_model(model, example=..., format=..., path=...)``.

Formats (a registry: a new one is an entry, not a branch):

| format   | what is written                                           | file suffixes    |
|----------|-----------------------------------------------------------|------------------|
| `slim`   | the physically smaller plain network (``deploy.slim``)    | `.pt2`, `.onnx`  |
| `dense`  | the plain network, masks applied (same size as unpruned)  | `.pt2`, `.onnx`  |
| `masked` | the masked network: weight * mask computed in the graph   | `.pt2`, `.onnx`  |
| `sparse` | bitmask + kept values of the masked weights (compact)     | `.pth`           |

``.pt2`` is a ``torch.export`` program and ``.onnx`` an ONNX model: both run without this project.
Every written file is read back and its outputs compared with the masked model's.
"""
from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from configs.errors import UserError
from configs.registry import Registry
from deploy.formats import (
    dense_from_sparse,
    exportable_masked,
    load_program,
    onnx_outputs,
    save_onnx,
    save_program,
    save_sparse,
)
from deploy.slim import SlimError, SlimReport, slim
from layers import dense_state_dict, masked_layers, to_dense

PROGRAM_SUFFIXES = (".pt2", ".onnx")


@dataclass
class ExportResult:
    path: str
    format: str
    file_bytes: int
    params: int
    max_abs_diff: float            # written file vs the masked model, on random inputs
    dense_bytes: int | None = None  # sparse: the size of the dense state dict it replaces
    slim: SlimReport | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = list(self.slim.lines()) if self.slim is not None else []
        size = f"{self.file_bytes:,} bytes"
        if self.dense_bytes is not None:
            size += f" (dense state dict {self.dense_bytes:,} bytes, {self.file_bytes / self.dense_bytes:.1%})"
        out.append(f"wrote {self.path}: {self.format}, {self.params:,} parameters, {size}")
        out.append(f"checked: the file's outputs match the masked model's (max |difference| {self.max_abs_diff:.2e})")
        return out + self.notes


@dataclass(frozen=True)
class Format:
    suffixes: tuple[str, ...]
    write: Callable[[nn.Module, torch.Tensor, str], ExportResult]
    needs_masks: bool = True


FORMATS: Registry[Format] = Registry("export format", flag="--format")


def _check_inputs(example: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn((3,) + tuple(example.shape[1:]), generator=gen, dtype=example.dtype)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


def _write_network(net: nn.Module, model: nn.Module, example: torch.Tensor, path: str, fmt: str,
                   report: SlimReport | None = None) -> ExportResult:
    """Write ``net`` as a program or ONNX (by suffix), read it back, compare with ``model``."""
    x = _check_inputs(example)
    if path.endswith(".onnx"):
        save_onnx(net, example, path)
        notes = []
        try:
            got = onnx_outputs(path, x)
        except ImportError:
            got, notes = None, ["onnxruntime is not installed: the ONNX file was not run (pip install "
                                   "'pruning-trainer[onnx]')"]
    else:
        save_program(net, example, path)
        with torch.no_grad():
            got, notes = load_program(path)(x), []
    diff = float((got - _reference(model, x)).abs().max()) if got is not None else float("nan")
    params = sum(p.numel() for p in net.parameters())
    return ExportResult(path=path, format=fmt, file_bytes=os.path.getsize(path), params=params, max_abs_diff=diff,
                        slim=report, notes=notes)


def _write_slim(model: nn.Module, example: torch.Tensor, path: str) -> ExportResult:
    structured = {layer.granularity for layer in masked_layers(model).values()}
    if not structured <= {"filter", "channel"}:
        raise UserError(f"--format slim removes whole filters or channels, but this model's masks are "
                        f"{'/'.join(sorted(structured))}: use --format sparse (compact storage) or prune with "
                        "--layer-type filter or channel")
    try:
        net, report = slim(model, example=example)
    except SlimError as exc:
        raise UserError(f"--format slim: {exc}") from None
    return _write_network(net, model, example, path, "slim", report)


def _write_dense(model: nn.Module, example: torch.Tensor, path: str) -> ExportResult:
    return _write_network(to_dense(copy.deepcopy(model)), model, example, path, "dense")


def _write_masked(model: nn.Module, example: torch.Tensor, path: str) -> ExportResult:
    return _write_network(exportable_masked(model), model, example, path, "masked")


def _write_sparse(model: nn.Module, example: torch.Tensor, path: str) -> ExportResult:
    save_sparse(model, path)
    dense = dense_state_dict(model)
    buffer = io.BytesIO()
    torch.save(dense, buffer)
    # read back: the dense state dict must be the one the masked model computes with
    restored = dense_from_sparse(torch.load(path, map_location="cpu", weights_only=True))
    plain = to_dense(copy.deepcopy(model))
    plain.load_state_dict(restored, strict=True)
    x = _check_inputs(example)
    diff = float((_reference(plain, x) - _reference(model, x)).abs().max())
    kept = sum(int(layer.mask.sum()) for layer in masked_layers(model).values())
    other = sum(v.numel() for k, v in restored.items() if k.rpartition(".")[0] not in masked_layers(model)
                or not k.endswith(".weight"))
    return ExportResult(path=path, format="sparse", file_bytes=os.path.getsize(path), params=kept + other,
                        max_abs_diff=diff, dense_bytes=len(buffer.getvalue()),
                        notes=[f"load it with deploy.load_sparse({path!r}): the dense plain state dict"])


FORMATS.add("slim", Format(suffixes=PROGRAM_SUFFIXES, write=_write_slim))
FORMATS.add("dense", Format(suffixes=PROGRAM_SUFFIXES, write=_write_dense, needs_masks=False))
FORMATS.add("masked", Format(suffixes=PROGRAM_SUFFIXES, write=_write_masked))
FORMATS.add("sparse", Format(suffixes=(".pth",), write=_write_sparse))


def check_request(model: nn.Module, *, format: str, path: str) -> Format:
    """The format entry, or a UserError for a request that cannot be met (before anything is written)."""
    entry = FORMATS.get(format)
    if not path.endswith(entry.suffixes):
        raise UserError(f"--out {path}: --format {format} writes {' or '.join(entry.suffixes)} files; "
                        f"name the output file with one of these suffixes")
    if entry.needs_masks and not masked_layers(model):
        raise UserError(f"--format {format} needs a pruned (masked) model, and this one has no masks: "
                        "export it with --format dense, or pass a checkpoint of --exp-mode prune/finetune")
    return entry


def export_model(model: nn.Module, *, example: torch.Tensor, format: str, path: str) -> ExportResult:
    """Write ``model`` (masked, or plain for ``dense``) in ``format`` to ``path``; see the module docstring.

    example: one input batch (its shape and dtype are used; values do not matter).
    """
    entry = check_request(model, format=format, path=path)
    return entry.write(model, example, path)

