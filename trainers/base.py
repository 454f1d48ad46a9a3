"""The base trainer: plain training (pretrain, finetune) and HYDRA score learning (prune).

| mode     | optimizer owns                                   | mask                         |
|----------|--------------------------------------------------|------------------------------|
| pretrain | every parameter (the model is dense)             | none                         |
| prune    | scores, plus BatchNorm affine unless freeze_bn   | top-k of the scores (learned)|
| finetune | every parameter but the scores                   | fixed                        |

Parameters no optimizer owns get ``requires_grad=False`` so autograd skips their gradients (a
speed matter only: correctness comes from each optimizer owning exactly its parameters).

``bn_l1`` (--bn-l1, Network Slimming's penalty): before every step of the optimizer keyed ``optimizer``
(every trainer's weight optimizer; HYDRA's prune optimizer, which trains BatchNorm with the scores), the
BatchNorm weights it owns get lambda * sign(gamma) added to their gradient, the subgradient of
lambda * sum |gamma| (Liu et al. 2017, and their code's ``updateBN``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from configs.capabilities import Capabilities, RunSpec
from configs.choices import MODES
from configs.errors import UserError
from configs.options import OptionSection, RobustOptions, SpeedOptions
from engine.distributed import SINGLE, Dist, wrap
from engine.memory import MemoryNeed, size
from engine.metrics import correct_topk_counts
from engine.optim import OptimSettings, make_optimizer, own_only, split_parameters
from engine.precision import Precision
from layers import MaskSet
from robust import build_objective

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders


class BaseTrainer:
    """One optimizer; HYDRA's prune mode when the mode is ``prune``."""

    name = "base"
    # What it runs and accepts (configs.capabilities): every mode; HYDRA when it prunes.
    capabilities = Capabilities(label="hydra", modes=MODES)
    # The trainer's own options (a section of configs.options), or None: trainers.build reads an
    # instance of it off the run's config and passes it as ``options`` (configs.checks checks it).
    Options: type[OptionSection] | None = None
    # Whether a step's backward may leave a trainable parameter without a gradient (BiP's weight step
    # leaves the scores out): DDP must then look for unused parameters after each forward pass.
    unused_parameters = False

    def __init__(self, *, model: nn.Module, maskset: MaskSet | None, mode: str, device: torch.device,
                 weight_optim: OptimSettings, score_optim: OptimSettings | None = None, freeze_bn: bool = False,
                 label_smoothing: float = 0.0, progress: bool = True, log: Callable[[str], None] = print,
                 print_freq: int = 100, seed: int = 0, options: OptionSection | None = None,
                 robust: RobustOptions | None = None, source: str | None = None,
                 speed: SpeedOptions | None = None, group: Dist = SINGLE,
                 density_schedule: Callable[[int], float] | None = None, bn_l1: float = 0.0) -> None:
        """density_schedule: epoch -> the density in force (--k-schedule, ``pruning.schedule.EpochDensity``, or
        any callable of a library user): the mask set's k is set to it at the start of every epoch and the masks
        re-selected (exact counts, the same selector); its value at the last epoch must be the run's k.
        bn_l1: lambda of the L1 penalty on BatchNorm weights (--bn-l1; see the module docstring)."""
        self.model = model
        self.bn_l1 = bn_l1
        self.density_schedule = density_schedule
        self.group = group  # a distributed run's process group (engine.distributed); SINGLE otherwise
        self.source = source  # the --source-net checkpoint the run started from (lth finds its rewind point there)
        self.maskset = maskset
        self.mode = mode
        self.device = device
        self.progress = progress
        self.log = log
        self.print_freq = print_freq
        self.seed = seed
        if options is None and self.Options is not None:
            options = self.Options()  # the declared defaults
        self.options = options
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # --objective (shared by every trainer, not one trainer's section): the loss of every step.
        self.robust = robust if robust is not None else RobustOptions()
        self.objective = build_objective(self.robust, self.criterion)
        # --amp, --channels-last, --compile (engine.precision); channels_last before DDP sees the tensors.
        self.precision = Precision(options=speed, device=device)
        self.precision.prepare(model)
        self.settings: dict[str, OptimSettings] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.setup(weight_optim=weight_optim, score_optim=score_optim, freeze_bn=freeze_bn)
        # What a training step's forward runs: DDP around the model in a distributed run (after setup,
        # which decides which parameters train), compiled with --compile; the model itself otherwise.
        # Everything else (masks, evaluation, OBS steps, checkpoints) uses ``self.model``.
        self.net = self.precision.compiled(wrap(model, group=group, device=device,
                                                unused_parameters=self.unused_parameters))

    @classmethod
    def check_options(cls, options: OptionSection | None, *, run: RunSpec) -> None:
        """Reject a bad combination of the run's settings and this trainer's options with a UserError,
        before train.py creates the run folder (each option's own range is checked where it is
        declared). Nothing to check for the base trainer."""

    @classmethod
    def memory_needs(cls, *, per_sample_bytes: int, batch_size: int, model_bytes: int, masked_weights: int,
                     on_gpu: bool, options: OptionSection | None = None) -> list[MemoryNeed]:
        """The run's largest allocations (lower bounds; see ``engine.memory``), for a check before
        the run folder exists. A trainer with more (WoodFisher's gradients) adds its own."""
        return [
            MemoryNeed("the model's parameters and buffers", model_bytes, False, "use a smaller --arch"),
            MemoryNeed(f"the activations of a batch of {batch_size}", per_sample_bytes * batch_size, False,
                       f"lower --batch-size or --image-dim (each sample needs {size(per_sample_bytes)})"),
        ]

    def final_masks(self, epoch: int) -> bool:
        """Whether the model after ``epoch`` has the run's final masks (only those epochs compete for
        model_best). Always, for trainers whose masks keep density k throughout; under a density schedule,
        from the epoch that reaches the final density on."""
        if self.density_schedule is None or self.maskset is None:
            return True
        return self.density_schedule(epoch) == self.maskset.final_k

    def pop_notes(self) -> list[str]:
        """Lines for the run log that the epoch loop prints after ``train_epoch`` (e.g. pruning events)."""
        return []

    def summary_fields(self) -> dict[str, Any]:
        """The trainer's own entries of summary.json: ``method``, the name of the pruning method in the
        results report (its record's label; none outside prune)."""
        return {"method": self.capabilities.label if self.mode == "prune" else None}

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, *, weight_optim: OptimSettings, score_optim: OptimSettings | None, freeze_bn: bool) -> None:
        scores, bn, other = split_parameters(self.model)
        kept_bn = [] if freeze_bn else bn
        if self.mode == "prune":
            params = scores + kept_bn
        else:
            params = kept_bn + other
            if self.maskset is not None:
                self.maskset.freeze()
        own_only(self.model, params)
        self.add_optimizer("optimizer", params, weight_optim)

    def add_optimizer(self, key: str, params: list[nn.Parameter], settings: OptimSettings) -> None:
        self.settings[key] = settings
        self.optimizers[key] = make_optimizer(params, settings)
        if key == "optimizer" and self.bn_l1:
            self._add_bn_l1(self.optimizers[key], params)

    def _add_bn_l1(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """--bn-l1: lambda * sign(gamma) onto the gradient of every BatchNorm weight ``optimizer`` owns, in a
        step pre-hook: after backward and after DDP's all-reduce (the same gamma on every rank, so the term is
        added once), after --amp fp16's GradScaler has unscaled the gradients (``scaler.step`` unscales, then
        calls ``step``; a step it skips adds nothing), and for a trainer's own steps as much as the base one's."""
        owned = {id(p) for p in params}
        gammas = [m.weight for m in self.model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(m.weight, nn.Parameter)
                  and id(m.weight) in owned]
        if not gammas:
            why = "--freeze-bn keeps them fixed" if any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()) else "the model has none"
            raise UserError(f"--bn-l1 penalises the BatchNorm weights the weight optimizer trains, but {why}: drop "
                            "--bn-l1")
        lam = self.bn_l1

        def penalty(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for gamma in gammas:
                    if gamma.grad is not None:  # a step that computed no gradient for it leaves it alone
                        gamma.grad.add_(torch.sign(gamma), alpha=lam)

        optimizer.register_step_pre_hook(penalty)

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """Set every optimizer's learning rate for ``epoch`` (and the density, under a schedule); returns the
        learning rates by optimizer key."""
        if self.density_schedule is not None and self.maskset is not None and self.mode == "prune":
            self.maskset.set_k(self.density_schedule(epoch))
        lrs = {}
        for key, opt in self.optimizers.items():
            lrs[key] = self.settings[key].lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lrs[key]
        return lrs

    # -- one step ----------------------------------------------------------------------------
    def batches(self, loaders: Loaders) -> tuple[Iterator, int]:
        return iter(loaders.train), len(loaders.train)

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return self.precision.batch(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    def scaled(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """The loss whose gradient a step takes: in a distributed run, this rank's mean loss times
        ``n * N / n_global``, so that DDP's average over the ranks is the global batch's mean."""
        scale = self.group.loss_scale(n, loss.device)
        return loss if scale is None else loss * scale

    def step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step; returns (loss, logits, targets) of the batch it trained on."""
        x, y = self._to_device(batch)
        opt = self.optimizers["optimizer"]
        with self.precision.autocast():
            loss, logits = self.objective(self.net, x, y)
        opt.zero_grad(set_to_none=True)
        self.precision.backward_step(self.scaled(loss, len(y)), opt)
        return loss.detach(), logits.detach(), y

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int, loaders: Loaders) -> dict[str, float]:
        """One epoch of steps. The running loss and correct counts add up on the device and are read only on
        the steps that print (every ``print_freq``-th and the last), so a step never waits for the device
        there: a diverged loss, or NaN scores (``MaskSet.check_finite``), stop the run at the next of them."""
        self.model.train()
        batches, total = self.batches(loaders)
        bar = tqdm(batches, total=total, desc=f"epoch {epoch}", leave=False, disable=not self.progress,
                   dynamic_ncols=True)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x samples, top-1 and top-5 hits
        seen = 0
        means = {"loss": float("nan"), "top1": float("nan"), "top5": float("nan")}
        last = total - 1
        for i, batch in enumerate(bar):
            loss, logits, y = self.step(batch)
            n = y.shape[0]
            sums[0].add_(loss.to(sums.dtype), alpha=n)
            sums[1:].add_(correct_topk_counts(logits, y))
            seen += n
            if i % self.print_freq == 0 or i == last:
                loss_sum, c1, c5 = sums.tolist()
                means = {"loss": loss_sum / seen, "top1": 100.0 * c1 / seen, "top5": 100.0 * c5 / seen}
                if not math.isfinite(loss_sum):  # stop now: a diverged run only wastes time from here
                    raise FloatingPointError(f"training loss is {loss_sum / seen} by epoch {epoch}, batch {i}; "
                                             "lower --lr (or --mask-lr)")
                if self.maskset is not None:
                    self.maskset.check_finite()
                bar.set_postfix(loss=f"{means['loss']:.4f}", top1=f"{means['top1']:.2f}")
                if i % self.print_freq == 0:
                    self.log(f"epoch {epoch} [{i}/{total}] loss {means['loss']:.4f} top1 {means['top1']:.2f} "
                             f"top5 {means['top5']:.2f}")
        bar.close()
        return self.group.reduce_mean(means, seen)  # over every rank's samples

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict]:
        return {**{key: opt.state_dict() for key, opt in self.optimizers.items()}, **self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for key, opt in self.optimizers.items():
            if state.get(key) is None:
                raise ValueError(f"checkpoint has no state for {key}")
            opt.load_state_dict(state[key])
        self.precision.load_state_dict(state)
