"""Every torchvision classification model by name: ``--arch tv.<name>`` (``tv.mobilenet_v2``,
``tv.vit_b_16``, ``tv.resnext50_32x4d``, ...), the names of ``torchvision.models.list_models``.

The ``tv.`` namespace keeps torchvision's ``resnet18`` (ImageNet) apart from the registry's own
``resnet18`` (the HYDRA/BiP CIFAR network). A model is built with ``weights=None`` (nothing is
downloaded) and the dataset's class count; pretrained weights come through ``--source-net FILE``,
a torchvision state dict (``torch.save(model.state_dict(), FILE)``), with ``--reset-head`` when its
class count differs. What the dataset needs of a model is set here, per family:
- ``in_channels`` != 3: the first 3-channel convolution is rebuilt with that input width (same
  kernel, stride and padding; kaiming-normal init), so a grey-scale dataset can train it;
- ViT and MaxViT take the image size as a constructor argument (their position embeddings and
  windows depend on it): the dataset's is passed;
- GoogLeNet and Inception-v3 are built without their auxiliary classifiers (their training-mode
  output is a tuple no trainer here reads).
An image too small for a model (a ViT patch that does not divide it, strides that shrink it to
nothing) is refused with one line naming --image-dim, when the run measures the model.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any, cast

import torchvision.models as tvm
from torch import nn

from configs.errors import UserError

PREFIX = "tv."
HELP_NAME = "tv.<name> (any torchvision classification model)"


@functools.cache
def torchvision_names() -> list[str]:
    """torchvision's classification models (``list_models(module=torchvision.models)``: no detection,
    segmentation, video or quantised ones)."""
    return sorted(tvm.list_models(module=tvm))


def _family_kwargs(name: str, image_size: int) -> dict[str, Any]:
    if name.startswith("vit_"):
        return {"image_size": image_size}
    if name.startswith("maxvit_"):
        return {"input_size": (image_size, image_size)}
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def _first_rgb_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for full, module in model.named_modules():
        if type(module) is nn.Conv2d and module.in_channels == 3 and module.groups == 1:
            parent_name, _, attr = full.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    return None


def _set_input_channels(model: nn.Module, in_channels: int, arch: str) -> None:
    found = _first_rgb_conv(model)
    if found is None:
        raise UserError(f"--arch {arch} has no 3-channel input convolution to widen to {in_channels} channels; "
                        "use a 3-channel dataset")
    parent, attr, old = found
    pair = tuple[int, int]  # what a Conv2d holds, typed more loosely by torch
    new = nn.Conv2d(in_channels, old.out_channels, cast(pair, old.kernel_size), stride=cast(pair, old.stride),
                    padding=cast("str | pair", old.padding), dilation=cast(pair, old.dilation),
                    bias=old.bias is not None, padding_mode=old.padding_mode, device=old.weight.device)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    setattr(parent, attr, new)


def unknown(arch: str) -> UserError:
    name = arch[len(PREFIX):]
    close = difflib.get_close_matches(name.lower(), torchvision_names(), n=1, cutoff=0.0)
    hint = f"; did you mean 'tv.{close[0]}'?" if close else ""
    return UserError(f"unknown torchvision classification model {arch!r} for --arch{hint} "
                     "(the names of torchvision.models.list_models(), prefixed with tv.)")


def build_torchvision(arch: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """``arch`` = ``tv.<name>``: torchvision's model, untrained, for this dataset (module docstring)."""
    name = arch[len(PREFIX):]
    if name not in torchvision_names():
        raise unknown(arch)
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **_family_kwargs(name, image_size))
    except (AssertionError, ValueError) as exc:  # e.g. a ViT patch size that does not divide the image
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--arch {arch} cannot take {image_size}x{image_size} inputs ({first[:160]}); "
                        "pass another --image-dim") from None
    if in_channels != 3:
        _set_input_channels(model, in_channels, arch)
    return model
