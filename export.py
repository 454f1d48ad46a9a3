"""Write a trained checkpoint as a file that runs without this project (or as compact sparse storage).

    python export.py results/.../model_best.pth.tar --format slim --out model_slim.pt2
    python export.py CKPT --format slim --out model_slim.onnx      # ONNX, checked with onnxruntime
    python export.py CKPT --format sparse --out model_sparse.pth   # bitmask + values; deploy.load_sparse

Formats and suffixes: see deploy/api.py. The model is rebuilt from the checkpoint's own config
(arch, layer type, k, excluded layers); its input size is the checkpoint's --image-dim or its
dataset's native size, or --image-size. Bad input exits with status 2 and a one-line ``error:``;
nothing is written then. An existing --out is refused unless --force (then named as replaced); every
file is written atomically (engine.files), so a full disk leaves no truncated file under its name.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, NoReturn

import torch
from torch import nn

from configs.errors import UserError, one_line
from configs.options import ExportOptions, check_fields, parse_nm
from deploy.api import export_model
from deploy.slim import coupled_groups
from engine.checkpoint import classifier_name, load_checkpoint, load_model_state
from engine.source import set_stored_masks
from layers import MaskSet, build_maskset, to_masked
from layers.convert import exclusion_patterns
from models import build_model

# (input channels, side) of each dataset's images as train.py feeds them, so that a checkpoint can be
# exported without its data; --image-size overrides the side.
DATASET_INPUTS = {"Digits": (1, 8), "MNIST5k": (1, 28), "CIFAR10": (3, 32), "CIFAR100": (3, 32),
                  "TinyImageNet": (3, 64), "ImageNet": (3, 224)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see python export.py --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="export.py", description="Export a pruned checkpoint (slim, dense, masked or sparse).",
                     allow_abbrev=False)
    for f in dataclasses.fields(ExportOptions):
        meta, name = f.metadata, f.name
        help_text = f"{meta['help']} (default: {f.default})".replace("%", "%%")
        if name == "checkpoint":
            parser.add_argument(name, help=meta["help"])
            continue
        if name == "force":
            parser.add_argument("--force", action="store_true", help=help_text)
            continue
        kind = int if name == "image_size" else str
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, choices=meta["choices"],
                            default=f.default, required=name == "out", help=help_text)
    return parser


def read_options(argv: list[str]) -> ExportOptions:
    options = ExportOptions(**vars(build_parser().parse_args(argv)))
    check_fields(options)
    return options


def model_from_checkpoint(ckpt: dict[str, Any], *, source: str,
                          image_size: int | None) -> tuple[nn.Module, torch.Tensor]:
    """The model a train.py checkpoint holds (masked when it has masks), in eval mode, and an example input."""
    config = ckpt.get("config")
    if not config or "arch" not in config:
        raise UserError(f"{source} records no config (not written by train.py): export needs its arch, layer type "
                        "and k; fine-tune it once with train.py --exp-mode finetune to get one")
    channels, side = DATASET_INPUTS.get(config.get("dataset", ""), (3, 32))
    side = image_size or config.get("image_dim") or side
    state = ckpt["state_dict"]
    probe = build_model(config["arch"], num_classes=1, in_channels=channels, image_size=side)
    head = classifier_name(probe)
    num_classes = int(state[f"{head}.weight"].shape[0]) if head and f"{head}.weight" in state else 1
    model = build_model(config["arch"], num_classes=num_classes, in_channels=channels, image_size=side)
    masks = ckpt.get("masks")
    layer_type = config.get("layer_type", "dense")
    example = torch.zeros(1, channels, side, side)
    if masks and layer_type != "dense" and config.get("coupled"):
        # coupled masks also mask the pointwise linears and channel LayerNorms the dependency groups name
        maskset, _ = build_maskset(model, granularity=layer_type, k=config.get("k", 1.0),
                                   scope=config.get("scope", "global"),
                                   exclude=config.get("exclude_layers"), coupled=coupled_groups(model, example=example,
                                                                         granularity=layer_type))
        load_model_state(model, state, source=source, notice=lambda line: None)
        set_stored_masks(maskset, masks, source)
        return model.eval(), example
    if masks and layer_type != "dense":
        try:
            to_masked(model, granularity=layer_type, exclude=exclusion_patterns(config.get("exclude_layers")))
        except ValueError as exc:  # a recorded --exclude-layers that matches no layer of the architecture
            raise UserError(f"{source} records --exclude-layers {config.get('exclude_layers')!r}, but {exc}; "
                            "the checkpoint does not fit its own architecture: export a checkpoint train.py wrote "
                            "as it is") from None
    load_model_state(model, state, source=source, notice=lambda line: None)
    if masks and layer_type != "dense":
        maskset = MaskSet(model, k=config.get("k", 1.0), granularity=layer_type, scope=config.get("scope", "global"),
                          min_units=config.get("layer_floor"),
                          nm=parse_nm(config.get("nm", "2:4")) if layer_type == "nm" else None)
        set_stored_masks(maskset, masks, source)
    return model.eval(), example


def check_out(options: ExportOptions) -> bool:
    """Whether ``--out`` exists (and may be replaced: ``--force``); a UserError for a folder, or for an
    existing file without ``--force``. Checked before anything is loaded or written."""
    out = options.out
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; name the file to write, e.g. --out {os.path.join(out, 'model.pt2')}")
    exists = os.path.lexists(out)
    if exists and not options.force:
        raise UserError(f"--out {out} exists; pass --force to replace it, or choose another file")
    return exists


def run(options: ExportOptions) -> int:
    replaced = check_out(options)
    ckpt = load_checkpoint(options.checkpoint)
    model, example = model_from_checkpoint(ckpt, source=options.checkpoint, image_size=options.image_size)
    result = export_model(model, example=example, format=options.format, path=options.out)
    for line in result.lines():
        print(line)
    if replaced:
        print(f"replaced {options.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(read_options(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only or full file system: the writer left no file under the name
        print(f"error: cannot write {exc.filename or 'the export'} ({exc.strerror or exc}); free space or choose "
              "a writable --out", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
