"""BiP: bi-level pruning, weights (lower level) and scores (upper level) learned together.

Two iterations, chosen by ``implicit_grad``.

``"paper"`` (the default), Algorithm 1 of the paper. One iteration on two distinct batches, x1
(lower) and x2 (upper, from the second stream):
1. lower level: one step of the weight optimizer on l(m * theta; x1) (+ its weight decay),
   scores untouched;
2. upper level at the new weights, on x2: g_s = dl/ds (straight-through) and
   g_theta = dl/dtheta of each masked layer, in ONE backward pass; the scores' gradient is
   g_s - lr2 * g_s * g_theta and the mask optimizer (its own lr and schedule) takes one step.
With ``accelerate`` each iteration takes a score step on x2 then a weight step on x1, with no
implicit term (BiP's fast mode). Each optimizer owns only its parameters, and gradients are taken
with ``torch.autograd.grad`` for exactly the tensors a step needs, so nothing depends on toggling
``requires_grad``.

``"bip-code"``: the iteration of the public code (github.com/OPTML-Group/BiP, trainer/bilevel.py)
as it runs on the PyTorch 1.x it was written for; see ``PublicBipIteration``. Its learning rates
still follow our ``--lr``/``--mask-lr`` and their schedules (the public code's mask schedule
ignores ``mask_lr`` and uses ``lr``; that bug is not reproduced).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from configs.capabilities import Capabilities
from configs.errors import UserError
from configs.options import IMPLICIT_GRADS, BilevelOptions
from engine.optim import OptimSettings, own_only, split_parameters
from engine.precision import Precision
from layers import MaskSet
from trainers.base import BaseTrainer
from trainers.registry import register_trainer

if TYPE_CHECKING:  # annotations only
    from data.loaders import Loaders

# Key of the bip-code iteration's own state in the trainer state; its presence also tells which
# iteration wrote a checkpoint (their optimizers own different parameters).
PUBLIC_STATE = "bip_code"


class PublicBipIteration:
    """One iteration of the public BiP code, as it runs on PyTorch 1.x.

    What their code does, and how it is reproduced here:
    - both optimizers own every parameter: their train.py builds the weight optimizer
      (``get_optimizer``) and the mask optimizer (``torch.optim.SGD``, always SGD) over
      ``model.parameters()``;
    - which parameters get a gradient in a backward pass is set by their ``requires_grad``
      switches: ``switch_to_finetune`` everything but the scores, ``switch_to_bilevel`` everything,
      ``switch_to_prune`` the scores and ``nn.BatchNorm2d`` parameters (their ``freeze_vars`` never
      freezes BatchNorm2d). Here the same sets are passed to ``torch.autograd.grad``;
    - on PyTorch < 2, ``zero_grad()`` zeroes an existing ``.grad`` instead of deleting it, and an
      optimizer steps every parameter whose ``.grad`` is not None. So a parameter that has had a
      gradient once is moved by every later step of BOTH optimizers, by weight decay and momentum
      where its gradient is zero: from the second iteration on (the first with ``accelerate``) the
      weight optimizer also moves the scores, and the mask optimizer moves the weights and, with
      their gradient at the mask lr, BatchNorm. ``has_grad`` records which parameters hold a ``.grad`` in
      their run (it is saved in checkpoints, so that a resumed run continues as an uninterrupted one);
    - the implicit term is ``-lr2 * mask_grad * param_grad`` over ALL parameters, where
      ``param_grad`` is the gradient of the ``switch_to_bilevel`` backward and ``mask_grad`` the one
      of the ``switch_to_prune`` backward: g_s*g_s on the scores, g_bn*g_bn on BatchNorm, 0 on the
      weights (their prune-phase gradient is the zeroed one);
    - every forward pass runs in train mode: four per iteration (lower level, bilevel, prune phase,
      the accuracy-logging pass after the mask step), two with ``accelerate``, so the BatchNorm
      running statistics move as often as in their run.
    Their lower level reads the batch of their second loader (``val_images``, a shuffle of the
    reversed training set) and their upper level ``train_images``: the lower-level batch is our x1
    (``loaders.train``) and the upper-level one our x2 (``loaders.upper``), both shuffles of the
    training set.
    The masks are the MaskSet's: with unstructured masks and global scope they are theirs (one
    top-k of all |scores|, re-selected after every score change), except at exact ties and where
    float noise changes their count N - int((1 - k) N) (see layers.selector).
    """

    def __init__(self, *, model: nn.Module, maskset: MaskSet, criterion: nn.Module,
                 optimizer: torch.optim.Optimizer, mask_optimizer: torch.optim.Optimizer, lr2: float,
                 accelerate: bool, precision: Precision | None = None) -> None:
        self.model = model
        self.precision = precision if precision is not None else Precision(device=torch.device("cpu"))
        self.maskset = maskset
        self.criterion = criterion
        self.optimizer = optimizer
        self.mask_optimizer = mask_optimizer
        self.lr2 = lr2
        self.accelerate = accelerate
        self.params = list(model.parameters())
        kinds = self._kinds(model)
        every = range(len(self.params))
        # Indices into self.params of what each of their switches leaves trainable.
        self.finetune = [i for i in every if kinds[id(self.params[i])] != "scores"]
        self.bilevel = list(every)
        self.prune = [i for i in every if kinds[id(self.params[i])] in ("scores", "batchnorm")]
        self.has_grad = [False] * len(self.params)  # a fresh model has no .grad, as in their run

    @staticmethod
    def _kinds(model: nn.Module) -> dict[int, str]:
        """Each parameter as their switches see it: only ``weight``, ``bias`` and ``popup_scores``
        are toggled, so any other parameter would keep a trainability this class cannot know."""
        kinds = {}
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "popup_scores":
                    kinds[id(p)] = "scores"
                elif name in ("weight", "bias"):
                    kinds[id(p)] = "batchnorm" if isinstance(module, nn.BatchNorm2d) else "layer"
                else:
                    raise ValueError(f"--implicit-grad bip-code reproduces models whose parameters are weights, "
                                     f"biases and popup_scores; {module_name}.{name} is none of these")
        return kinds

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.precision.autocast():
            logits = self.model(x)
            return self.criterion(logits, y), logits

    def _grads(self, loss: torch.Tensor, trainable: list[int]) -> dict[int, torch.Tensor]:
        """The gradient their backward leaves on each trainable parameter, by index; a parameter the
        loss does not reach gets none (its ``.grad`` stays as it was: zeroed, or None)."""
        grads = torch.autograd.grad(loss, [self.params[i] for i in trainable], allow_unused=True)
        found = {i: g for i, g in zip(trainable, grads) if g is not None}
        for i in found:
            self.has_grad[i] = True
        return found

    def _step(self, optimizer: torch.optim.Optimizer, grads: dict[int, torch.Tensor]) -> None:
        """``optimizer.step()`` with the ``.grad`` their run has at that point: ``grads`` where given,
        zero for every other parameter that ever had a gradient, None for the rest."""
        for i, p in enumerate(self.params):
            if i in grads:
                p.grad = grads[i]
            elif self.has_grad[i]:
                p.grad = torch.zeros_like(p)
            else:
                p.grad = None
        optimizer.step()
        for p in self.params:
            p.grad = None

    def step(self, x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor,
             y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration on the lower-level batch (x1, y1) and the upper-level one (x2, y2); returns
        the lower-level loss and logits."""
        if self.accelerate:
            # switch_to_prune, then a mask step on the upper-level batch, with no implicit term
            self._step(self.mask_optimizer, self._grads(self._loss(x2, y2)[0], self.prune))
            # switch_to_finetune, then a weight step on the lower-level batch
            with self.maskset.scores_fixed():  # the scores get no gradient: skip their backward
                loss, logits = self._loss(x1, y1)
                self._step(self.optimizer, self._grads(loss, self.finetune))
            return loss.detach(), logits.detach()
        # lower level: switch_to_finetune, a weight step
        with self.maskset.scores_fixed():
            loss, logits = self._loss(x1, y1)
            self._step(self.optimizer, self._grads(loss, self.finetune))
        # switch_to_bilevel: one backward into every parameter (their param_grad_vec), no step
        param_grad = self._grads(self._loss(x2, y2)[0], self.bilevel)
        # switch_to_prune: their own forward and backward on the same batch (mask_grad_vec). Not
        # reused from the bilevel pass: this forward is one more BatchNorm update, and with dropout
        # or nondeterministic kernels its gradient differs.
        mask_grad = self._grads(self._loss(x2, y2)[0], self.prune)
        # grad + (-lr2 * mask_grad) * param_grad, in their order of operations; the parameters
        # outside the prune set have a zero mask_grad, hence a zero term, and keep a zero gradient.
        self._step(self.mask_optimizer, {i: g + (-self.lr2 * g) * param_grad[i] for i, g in mask_grad.items()})
        with torch.no_grad(), self.precision.autocast():  # their accuracy-logging forward: a BatchNorm update
            self.model(x2)
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, list[bool]]:
        return {"has_grad": list(self.has_grad)}

    def load_state_dict(self, state: dict[str, list[bool]]) -> None:
        has_grad = state["has_grad"]
        if len(has_grad) != len(self.params):
            raise ValueError(f"bip-code state is for {len(has_grad)} parameters, the model has {len(self.params)}")
        self.has_grad = [bool(v) for v in has_grad]


@register_trainer("bilevel")
class BilevelTrainer(BaseTrainer):
    # GradScaler scales one loss per backward(); BiP takes its gradients with torch.autograd.grad and
    # combines two of them in the implicit term, which its scale/unscale/step protocol does not cover.
    capabilities = Capabilities(label="bip", fp16=False)
    Options = BilevelOptions
    unused_parameters = True  # the weight step's forward leaves the scores out
    maskset: MaskSet  # never None here: setup() refuses a run without masked layers

    def setup(self, *, weight_optim: OptimSettings, score_optim: OptimSettings | None, freeze_bn: bool) -> None:
        if self.mode != "prune" or self.maskset is None or score_optim is None:
            raise ValueError("the bilevel trainer prunes: it needs mode 'prune', masked layers and score settings")
        options = self.options
        assert isinstance(options, BilevelOptions)
        if options.implicit_grad not in IMPLICIT_GRADS:
            raise ValueError(f"implicit_grad must be one of {IMPLICIT_GRADS}, got {options.implicit_grad!r}")
        self.lr2 = options.lr2
        self.implicit_grad = options.implicit_grad
        self.accelerate = options.accelerate
        self.public: PublicBipIteration | None = None
        if self.implicit_grad == "bip-code":
            self._setup_public(weights=weight_optim, masks=score_optim, freeze_bn=freeze_bn)
            return
        scores, bn, other = split_parameters(self.model)
        self.scores = scores
        self.weights = ([] if freeze_bn else bn) + other
        layers = list(self.maskset.layers.values())
        self.masked_weights = [layer.weight for layer in layers]
        if [id(layer.popup_scores) for layer in layers] != [id(s) for s in scores]:
            raise ValueError("every score tensor must belong to a masked layer of the mask set")
        own_only(self.model, self.scores + self.weights)
        self.add_optimizer("optimizer", self.weights, weight_optim)
        self.add_optimizer("mask_optimizer", self.scores, score_optim)

    def _setup_public(self, *, weights: OptimSettings, masks: OptimSettings, freeze_bn: bool) -> None:
        """The public code's optimizers (``weights``: the weight optimizer's settings, ``masks``: the
        score optimizer's)."""
        if self.group.enabled:
            raise UserError("--implicit-grad bip-code reproduces the public single-process BiP code: run it with "
                            "one process (python train.py), or use --implicit-grad paper under torchrun")
        if self.robust.objective != "natural":
            # Their iteration makes separate forward passes on the same upper-level batch (bilevel and prune
            # phases); with a random attack each would see other examples, which is no longer their iteration.
            raise UserError(f"--implicit-grad bip-code reproduces the public BiP code, which trains on natural "
                            f"inputs only: use --implicit-grad paper with --objective {self.robust.objective}")
        if freeze_bn:
            # Their switch_to_finetune unfreezes BatchNorm at the first iteration whatever freeze_bn.
            raise UserError("--freeze-bn cannot be honoured by --implicit-grad bip-code: the public BiP code "
                            "trains BatchNorm in every iteration; drop --freeze-bn or use --implicit-grad paper")
        params = list(self.model.parameters())
        own_only(self.model, params)
        self.add_optimizer("optimizer", params, weights)
        # Their mask optimizer is torch.optim.SGD whatever --optimizer; lr, momentum and weight decay
        # are the mask settings' (--mask-lr and its schedule, --momentum, --wd).
        self.add_optimizer("mask_optimizer", params, replace(masks, optimizer="sgd"))
        self.public = PublicBipIteration(model=self.model, maskset=self.maskset, criterion=self.criterion,
                                         optimizer=self.optimizers["optimizer"],
                                         mask_optimizer=self.optimizers["mask_optimizer"], lr2=self.lr2,
                                         accelerate=self.accelerate, precision=self.precision)

    def batches(self, loaders: Loaders) -> tuple[Iterator, int]:
        # The upper level reads its own stream (an independent shuffle, or a held-out split).
        return zip(loaders.train, loaders.upper), min(len(loaders.train), len(loaders.upper))

    @staticmethod
    def _apply(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # --objective: both levels train on it (PGD examples are made at the current weights and mask)
        with self.precision.autocast():
            return self.objective(self.net, x, y)

    def _grads(self, loss: torch.Tensor, params: Sequence[torch.Tensor], n: int) -> Sequence[torch.Tensor]:
        """d loss / d params. Distributed: through ``backward()``, where DDP averages every trainable
        parameter's gradient over the ranks (``torch.autograd.grad`` would bypass it), then read off
        ``.grad`` and cleared; the loss scaled so the average is the global batch's (``scaled``)."""
        if not self.group.enabled:
            return torch.autograd.grad(loss, params)
        for p in self.scores + self.weights:  # backward() adds to .grad: the last step's must not count
            p.grad = None
        self.scaled(loss, n).backward()
        grads = [p.grad for p in params]
        for p in self.scores + self.weights:
            p.grad = None
        assert all(g is not None for g in grads), "every requested parameter takes part in the loss"
        return cast(list[torch.Tensor], grads)

    def step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (x1, y1), (x2, y2) = self._to_device(batch[0]), self._to_device(batch[1])
        if self.public is not None:
            loss, logits = self.public.step(x1, y1, x2, y2)
            return loss, logits, y1
        opt, mask_opt = self.optimizers["optimizer"], self.optimizers["mask_optimizer"]
        if self.accelerate:
            loss_up, _ = self._loss(x2, y2)
            self._apply(mask_opt, self.scores, self._grads(loss_up, self.scores, len(y2)))
            with self.maskset.scores_fixed():
                loss, logits = self._loss(x1, y1)
                self._apply(opt, self.weights, self._grads(loss, self.weights, len(y1)))
            return loss.detach(), logits.detach(), y1
        # 1. lower level: weights on x1 (no score gradient needed)
        with self.maskset.scores_fixed():
            loss, logits = self._loss(x1, y1)
            self._apply(opt, self.weights, self._grads(loss, self.weights, len(y1)))
        # 2. upper level: scores on x2 at the new weights, with the implicit-gradient term
        loss_up, _ = self._loss(x2, y2)
        n = len(self.scores)
        grads = self._grads(loss_up, self.scores + self.masked_weights, len(y2))
        g_s, g_theta = grads[:n], grads[n:]
        # g_s - lr2 * g_s * g_theta, built in place in g_theta's buffers (no longer needed)
        score_grads = [gt.mul_(gs).mul_(-self.lr2).add_(gs) for gs, gt in zip(g_s, g_theta)]
        self._apply(mask_opt, self.scores, score_grads)
        return loss.detach(), logits.detach(), y1

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict]:
        state = super().state_dict()
        if self.public is not None:
            state[PUBLIC_STATE] = self.public.state_dict()
        return state

    def load_state_dict(self, state: dict[str, dict]) -> None:
        written_by = "bip-code" if PUBLIC_STATE in state else "paper"
        if written_by != self.implicit_grad:
            raise UserError(f"the checkpoint was written with --implicit-grad {written_by}, whose optimizers own "
                            f"other parameters; resume with --implicit-grad {written_by}")
        super().load_state_dict(state)
        if self.public is not None:
            self.public.load_state_dict(state[PUBLIC_STATE])
