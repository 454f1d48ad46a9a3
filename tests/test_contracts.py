"""Contracts every registered trainer and every registered prune method keeps, parametrised over the
registries (``TRAINERS``, ``PRUNE_METHODS``) so that a new entry is tested without a new test:

- a step changes exactly the tensors the trainer owns (its optimizers' parameters, BatchNorm's
  running statistics, and the masks only where the trainer sets them);
- the masks keep exact unit counts, n_keep(k, N) for the run's scope and granularity;
- a checkpoint written by ``checkpoint_state``/``save_checkpoint`` and read back (weights only) into a
  fresh model, mask set and trainer gives the same outputs and the same next step, bit for bit (CPU);
- a pruning event of every prune method, at every granularity it supports, keeps exactly n_keep
  units, never revives a pruned weight and leaves the pruned weights exactly zero.

Tiny model (three layers, 4x4 inputs) and one-batch loaders: the whole file takes seconds.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from configs.errors import UserError
from configs.options import OBJECTIVES, BilevelOptions, LthOptions, RobustOptions, WoodFisherOptions
from configs.schema import MODES
from engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from engine.loop import checkpoint_state
from layers import GRANULARITIES, MaskSet, n_keep, select_masks
from pruning.methods import PRUNE_METHODS
from layers import to_masked
from models import build_model
from trainers import TRAINERS
from tests.helpers import tiny
from tests.helpers.tiny import tiny_loaders, tiny_net

CPU = torch.device("cpu")
SCOPES = ("global", "layer")
K = {"unstructured": 0.4, "filter": 0.5, "channel": 0.5, "nm": 0.5}
NM = (2, 4)  # the N:M pattern of the "nm" cases (k = N/M above)
# N:M selects inside groups, so its scope is moot: one scope is enough for its cases.
NM_SCOPES = ("global",)


# -- a tiny model and one-batch loaders ----------------------------------------------------------
# The model is tiny_net's default: conv 1->4 (no bias: BatchNorm would cancel its gradient), BatchNorm,
# conv 4->4 stride 2, linear 16->6; granularity None: the dense model of a pretrain run. Filter/channel
# masks act on the two convolutions only; unstructured masks on all three layers. N:M groups run along
# the input channels: the first conv (1 channel) cannot hold a 2:4 mask, so it stays dense, as train.py
# asks the user to (--exclude-layers).
NM_DENSE = {"nm": ["0"]}


def mask_set(model: nn.Module, *, k: float, granularity: str, scope: str) -> MaskSet:
    return MaskSet(model, k=k, granularity=granularity, scope=scope, nm=NM if granularity == "nm" else None)


# Real ``Loaders`` whose training (and BiP upper-level) stream is one batch per epoch, so that one
# epoch of ``train_epoch`` is one step; the Fisher streams cycle over the same 8 samples.
one_batch_loaders = partial(tiny_loaders, 8, batch_size=8)
# momentum and weight decay: the optimizer state is not empty, so a checkpoint must carry it
sgd = partial(tiny.sgd, momentum=0.9, wd=1e-3, epochs=3)


# -- the trainers, their options and the modes they take ------------------------------------------
def trainer_options(name: str, variant: str, scope: str):
    """Options of the known trainers sized for the tiny model; a new trainer gets its declared defaults."""
    if name == "bilevel":
        return {"paper": BilevelOptions(), "bip-code": BilevelOptions(implicit_grad="bip-code"),
                "accelerate": BilevelOptions(accelerate=True)}[variant]
    if name == "woodfisher":  # events at epochs 0 (sparsity 0.3) and 1 (the target 1 - k)
        return WoodFisherOptions(prune_start=0, prune_freq=1, prune_end=1, init_sparsity=0.3,
                                 fisher_subsample_size=6, fisher_mini_bsz=2, fittable_params=16, fisher_damp=1e-4,
                                 woodbury_joint_sparsify=scope == "global")
    if name == "lth":  # rounds at densities 0.7, 0.49, then k = 0.4: one epoch each (sgd's 3 epochs)
        return LthOptions(imp_rate=0.3)
    cls = TRAINERS[name]
    return cls.Options() if cls.Options is not None else None


VARIANTS = {"bilevel": ("paper", "bip-code", "accelerate")}
# The modes each known trainer takes (a new trainer's are found by construction, see ``cases``).
KNOWN_MODES = {"base": set(MODES), "bilevel": {"prune"}, "woodfisher": {"prune"}, "lth": {"prune"}}


def build(name: str, variant: str, mode: str, granularity: str, scope: str, *, freeze_bn: bool = False,
          seed: int = 0, masks: dict | None = None, robust: RobustOptions | None = None, arch: str | None = None):
    """(model, mask set, trainer) as train.py sets them up for a fresh run (``masks`` None) or for a
    resumed one (``masks``: the checkpoint's, with ``frozen``). ``arch``: a registered architecture for the
    tiny data (1x4x4 images, 6 classes) instead of the tiny net."""
    if arch is None:
        model = tiny_net(None if mode == "pretrain" else granularity, seed=seed, exclude=NM_DENSE.get(granularity))
    else:
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=6, in_channels=1, image_size=4)
        if mode != "pretrain":
            to_masked(model, granularity=granularity)
    ms = None
    if mode != "pretrain":
        ms = mask_set(model, k=K[granularity], granularity=granularity, scope=scope)
        ms.step(force=True)
    trainer = TRAINERS[name](model=model, maskset=ms, mode=mode, device=CPU, weight_optim=sgd(0.1),
                             score_optim=sgd(0.2), freeze_bn=freeze_bn, progress=False, log=lambda line: None,
                             options=trainer_options(name, variant, scope), robust=robust)
    return model, ms, trainer


def supported(name: str, variant: str, mode: str, granularity: str, scope: str, freeze_bn: bool) -> bool:
    """Whether the trainer takes this run: refusals are ValueError (wrong mode) or UserError."""
    try:
        build(name, variant, mode, granularity, scope, freeze_bn=freeze_bn)
    except (ValueError, UserError):
        return False
    return True


def cases(freeze_bn_values=(False, True)):
    out = []
    for name in TRAINERS.names():
        for variant in VARIANTS.get(name, ("default",)):
            for mode in MODES:
                layouts = [("dense", "global")] if mode == "pretrain" else \
                    [(g, s) for g in GRANULARITIES for s in (NM_SCOPES if g == "nm" else SCOPES)]
                for granularity, scope in layouts:
                    for freeze_bn in freeze_bn_values:
                        g = "unstructured" if granularity == "dense" else granularity
                        if supported(name, variant, mode, g, scope, freeze_bn):
                            out.append(pytest.param(name, variant, mode, g, scope, freeze_bn,
                                                    id=f"{name}-{variant}-{mode}-{granularity}-{scope}"
                                                       + ("-freeze_bn" if freeze_bn else "")))
    return out


STEP_CASES = cases()
ROUND_TRIP_CASES = cases(freeze_bn_values=(False,))


def test_known_trainers_take_their_modes_and_refuse_the_others():
    for name, modes in KNOWN_MODES.items():
        assert name in TRAINERS.names()
        for variant in VARIANTS.get(name, ("default",)):
            taken = {mode for mode in MODES if supported(name, variant, mode, "unstructured", "global", False)}
            assert taken == modes, (name, variant)
    # --freeze-bn cannot be honoured by the public BiP iteration: refused, not ignored
    assert not supported("bilevel", "bip-code", "prune", "unstructured", "global", True)
    assert supported("bilevel", "paper", "prune", "unstructured", "global", True)


# -- what a step may change -----------------------------------------------------------------------
def kinds(model: nn.Module) -> dict[str, str]:
    """Each state-dict key of the model as one of: weights, scores, masks, bn_affine, bn_stats."""
    out = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        bn = isinstance(module, nn.modules.batchnorm._NormBase)
        for name, _ in module.named_parameters(recurse=False):
            out[prefix + name] = "scores" if name == "popup_scores" else ("bn_affine" if bn else "weights")
        for name, _ in module.named_buffers(recurse=False):
            out[prefix + name] = "masks" if name == "mask" else ("bn_stats" if bn else "weights")
    return out


# (trainer, mode): the kinds of tensors one step must change, and those it must leave alone. Masks
# not listed in either are learned (a function of the scores, checked against the selector).
EXPECTED = {
    ("base", "pretrain"): ({"weights", "bn_affine", "bn_stats"}, set()),
    ("base", "prune"): ({"scores", "bn_affine", "bn_stats"}, {"weights"}),  # HYDRA: weights frozen
    ("base", "finetune"): ({"weights", "bn_affine", "bn_stats"}, {"scores", "masks"}),
    ("bilevel", "prune"): ({"weights", "scores", "bn_affine", "bn_stats"}, set()),
    ("woodfisher", "prune"): ({"weights", "bn_affine", "bn_stats", "masks"}, {"scores"}),  # masks: the event
    ("lth", "prune"): ({"weights", "bn_affine", "bn_stats", "masks"}, {"scores"}),  # masks: the round's pruning
}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    now = model.state_dict()
    return {k for k in before if not torch.equal(before[k], now[k])}


def one_epoch(trainer, loaders, epoch: int) -> dict[str, float]:
    """One epoch of the trainer's own loop: with one-batch loaders, one step (and, for WoodFisher, the
    pruning event scheduled at that epoch)."""
    loaders.set_epoch(epoch)
    trainer.set_epoch(epoch)
    return trainer.train_epoch(epoch, loaders)


def alive_units(mask: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity in ("unstructured", "nm"):
        return mask.reshape(-1)
    units = mask.flatten(1) if granularity == "filter" else mask.transpose(0, 1).flatten(1)
    assert torch.equal(units.all(1), units.any(1)), "a filter/channel mask must keep or drop a whole unit"
    return units.any(1)


def assert_exact_counts(ms: MaskSet, *, density: float, scope: str) -> None:
    """Kept units equal n_keep(density, N): of all units (global) or of each layer's (layer)."""
    masks = ms.masks()
    if ms.nm is not None and density == ms.k:  # N:M: every group of M keeps exactly N
        n, m = ms.nm
        for mask in masks.values():
            assert bool((mask.movedim(1, -1).reshape(-1, m).sum(1) == n).all())
    kept = [int(alive_units(m, ms.granularity).sum()) for m in masks.values()]
    units = ms.unit_counts()
    if scope == "global":
        assert sum(kept) == n_keep(density, sum(units)), (kept, units, density)
    else:
        assert kept == [n_keep(density, u) for u in units], (kept, units, density)


def selection_scope(trainer, ms: MaskSet) -> str:
    return getattr(trainer, "scope", ms.scope)  # WoodFisher: its method's scope, or the joint selection's


def density_after(trainer, ms: MaskSet, epoch: int) -> float:
    """The density the masks have after ``epoch``: k, or the WoodFisher schedule's density there (the
    final event: exactly k), or the IMP round's."""
    if getattr(trainer, "densities", None):  # lth: one density per round
        return trainer.densities[epoch // trainer.round_epochs]
    events = [e for e in getattr(trainer, "events", []) if e.epoch <= epoch]
    if not events and getattr(trainer, "events", None):  # before the first event (N:M's one event): dense
        return 1.0
    if not events or events[-1] is trainer.events[-1]:
        return ms.k
    return 1.0 - events[-1].sparsity


def owned_names(model: nn.Module, trainer) -> set[str]:
    ids = {id(p) for opt in trainer.optimizers.values() for group in opt.param_groups for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("name,variant,mode,granularity,scope,freeze_bn", STEP_CASES)
def test_a_step_changes_exactly_what_the_trainer_owns(name, variant, mode, granularity, scope, freeze_bn):
    check_step(*build(name, variant, mode, granularity, scope, freeze_bn=freeze_bn), name=name, mode=mode,
               granularity=granularity, freeze_bn=freeze_bn)


# The models users bring (depthwise convs, squeeze-excitation, grouped convs), every trainer on one step.
ARCH_CASES = [("base", "default", "pretrain"), ("base", "default", "prune"), ("base", "default", "finetune"),
              ("bilevel", "paper", "prune"), ("woodfisher", "default", "prune"), ("lth", "default", "prune")]


@pytest.mark.parametrize("name,variant,mode", ARCH_CASES)
@pytest.mark.parametrize("arch", ["mobilenet_cifar"] + [pytest.param(a, marks=pytest.mark.slow) for a in
                                                        ("tv.mobilenet_v2", "tv.efficientnet_b0", "tv.regnet_y_400mf")])
def test_a_step_on_the_models_users_bring_changes_exactly_what_the_trainer_owns(arch, name, variant, mode):
    check_step(*build(name, variant, mode, "unstructured", "global", arch=arch), name=name, mode=mode,
               granularity="unstructured", freeze_bn=False, every_owned_moves=arch == "mobilenet_cifar")


def check_step(model, ms, trainer, *, name, mode, granularity, freeze_bn, every_owned_moves=True):
    loaders = one_batch_loaders()
    kind = kinds(model)
    params = {n for n, _ in model.named_parameters()}
    before = snapshot(model)
    masks_before = ms.masks() if ms is not None else None
    metrics = one_epoch(trainer, loaders, 0)
    assert set(metrics) >= {"loss", "top1", "top5"}
    if ms is not None:
        ms.masks()  # learned masks follow the scores lazily (at the next forward): select them now
    diff = changed(before, model)
    # the parameters that moved are exactly those the trainer's optimizers own (on a big model: among them; a
    # BatchNorm behind a ReLU6 saturated on 1x1 maps gets an exactly zero gradient and does not move)
    owned = owned_names(model, trainer)
    if every_owned_moves:
        assert diff & params == owned, (sorted(diff & params), sorted(owned))
    else:
        assert diff & params <= owned and len(diff & params) > len(owned) // 2, (sorted(diff & params - owned))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned  # autograd skips the rest
    if (name, mode) in EXPECTED:
        must, must_not = EXPECTED[name, mode]
        if freeze_bn:
            must, must_not = must - {"bn_affine"}, must_not | {"bn_affine"}
        if hasattr(trainer, "events") and not any(e.epoch == 0 for e in trainer.events):
            must = must - {"masks"}  # no event at epoch 0 (N:M prunes once, at --prune-end)
        present = set(kind.values())
        assert {kind[k] for k in diff} >= must & present, sorted(diff)
        assert not {k for k in diff if kind[k] in must_not}, sorted(diff)
    if ms is None:
        return
    if (name, mode) not in EXPECTED or "masks" not in EXPECTED[name, mode][0] | EXPECTED[name, mode][1]:
        if not ms.frozen:  # learned masks: exactly the selector's top-k of the scores after the step
            expected = select_masks([l.popup_scores for l in ms.layers.values()], k=ms.k, granularity=granularity,
                                    scope=ms.scope, min_units=ms.min_units, nm=ms.nm)
            for layer, mask in zip(ms.layers.values(), expected):
                assert torch.equal(layer.mask, mask)
        else:
            assert all(torch.equal(masks_before[n], l.mask) for n, l in ms.layers.items())
    assert_exact_counts(ms, density=density_after(trainer, ms, 0), scope=selection_scope(trainer, ms))
    for layer in ms.layers.values():  # WoodFisher's and IMP's pruned weights are zero, not merely masked
        if "masks" in EXPECTED.get((name, mode), (set(), set()))[0]:
            assert torch.equal(layer.weight[~layer.mask], torch.zeros(int((~layer.mask).sum())))


# -- every objective, with every trainer ---------------------------------------------------------------
def robust_options(objective: str) -> RobustOptions:
    return RobustOptions(objective=objective, epsilon=0.1, step_size=0.05, num_steps=2, noise_std=0.25)


def robust_cases():
    out = []
    for objective in OBJECTIVES:
        for name in TRAINERS.names():
            for variant in VARIANTS.get(name, ("default",)):
                for mode in MODES:
                    g = "unstructured"
                    try:
                        build(name, variant, mode, g, "global", robust=robust_options(objective))
                    except (ValueError, UserError):
                        continue
                    out.append(pytest.param(name, variant, mode, objective, id=f"{name}-{variant}-{mode}-{objective}"))
    return out


@pytest.mark.parametrize("name,variant,mode,objective", robust_cases())
def test_a_step_on_every_objective_changes_exactly_what_the_trainer_owns(name, variant, mode, objective):
    """The objective replaces the loss, never the trainer: a step on it moves exactly the owned
    parameters (the attack moves none, and leaves no .grad behind) and keeps exact counts."""
    model, ms, trainer = build(name, variant, mode, "unstructured", "global", robust=robust_options(objective))
    params = {n for n, _ in model.named_parameters()}
    before = snapshot(model)
    one_epoch(trainer, one_batch_loaders(), 0)
    assert changed(before, model) & params == owned_names(model, trainer)
    assert model.training  # the attack's eval mode does not leak into training
    if ms is not None:
        assert_exact_counts(ms, density=density_after(trainer, ms, 0), scope=selection_scope(trainer, ms))


def test_every_objective_runs_with_every_trainer_but_bip_code():
    """bip-code (the public BiP iteration) refuses the robust objectives; every other trainer takes all."""
    taken = {(p.values[0], p.values[1], p.values[3]) for p in robust_cases()}
    for objective in OBJECTIVES:
        assert ("bilevel", "paper", objective) in taken and ("woodfisher", "default", objective) in taken
        assert ("base", "default", objective) in taken
        assert (("bilevel", "bip-code", objective) in taken) == (objective == "natural")


# -- checkpoint round trip --------------------------------------------------------------------------
def assert_same(a, b, path="state"):
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("name,variant,mode,granularity,scope,freeze_bn", ROUND_TRIP_CASES)
def test_checkpoint_round_trip_gives_the_same_outputs_and_next_step(tmp_path, name, variant, mode, granularity,
                                                                   scope, freeze_bn):
    model, ms, trainer = build(name, variant, mode, granularity, scope)
    loaders = one_batch_loaders()
    one_epoch(trainer, loaders, 0)
    state = checkpoint_state(epoch=1, arch="tiny", model=model, maskset=ms, trainer=trainer, best_prec1=0.0,
                             config={"k": ms.k if ms else 1.0, "trainer": name, "exp_mode": mode})
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint(state, path)
    torch.load(path, weights_only=True)  # only tensors and plain containers
    ckpt = load_checkpoint(path)
    assert any(opt["state"] for opt in ckpt["trainer_state"].values() if isinstance(opt, dict) and "state" in opt)

    # a fresh model (other initial weights), mask set and trainer, loaded from the file
    other = tiny_net(None if mode == "pretrain" else granularity, seed=7, exclude=NM_DENSE.get(granularity))
    ms2 = None
    load_model_state(other, ckpt["state_dict"], source=path)
    if ms is not None:
        ms2 = mask_set(other, k=ms.k, granularity=granularity, scope=scope)
        if ckpt["masks_frozen"]:
            ms2.set_masks(ckpt["masks"])
        else:  # learned masks are a function of the scores
            ms2.step(force=True)
        assert_same(ms2.masks(), ckpt["masks"])
    trainer2 = TRAINERS[name](model=other, maskset=ms2, mode=mode, device=CPU, weight_optim=sgd(0.1),
                              score_optim=sgd(0.2), progress=False, log=lambda line: None,
                              options=trainer_options(name, variant, scope))
    trainer2.load_state_dict(ckpt["trainer_state"])
    assert_same(trainer2.state_dict(), trainer.state_dict())

    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    # the next epoch (WoodFisher: the final pruning event, then a step) is the same, bit for bit
    one_epoch(trainer, loaders, 1)
    one_epoch(trainer2, loaders, 1)
    assert_same(other.state_dict(), model.state_dict())
    assert_same(trainer2.state_dict(), trainer.state_dict())
    if ms is not None:
        assert_same(ms2.masks(), ms.masks())
        assert_exact_counts(ms2, density=density_after(trainer2, ms2, 1), scope=selection_scope(trainer2, ms2))


# -- every prune method, every granularity it supports ---------------------------------------------
def method_cases():
    out = []
    for method in PRUNE_METHODS.values():
        for granularity in method.granularities:
            scopes = (method.scope,) if method.scope else (NM_SCOPES if granularity == "nm" else SCOPES)
            for scope in scopes:
                out.append(pytest.param(method.name, granularity, scope, id=f"{method.name}-{granularity}-{scope}"))
    return out


@pytest.mark.parametrize("method,granularity,scope", method_cases())
def test_a_pruning_event_keeps_exact_counts_never_revives_and_zeroes(method, granularity, scope):
    k = K[granularity]
    # slimming reads the BatchNorm after each masked conv: tiny_net's second conv has none, so it stays dense
    model = tiny_net(granularity, exclude=["3"] if PRUNE_METHODS[method].probe == "batchnorm" else NM_DENSE.get(granularity))
    ms = mask_set(model, k=k, granularity=granularity, scope=scope)
    options = WoodFisherOptions(prune_method=method, prune_start=0, prune_freq=1, prune_end=1, init_sparsity=0.3,
                                fisher_subsample_size=6, fisher_mini_bsz=2, fittable_params=16,
                                woodbury_joint_sparsify=scope == "global")
    trainer = TRAINERS["woodfisher"](model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.1),
                                     progress=False, log=lambda line: None, options=options)
    assert trainer.scope == scope
    loaders = one_batch_loaders()
    previous = {n: torch.ones_like(l.mask) for n, l in ms.layers.items()}  # a fresh run starts dense
    for event in trainer.events:
        trainer.prune_to(event.sparsity, epoch=event.epoch, loaders=loaders)
        final = event is trainer.events[-1]
        assert_exact_counts(ms, density=k if final else 1.0 - event.sparsity, scope=scope)
        for n, layer in ms.layers.items():
            assert not bool((layer.mask & ~previous[n]).any()), f"{method} revived pruned weights of {n}"
            assert torch.equal(layer.weight[~layer.mask], torch.zeros(int((~layer.mask).sum())))
        previous = {n: l.mask.clone() for n, l in ms.layers.items()}
        if not final:  # a training step between the events: pruned weights stay zero through it
            trainer.step(next(iter(loaders.train)))
            for layer in ms.layers.values():
                assert torch.equal(layer.weight[~layer.mask], torch.zeros(int((~layer.mask).sum())))
    # N:M has one event, straight to N:M (an AGP step's sparsity has no N:M mask)
    expected = [round(1 - k, 6)] if granularity == "nm" else [0.3, round(1 - k, 6)]
    assert [round(e.sparsity, 6) for e in trainer.events] == expected
