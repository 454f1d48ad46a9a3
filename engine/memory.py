"""Will the run fit in memory? Estimated before anything is allocated, so that an impossible
``--batch-size``, ``--image-dim`` or Fisher size is a one-line error naming the flag that lowers it,
not an allocation failure (or the kernel's OOM killer) minutes into the run.

The estimates are LOWER bounds, so that a run is only refused when it certainly cannot fit:
- activations: the outputs of every leaf module for one sample, measured by a forward pass of the
  architecture built on PyTorch's ``meta`` device (shapes only, no memory, no compute), times the
  batch size. Autograd keeps at least these for the backward pass.
- parameters: every parameter and buffer of the model, once.
- WoodFisher adds its m x D gradient matrix and the activations of one Fisher mini-batch chunk.
Available memory: free CUDA memory on a GPU; MemAvailable of /proc/meminfo on the host.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from configs.errors import UserError
from configs.options import FisherOptions
from pruning.free_memory import available_bytes
from pruning.gradients import piece_size


@dataclass(frozen=True)
class MemoryNeed:
    """One allocation a run will make: its size, where it lives, and the flags that shrink it."""

    what: str
    bytes: int
    on_host: bool  # True: host memory even when the run is on a GPU (e.g. --offload-grads)
    fix: str


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def size(n: float) -> str:
    """Bytes in the unit a person reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """The architecture built on the meta device: shapes only, no memory. A constructor that computes
    with tensor values (torchvision's RegNet derives its widths with ``torch.arange(...).tolist()``)
    cannot run there; it is built on the CPU and moved to the meta device, the same shapes at the cost of
    one model's weights, which the run allocates next anyway."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:  # "Cannot copy out of meta tensor; no data!"
        return build().to("meta")


def activation_bytes_per_sample(model: nn.Module, *, in_channels: int, image_size: int,
                                dtype: torch.dtype = torch.float32) -> int:
    """Bytes of all leaf-module outputs for one sample of ``image_size`` pixels, from a forward pass
    of a meta-device ``model`` (see ``meta_model``). A shape the architecture cannot take (an image
    too small for its strides) raises UserError naming --image-dim."""
    total = 0

    def count(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        outs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        model.eval()
        model(torch.empty(1, in_channels, image_size, image_size, dtype=dtype, device="meta"))
    except (RuntimeError, AssertionError, ValueError) as exc:  # torchvision's ViT asserts its input size
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the architecture cannot take {image_size}x{image_size} inputs ({first[:160]}); "
                        "pass a larger --image-dim") from None
    finally:
        for h in handles:
            h.remove()
    return total


def model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_fits(needs: list[MemoryNeed], *, device: torch.device) -> None:
    """Raise UserError when the needs on one memory (the GPU's, or the host's) exceed what is free."""
    if device.type == "cuda":
        pools = [(False, [n for n in needs if not n.on_host]), (True, [n for n in needs if n.on_host])]
    else:
        pools = [(True, list(needs))]  # a CPU run: one memory for everything
    for on_host, group in pools:
        free = available_bytes(device, on_host=on_host) if group else None
        if free is None:
            continue
        total = sum(n.bytes for n in group)
        if total > free:
            worst = max(group, key=lambda n: n.bytes)
            where = "host memory" if on_host else f"{device} memory"
            raise UserError(f"this run needs at least {gib(total)} of {where} but {gib(free)} is free; the largest "
                            f"part is {worst.what} ({gib(worst.bytes)}): {worst.fix}")


def check_run_fits(*, build: Callable[[], nn.Module], in_channels: int, image_size: int,
                   masked_types: tuple[type, ...], batch_size: int, needs: Callable[..., list[MemoryNeed]],
                   device: torch.device) -> None:
    """Refuse a run that cannot fit in memory before anything is allocated: the architecture ``build``
    makes is measured on the meta device, so a huge --image-dim costs nothing here. ``needs``: the
    trainer's ``memory_needs`` (its options bound); ``masked_types``: the layer types the run masks."""
    shapes = meta_model(build)
    per_sample = activation_bytes_per_sample(shapes, in_channels=in_channels, image_size=image_size)
    masked = sum(cast(torch.Tensor, m.weight).numel() for m in shapes.modules() if type(m) in masked_types)
    check_fits(needs(per_sample_bytes=per_sample, batch_size=batch_size, model_bytes=model_bytes(shapes),
                     masked_weights=masked, on_gpu=device.type == "cuda"), device=device)


def fisher_memory_needs(options: FisherOptions, *, masked_weights: int, on_gpu: bool,
                        per_sample_bytes: int) -> list[MemoryNeed]:
    """The m x D Fisher gradient matrix and one Fisher forward's activations."""
    m = options.fisher_subsample_size
    offload = options.offload_grads and on_gpu
    hint = "" if offload or not on_gpu else ", or pass --offload-grads to keep them in host memory"
    chunk = piece_size(options.fisher_mini_bsz, options.max_mini_bsz)  # samples of one row per pass
    return [MemoryNeed(f"the {m} x {masked_weights:,} Fisher gradients", m * masked_weights * 4, offload,
                       f"lower --fisher-subsample-size{hint}"),
            MemoryNeed(f"the activations of a Fisher pass over {chunk} samples", per_sample_bytes * chunk,
                       False,
                       "pass a smaller --max-mini-bsz to split each --fisher-mini-bsz batch into smaller chunks")]
