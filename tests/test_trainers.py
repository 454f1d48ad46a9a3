"""Trainers: exactly the intended tensors change, the implicit gradient, schedules, checkpoints."""
import math
import os

import pytest
import torch
from torch import nn

from configs.errors import UserError
from layers import MaskSet, masked_layers, n_keep, to_masked
from trainers.base import BaseTrainer
from configs.options import BilevelOptions
from trainers.bilevel import BilevelTrainer
from engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from engine.loop import checkpoint_state
from engine.lr_schedules import MASK_MILESTONES, lr_at
from engine.source import load_source
from tests.helpers.tiny import sgd, tiny_batch, tiny_net

CPU = torch.device("cpu")


def small_model(masked=True, granularity="unstructured"):
    """conv 1->4 (with bias), BatchNorm, linear 64->3; masked (``granularity``) or dense."""
    return tiny_net(granularity if masked else None, convs=1, bias=True, num_classes=3)


batch = tiny_batch  # 8 images 1x4x4, 3 classes


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    now = model.state_dict()
    return {k for k in before if not torch.equal(before[k], now[k])}


def test_hydra_prune_step_trains_scores_and_bn_only():
    model = small_model()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    trainer = BaseTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.1), progress=False)
    before = snapshot(model)
    trainer.step(batch(0))
    diff = changed(before, model)
    assert {"0.popup_scores", "4.popup_scores", "1.weight", "1.bias"} <= diff
    assert not diff & {"0.weight", "0.bias", "4.weight", "4.bias"}  # HYDRA: weights frozen


def test_hydra_prune_with_freeze_bn_keeps_bn_affine():
    model = small_model()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    trainer = BaseTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.1), freeze_bn=True,
                          progress=False)
    before = snapshot(model)
    trainer.step(batch(0))
    diff = changed(before, model)
    assert "0.popup_scores" in diff and not diff & {"1.weight", "1.bias", "0.weight", "4.weight"}


def test_finetune_step_trains_weights_under_fixed_mask():
    model = small_model()
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope="global")
    ms.step(force=True)
    masks = ms.masks()
    trainer = BaseTrainer(model=model, maskset=ms, mode="finetune", device=CPU, weight_optim=sgd(0.1), progress=False)
    before = snapshot(model)
    for seed in range(3):
        trainer.step(batch(seed))
    diff = changed(before, model)
    assert {"0.weight", "4.weight", "1.weight"} <= diff
    assert not diff & {"0.popup_scores", "4.popup_scores", "0.mask", "4.mask"}
    for name, m in masks.items():
        assert torch.equal(model.get_submodule(name).mask, m)
        # pruned weights get no gradient: with no weight decay they do not move
        w_now, w_then = model.get_submodule(name).weight.detach(), before[f"{name}.weight"]
        assert torch.equal(w_now[~m], w_then[~m])


def test_pretrain_step_trains_every_weight():
    model = small_model(masked=False)
    trainer = BaseTrainer(model=model, maskset=None, mode="pretrain", device=CPU, weight_optim=sgd(0.1), progress=False)
    before = snapshot(model)
    trainer.step(batch(0))
    # (the conv bias feeds a BatchNorm, which cancels it: its gradient is exactly zero)
    assert {"0.weight", "1.weight", "1.bias", "4.weight", "4.bias"} <= changed(before, model)


def test_bilevel_step_trains_weights_and_scores():
    model = small_model()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="global")
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.1),
                             score_optim=sgd(0.1), progress=False)
    before = snapshot(model)
    trainer.step((batch(0), batch(1)))
    assert {"0.weight", "4.weight", "0.popup_scores", "4.popup_scores", "1.weight"} <= changed(before, model)
    assert set(trainer.optimizers) == {"optimizer", "mask_optimizer"}
    owned = [{id(p) for g in o.param_groups for p in g["params"]} for o in trainer.optimizers.values()]
    assert not owned[0] & owned[1]


@pytest.mark.parametrize("variant", ["paper", "bip-code"])
def test_implicit_gradient_matches_hand_computation(variant):
    """One masked linear layer, cross-entropy, plain SGD: the score update by hand."""
    torch.manual_seed(0)
    model = to_masked(nn.Sequential(nn.Linear(5, 3, bias=False)), granularity="unstructured")
    ms = MaskSet(model, k=0.6, granularity="unstructured", scope="global")
    layer = model[0]
    with torch.no_grad():
        layer.popup_scores.copy_(torch.randn(3, 5))
    lr, mask_lr, lr2 = 0.5, 0.3, 0.7
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(lr), score_optim=sgd(mask_lr), progress=False, options=BilevelOptions(lr2=lr2, implicit_grad=variant))
    (x1, y1), (x2, y2) = (torch.randn(4, 5), torch.tensor([0, 1, 2, 1])), (torch.randn(4, 5), torch.tensor([2, 2, 0, 1]))
    w0, s0 = layer.weight.detach().clone(), layer.popup_scores.detach().clone()
    ms.step(force=True)
    m = layer.mask.clone().float()

    def grad_eff(w_eff, x, y):  # dL/dW_eff of mean cross-entropy of x @ W_eff^T
        p = torch.softmax(x @ w_eff.t(), dim=1)
        return (p - nn.functional.one_hot(y, 3).float()).t() @ x / x.shape[0]

    w1 = w0 - lr * m * grad_eff(w0 * m, x1, y1)          # lower level
    g = grad_eff(w1 * m, x2, y2)                          # upper level at the new weights
    g_s = torch.sign(s0) * w1 * g
    g_theta = m * g
    partner = g_theta if variant == "paper" else g_s
    s1 = s0 - mask_lr * (g_s - lr2 * g_s * partner)
    trainer.step(((x1, y1), (x2, y2)))
    torch.testing.assert_close(layer.weight.detach(), w1)
    torch.testing.assert_close(layer.popup_scores.detach(), s1)


def test_accelerate_has_no_implicit_term():
    torch.manual_seed(0)
    model = to_masked(nn.Sequential(nn.Linear(5, 3, bias=False)), granularity="unstructured")
    ms = MaskSet(model, k=0.6, granularity="unstructured", scope="global")
    layer = model[0]
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.5), score_optim=sgd(0.3), progress=False, options=BilevelOptions(lr2=100.0, accelerate=True))
    (x1, y1), (x2, y2) = (torch.randn(4, 5), torch.tensor([0, 1, 2, 1])), (torch.randn(4, 5), torch.tensor([2, 2, 0, 1]))
    ms.step(force=True)
    w0, s0, m = layer.weight.detach().clone(), layer.popup_scores.detach().clone(), layer.mask.clone().float()
    p = torch.softmax(x2 @ (w0 * m).t(), dim=1)
    g = (p - nn.functional.one_hot(y2, 3).float()).t() @ x2 / 4
    trainer.step(((x1, y1), (x2, y2)))
    torch.testing.assert_close(layer.popup_scores.detach(), s0 - 0.3 * torch.sign(s0) * w0 * g)


# -- schedules -------------------------------------------------------------------------------------
def test_cosine_schedule_values_and_warmup():
    assert lr_at("cosine", epoch=0, base_lr=0.1, epochs=10) == pytest.approx(0.1)
    assert lr_at("cosine", epoch=5, base_lr=0.1, epochs=10) == pytest.approx(0.05)
    assert lr_at("cosine", epoch=9, base_lr=0.1, epochs=10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at("cosine", epoch=1, base_lr=0.1, epochs=10, warmup_epochs=2, warmup_lr=0.01) == 0.01
    assert lr_at("cosine", epoch=2, base_lr=0.1, epochs=10, warmup_epochs=2, warmup_lr=0.01) == pytest.approx(0.1)
    assert lr_at("cosine", epoch=6, base_lr=0.1, epochs=10, warmup_epochs=2, warmup_lr=0.01) == pytest.approx(0.05)


def test_step_schedules_honour_warmup_and_milestones():
    lrs = [lr_at("step", epoch=e, base_lr=1.0, epochs=8) for e in range(8)]
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_at("step", epoch=0, base_lr=1.0, epochs=8, warmup_epochs=1, warmup_lr=0.5) == 0.5
    mask = [lr_at("step", epoch=e, base_lr=1.0, epochs=20, milestones=MASK_MILESTONES) for e in (0, 14, 15, 17, 18)]
    assert mask == pytest.approx([1, 1, 0.1, 0.1, 0.01])


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_weights_only(tmp_path):
    model = small_model(granularity="filter")
    ms = MaskSet(model, k=0.2, granularity="filter", scope="global")
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.1, momentum=0.9),
                             score_optim=sgd(0.1, momentum=0.9), progress=False)
    trainer.step((batch(0), batch(1)))
    state = checkpoint_state(epoch=3, arch="tiny", model=model, maskset=ms, trainer=trainer, best_prec1=42.0,
                             config={"k": 0.2, "arch": "tiny"})
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint(state, str(path))
    loaded = torch.load(path, weights_only=True)
    assert {"epoch", "arch", "state_dict", "best_prec1", "optimizer", "mask_optimizer", "masks", "config", "rng"} <= set(loaded)
    assert loaded["epoch"] == 3 and loaded["best_prec1"] == 42.0 and loaded["config"]["k"] == 0.2
    other = small_model(granularity="filter")
    ms2 = MaskSet(other, k=0.2, granularity="filter", scope="global")
    load_model_state(other, loaded["state_dict"], source="ckpt")
    ms2.set_masks(loaded["masks"])
    x = torch.randn(2, 1, 4, 4)
    model.eval(), other.eval()
    torch.testing.assert_close(other(x), model(x))
    assert loaded["mask_optimizer"]["state"]  # momentum buffers of the scores survived
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pth.tar"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable"):
        load_checkpoint(str(path))


def hydra_style_checkpoint(model, path):
    """What the public HYDRA/BiP code saves: DataParallel prefix, scores, no masks, their keys."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith(".mask")}
    torch.save({"epoch": 100, "arch": "tiny", "state_dict": sd, "best_prec1": 90.0, "optimizer": {}}, path)


def bip_unstructured_mask(scores, k):
    """BiP's GetSubnetUnstructured over the concatenation of all scores (read from its public code),
    with a stable sort: without ties their mask exactly; with ties the project's rule (their unstable
    torch.sort has no defined order at ties beyond 16 elements, so no rule reproduces it)."""
    flat = torch.cat([s.abs().flatten() for s in scores])
    _, idx = flat.sort(stable=True)
    j = int((1 - k) * flat.numel())
    out = torch.zeros_like(flat)
    out[idx[j:]] = 1
    return out.bool().split([s.numel() for s in scores])


def bip_structured_mask(scores, k, granularity):
    """BiP's GetSubnetFilter / GetSubnetChannel per layer, with p = 2 (set by set_prune_rate): the
    L2 norm of each filter's (dim 0) or input channel's (dim 1) |scores|."""
    out = []
    for s in scores:
        t = s.abs() if granularity == "filter" else s.abs().transpose(0, 1)
        norms = torch.norm(t.flatten(1), p=2, dim=1)
        _, idx = norms.sort(stable=True)
        j = int((1 - k) * t.shape[0])
        keep = torch.zeros(t.shape[0], dtype=torch.bool)
        keep[idx[j:]] = True
        out.append(keep)
    return out


def bip_structured_net():
    """Two convs (BiP masks these under filter/channel) and a plain linear classifier (as BiP's
    get_layers leaves it): the layer set of their structured checkpoints."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 16, 3))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0.05, 0.1, 0.37])
def test_public_code_checkpoint_gives_their_mask(tmp_path, k, ties):
    torch.manual_seed(1)
    theirs = small_model()
    for layer in masked_layers(theirs).values():
        with torch.no_grad():
            layer.popup_scores.normal_()
            if ties:  # a handful of distinct values: the tie rule decides most of the mask (theirs: the sort kernel)
                layer.popup_scores.round_()
    path = tmp_path / "hydra.pth.tar"
    hydra_style_checkpoint(theirs, path)
    ours = small_model()
    ms = MaskSet(ours, k=k, granularity="unstructured", scope="global")
    load_source(ours, ms, load_checkpoint(str(path)), mode="finetune", run={"arch": "tiny", "k": k,
                "layer_type": "unstructured", "scope": "global"}, source="hydra", scores_init_type="kaiming_uniform",
                scaled_score_init=False, notice=print)
    expected = bip_unstructured_mask([l.popup_scores.detach() for l in masked_layers(theirs).values()], k)
    for layer, m in zip(ms.layers.values(), expected):
        assert torch.equal(layer.mask.flatten(), m)


@pytest.mark.parametrize("granularity", ["filter", "channel"])
@pytest.mark.parametrize("k", [0.1, 0.5, 0.7])  # not 0.8: with 5 filters BiP's count keeps one more (selector doc)
def test_bip_structured_checkpoint_loads_and_gives_its_own_logits(tmp_path, granularity, k):
    """A BiP filter/channel checkpoint has scores for its convolutions only; it loads strictly, gives
    BiP's per-layer masks and BiP's logits (weights times those masks, classifier dense)."""
    torch.manual_seed(2)
    theirs = to_masked(bip_structured_net(), granularity=granularity)
    assert type(theirs[6]) is nn.Linear  # no linear.popup_scores in the checkpoint
    for layer in masked_layers(theirs).values():
        with torch.no_grad():
            layer.popup_scores.normal_()
    path = tmp_path / "bip.pth.tar"
    hydra_style_checkpoint(theirs, path)
    scores = [l.popup_scores.detach() for l in masked_layers(theirs).values()]
    plain = bip_structured_net()  # BiP's forward: conv(x, weight * mask)
    plain.load_state_dict({k2: v for k2, v in theirs.state_dict().items() if not k2.endswith((".mask", ".popup_scores"))})
    for i, keep in zip((0, 3), bip_structured_mask(scores, k, granularity)):
        with torch.no_grad():
            shape = (-1, 1, 1, 1) if granularity == "filter" else (1, -1, 1, 1)
            plain[i].weight.mul_(keep.view(shape))
    ours = to_masked(bip_structured_net(), granularity=granularity)
    ms = MaskSet(ours, k=k, granularity=granularity, scope="layer")
    load_source(ours, ms, load_checkpoint(str(path)), mode="finetune", run={"arch": "tiny", "k": k,
                "layer_type": granularity, "scope": "layer"}, source="bip", scores_init_type="kaiming_uniform",
                scaled_score_init=False, notice=print)
    x = torch.randn(4, 1, 4, 4)
    plain.eval(), ours.eval()
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=1e-6)


def test_wrn_sub_block1_is_dropped_with_notice_and_other_extras_fail():
    model = nn.Sequential(nn.Linear(2, 2))
    sd = dict(model.state_dict())
    notes = []
    load_model_state(model, {**sd, "sub_block1.layer.0.conv1.weight": torch.zeros(1)}, source="wrn", notice=notes.append)
    assert notes and "sub_block1" in notes[0]
    with pytest.raises(UserError, match="unexpected 1 keys"):
        load_model_state(model, {**sd, "extra.weight": torch.zeros(1)}, source="x")
    with pytest.raises(UserError, match="missing 1 keys"):
        load_model_state(model, {"0.weight": sd["0.weight"]}, source="x")
    with pytest.raises(UserError, match="shape"):
        load_model_state(model, {**sd, "0.weight": torch.zeros(3, 2)}, source="x")


def test_prune_source_without_scores_gets_scaled_init_and_exact_count():
    dense = small_model(masked=False)
    model = small_model()
    ms = MaskSet(model, k=0.25, granularity="unstructured", scope="global")
    load_source(model, ms, {"state_dict": dense.state_dict()}, mode="prune", run={"arch": "x"}, source="dense",
                scores_init_type="kaiming_uniform", scaled_score_init=True, notice=print)
    conv = ms.layers["0"]
    w = conv.weight.detach()
    torch.testing.assert_close(conv.popup_scores.detach(), math.sqrt(6 / 9) * w / w.abs().max())
    total = sum(l.mask.numel() for l in ms.layers.values())
    assert sum(int(l.mask.sum()) for l in ms.layers.values()) == n_keep(0.25, total)


def test_public_structured_checkpoint_with_global_scope_is_refused(tmp_path):
    theirs = to_masked(bip_structured_net(), granularity="filter")
    path = tmp_path / "bip.pth.tar"
    hydra_style_checkpoint(theirs, path)
    ours = to_masked(bip_structured_net(), granularity="filter")
    ms = MaskSet(ours, k=0.5, granularity="filter", scope="global")
    with pytest.raises(UserError, match="pass --scope layer"):
        load_source(ours, ms, load_checkpoint(str(path)), mode="finetune", run={"arch": "tiny", "k": 0.5,
                    "layer_type": "filter", "scope": "global"}, source="bip", scores_init_type="kaiming_uniform",
                    scaled_score_init=False, notice=print)
