"""How a run's forwards use the hardware: mixed precision (--amp), memory format (--channels-last)
and compilation (--compile), in one place so that each trainer's step calls it in a line or two.

- ``autocast()`` surrounds a step's forward and loss (both levels of BiP) and an evaluation's
  forwards, never a whole epoch: backward passes run outside it (as torch.amp recommends), and the
  OBS algebra (pruning.gradients, pruning.fisher_inverse, pruning.solver, engine.obs_update)
  runs between steps, so no autocast region reaches it and it stays float32/float64.
- ``backward_step()`` is loss.backward() + optimizer.step(), through a GradScaler with --amp fp16
  (float16 gradients underflow without it). Its state goes into the trainer state of checkpoints.
- ``prepare()`` puts the model in channels_last (4-D parameters and buffers: weights, scores, masks);
  ``compiled()`` gives the module the training forward calls (compiled with --compile).
- ``batch()`` puts a 4-D input batch in channels_last.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from configs.errors import UserError
from configs.options import SpeedOptions
from engine.evaluate import Batches, Evaluation

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Key of the GradScaler's state in a trainer state (only present with --amp fp16).
SCALER_STATE = "grad_scaler"


def check_speed(options: SpeedOptions, *, device: torch.device) -> None:
    """Refuse what the device cannot do, before the run folder exists."""
    if options.amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (float16 with loss scaling) and this run is on {device}: "
                        "use --amp bf16, which works on the CPU")
    if options.compile:
        check_compiler()


def check_compiler() -> None:
    """--compile's inductor backend builds C++ kernels (the CPU's, and the host side of the GPU's): without a
    C++ compiler it fails at the first step, after the run folder exists. Asked of inductor itself."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # imported only with --compile: it is heavy

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor's InvalidCxxCompiler, or its probe of the compiler failing
        raise UserError(f"--compile needs a C++ compiler (g++ or clang++ on PATH, or $CXX) and none works here "
                        f"({type(exc).__name__}); install one or drop --compile") from None


class Precision:
    """The speed options of one run on one device (see the module docstring)."""

    def __init__(self, *, options: SpeedOptions | None = None, device: torch.device) -> None:
        self.options = options if options is not None else SpeedOptions()
        self.device_type = device.type
        self.dtype = AMP_DTYPES[self.options.amp]
        # Disabled (a pass-through) unless fp16: bfloat16 has float32's exponent range, nothing underflows.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.options.amp == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: nn.Module) -> None:
        """Convert ``model`` in place to channels_last; parameters keep their identity (optimizers,
        DDP and the mask set see the same tensors)."""
        if self.options.channels_last:
            model.to(memory_format=torch.channels_last)

    def compiled(self, module: nn.Module) -> nn.Module:
        """The module a training forward calls: ``module`` (the model, or DDP around it: compiling the
        DDP module lets dynamo split the graph at DDP's buckets) compiled with --compile, else itself.
        The compiled wrapper shares the model's parameters and buffers; checkpoints, masks and the OBS
        code keep using the plain model (its state_dict has no ``_orig_mod.`` prefix)."""
        if self.options.compile:
            return torch.compile(module)  # type: ignore[return-value]
        return module

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """loss.backward() and optimizer.step(); with fp16 the loss is scaled, the gradients unscaled,
        the step skipped when one is inf/nan, and the scale updated (GradScaler)."""
        if not self.scaler.is_enabled():
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The entries this adds to a trainer state: the GradScaler's (scale, growth tracker), if used."""
        return {SCALER_STATE: self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.scaler.is_enabled():
            return
        if not state.get(SCALER_STATE):
            raise ValueError("checkpoint has no GradScaler state (it was not written with --amp fp16)")
        self.scaler.load_state_dict(state[SCALER_STATE])

    def evaluation(self, evaluation: Evaluation) -> Evaluation:
        """``evaluation`` with its forwards under autocast and its batches in the run's memory format."""
        if self.dtype is None and not self.options.channels_last:
            return evaluation

        def run(model: nn.Module, loader: Batches, *, device: torch.device) -> dict[str, float]:
            with self.autocast():
                return evaluation.run(model, _Formatted(loader, self), device=device)
        return dataclasses.replace(evaluation, run=run)


class _Formatted:
    """A loader whose input batches are in the run's memory format; iterable more than once (the
    smoothing evaluation reads its loader twice)."""

    def __init__(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: Precision) -> None:
        self.loader = loader
        self.precision = precision

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.precision.batch(x), y) for x, y in self.loader)
