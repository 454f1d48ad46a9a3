"""--implicit-grad bip-code against a literal copy of the public BiP iteration.

``Theirs`` below is written as the public code (github.com/OPTML-Group/BiP) is: popup_scores
layers whose masked weight ``w`` the parent forward sets from ONE sort of all scores
(models/layers.py GetSubnetUnstructured, models/resnet_cifar.py), the requires_grad switches of
utils/model.py, both optimizers over ``model.parameters()`` (train.py), and trainer/bilevel.py's
loop with grad2vec / append_grad_to_vec. PyTorch 1.x's ``zero_grad()`` is
``zero_grad(set_to_none=False)``. Everything runs in float64 so that the two agree to ~1e-12.
"""
import copy
from functools import partial

import pytest
import torch
import torch.autograd as autograd
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import Parameter

from configs.errors import UserError
from layers import MaskSet, n_keep
from engine.optim import OptimSettings
from configs.options import BilevelOptions
from trainers.bilevel import BilevelTrainer
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.loop import checkpoint_state
from engine.source import resume_into
from tests.helpers import tiny
from tests.helpers.tiny import tiny_net

CPU = torch.device("cpu")
K = 0.3            # 228 scores: their N - int((1 - k) N) and our n_keep both keep 69
LR, MASK_LR, LR2, MOMENTUM, WD = 0.1, 0.5, 0.5, 0.9, 0.05
ITERATIONS = 3


# -- the public code, literally ------------------------------------------------------------------
class GetSubnetUnstructured(autograd.Function):
    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class SubnetConvUnstructured(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.popup_scores = Parameter(torch.Tensor(self.weight.shape))
        self.w = 0

    def forward(self, x):
        return F.conv2d(x, self.w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SubnetLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.popup_scores = Parameter(torch.Tensor(self.weight.shape))
        self.w = 0

    def forward(self, x):
        return F.linear(x, self.w, self.bias)


class TheirNet(nn.Module):
    """conv(bias) + BatchNorm2d + ReLU + linear(bias), global unstructured mask as in their ResNet."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.conv = SubnetConvUnstructured(1, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.linear = SubnetLinear(4 * 4 * 4, 3)

    def forward(self, x):
        score_list = []
        for (name, vec) in self.named_modules():
            if hasattr(vec, "popup_scores"):
                attr = getattr(vec, "popup_scores")
                if attr is not None:
                    score_list.append(attr.view(-1))
        scores = torch.cat(score_list)
        adj = GetSubnetUnstructured.apply(scores.abs(), self.k)
        pointer = 0
        for (name, vec) in self.named_modules():
            if not isinstance(vec, (nn.BatchNorm2d, nn.BatchNorm2d)):
                if hasattr(vec, "weight"):
                    attr = getattr(vec, "weight")
                    if attr is not None:
                        numel = attr.numel()
                        vec.w = attr * adj[pointer: pointer + numel].view_as(attr)
                        pointer += numel
        out = F.relu(self.bn(self.conv(x)))
        return self.linear(out.flatten(1))


def freeze_vars(model, var_name, freeze_bn=False):
    for i, v in model.named_modules():
        if hasattr(v, var_name):
            if not isinstance(v, (nn.BatchNorm2d, nn.BatchNorm2d)) or freeze_bn:
                if getattr(v, var_name) is not None:
                    getattr(v, var_name).requires_grad = False


def unfreeze_vars(model, var_name):
    for i, v in model.named_modules():
        if hasattr(v, var_name):
            if getattr(v, var_name) is not None:
                getattr(v, var_name).requires_grad = True


def switch_to_prune(model):
    unfreeze_vars(model, "popup_scores")
    freeze_vars(model, "weight")
    freeze_vars(model, "bias")


def switch_to_finetune(model):
    freeze_vars(model, "popup_scores")
    unfreeze_vars(model, "weight")
    unfreeze_vars(model, "bias")


def switch_to_bilevel(model):
    unfreeze_vars(model, "popup_scores")
    unfreeze_vars(model, "weight")
    unfreeze_vars(model, "bias")


def grad2vec(parameters):
    grad_vec = []
    for param in parameters:
        grad_vec.append(param.grad.view(-1).detach())
    return torch.cat(grad_vec)


def append_grad_to_vec(vec, parameters):
    pointer = 0
    for param in parameters:
        num_param = param.numel()
        param.grad.copy_(param.grad + vec[pointer:pointer + num_param].view_as(param).data)
        pointer += num_param


def their_iteration(model, criterion, optimizer, mask_optimizer, train_batch, val_batch, *, lr2, accelerate):
    """trainer/bilevel.py's loop body; zero_grad() as on PyTorch 1.x (zeroes, never deletes)."""
    train_images, train_targets = train_batch
    val_images, val_targets = val_batch
    if accelerate:
        switch_to_prune(model)
        output = model(train_images)
        loss = criterion(output, train_targets)
        mask_optimizer.zero_grad(set_to_none=False)
        loss.backward()
        mask_optimizer.step()

        switch_to_finetune(model)
        output = model(val_images)
        loss = criterion(output, val_targets)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
    else:
        switch_to_finetune(model)
        output = model(val_images)
        loss = criterion(output, val_targets)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

        switch_to_bilevel(model)
        optimizer.zero_grad(set_to_none=False)
        output = model(train_images)
        loss = criterion(output, train_targets)
        loss.backward()
        param_grad_vec = grad2vec(model.parameters())

        switch_to_prune(model)
        mask_optimizer.zero_grad(set_to_none=False)
        loss_mask = criterion(model(train_images), train_targets)
        loss_mask.backward()
        mask_grad_vec = grad2vec(model.parameters())
        implicit_gradient = -lr2 * mask_grad_vec * param_grad_vec
        append_grad_to_vec(implicit_gradient, model.parameters())
        mask_optimizer.step()

        output = model(train_images)  # their accuracy log, in train mode


# -- ours, on the same initial state -------------------------------------------------------------
# our module name -> theirs
NAMES = {"0": "conv", "1": "bn", "4": "linear"}


def our_model():
    # conv 1->4 (with bias), BatchNorm, linear 64->3, masked, in float64
    model = tiny_net("unstructured", convs=1, bias=True, num_classes=3).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # continuous random values: no ties among |scores|
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(4, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
    return model


def their_copy(ours):
    theirs = TheirNet(K).double()
    state = {}
    for key, value in ours.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf != "mask":
            state[f"{NAMES[owner]}.{leaf}"] = value.clone()
    theirs.load_state_dict(state, strict=True)
    return theirs


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(2 * ITERATIONS)]


sgd = partial(tiny.sgd, momentum=MOMENTUM, wd=WD, epochs=10)


def our_trainer(model, *, implicit_grad, accelerate):
    ms = MaskSet(model, k=K, granularity="unstructured", scope="global")
    ms.step(force=True)
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(LR), score_optim=sgd(MASK_LR), progress=False, options=BilevelOptions(lr2=LR2, implicit_grad=implicit_grad, accelerate=accelerate))
    return trainer, ms


def run_theirs(model, data, *, accelerate):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    mask_optimizer = torch.optim.SGD(model.parameters(), lr=MASK_LR, momentum=MOMENTUM, weight_decay=WD)
    masks = []
    for it in range(ITERATIONS):
        lower, upper = data[2 * it], data[2 * it + 1]
        # their loop zips (train_loader, val_loader): the upper level reads train_images and the
        # lower level val_images; ours reads x1 (lower) then x2 (upper)
        their_iteration(model, nn.CrossEntropyLoss(), optimizer, mask_optimizer, upper, lower, lr2=LR2,
                        accelerate=accelerate)
        masks.append(their_mask(model))
    return masks


def their_mask(model):
    scores = torch.cat([model.conv.popup_scores.detach().flatten(), model.linear.popup_scores.detach().flatten()])
    out = GetSubnetUnstructured.apply(scores.abs(), K)
    return out.bool()


def run_ours(trainer, ms, data):
    trainer.model.train()
    masks = []
    for it in range(ITERATIONS):
        trainer.step((data[2 * it], data[2 * it + 1]))
        ms.step()  # the masks of the current scores (a forward would select them first too)
        masks.append(torch.cat([layer.mask.flatten() for layer in ms.layers.values()]))
    return masks


def assert_same_state(ours, theirs):
    for key, value in ours.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "mask":
            continue
        ref = theirs.state_dict()[f"{NAMES[owner]}.{leaf}"]
        if leaf == "num_batches_tracked":
            assert int(value) == int(ref), key
        else:
            torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


def test_counts_agree_at_this_k():
    n = 4 * 9 + 64 * 3
    assert n - int((1 - K) * n) == n_keep(K, n)


@pytest.mark.parametrize("accelerate", [False, True])
def test_bip_code_equals_the_public_iteration(accelerate):
    """Three iterations from the same state on the same batches: the same masks after each, and
    every parameter and BatchNorm buffer equal to 1e-12 at the end."""
    data = batches(0)
    ours = our_model()
    theirs = their_copy(ours)
    start = copy.deepcopy(ours.state_dict())
    initial_mask = their_mask(theirs)
    their_masks = run_theirs(theirs, data, accelerate=accelerate)
    trainer, ms = our_trainer(ours, implicit_grad="bip-code", accelerate=accelerate)
    our_masks = run_ours(trainer, ms, data)
    for it, (a, b) in enumerate(zip(our_masks, their_masks)):
        assert torch.equal(a, b), f"masks differ after iteration {it + 1}"
    # the masks changed during the run, so their re-selection after score steps is exercised
    assert any(not torch.equal(m, initial_mask) for m in their_masks)
    assert_same_state(ours, theirs)
    # BatchNorm running statistics moved once per train-mode forward: 4 (2 accelerated) per iteration
    assert int(ours.state_dict()["1.num_batches_tracked"]) == ITERATIONS * (2 if accelerate else 4)
    # every kind of tensor moved, the scores included (by both optimizers)
    moved = {k for k, v in ours.state_dict().items() if not torch.equal(v, start[k])}
    assert {"0.weight", "0.bias", "0.popup_scores", "1.weight", "1.bias", "1.running_mean", "1.running_var",
            "4.weight", "4.bias", "4.popup_scores"} <= moved


@pytest.mark.parametrize("accelerate", [False, True])
def test_paper_path_differs_from_the_public_iteration(accelerate):
    data = batches(0)
    ours = our_model()
    theirs = their_copy(ours)
    run_theirs(theirs, data, accelerate=accelerate)
    trainer, ms = our_trainer(ours, implicit_grad="paper", accelerate=accelerate)
    run_ours(trainer, ms, data)
    scores = ours.state_dict()["0.popup_scores"]
    their_scores = theirs.state_dict()["conv.popup_scores"]
    assert float((scores - their_scores).abs().max()) > 1e-4


def test_bip_code_optimizers_own_every_parameter_and_the_mask_one_is_sgd():
    model = our_model()
    ms = MaskSet(model, k=K, granularity="unstructured", scope="global")
    adam = OptimSettings(optimizer="adam", lr=LR, momentum=MOMENTUM, wd=WD, schedule="constant", epochs=10)
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=adam, score_optim=adam, progress=False, options=BilevelOptions(implicit_grad="bip-code"))
    every = [id(p) for p in model.parameters()]
    for opt in trainer.optimizers.values():
        assert [id(p) for g in opt.param_groups for p in g["params"]] == every
    assert isinstance(trainer.optimizers["optimizer"], torch.optim.Adam)
    assert isinstance(trainer.optimizers["mask_optimizer"], torch.optim.SGD)
    assert trainer.optimizers["mask_optimizer"].param_groups[0]["momentum"] == MOMENTUM


def test_bip_code_mask_lr_follows_our_mask_schedule():
    model = our_model()
    ms = MaskSet(model, k=K, granularity="unstructured", scope="global")
    step = OptimSettings(optimizer="sgd", lr=MASK_LR, momentum=MOMENTUM, wd=WD, schedule="step", epochs=4,
                         milestones=(0.5, 0.75))
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(LR), score_optim=step, progress=False, options=BilevelOptions(implicit_grad="bip-code"))
    assert trainer.set_epoch(0)["mask_optimizer"] == pytest.approx(MASK_LR)
    assert trainer.set_epoch(3)["mask_optimizer"] == pytest.approx(MASK_LR * 0.01)
    assert trainer.optimizers["mask_optimizer"].param_groups[0]["lr"] == pytest.approx(MASK_LR * 0.01)


def test_bip_code_refuses_freeze_bn():
    model = our_model()
    ms = MaskSet(model, k=K, granularity="unstructured", scope="global")
    with pytest.raises(UserError, match="--freeze-bn"):
        BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(LR), score_optim=sgd(MASK_LR), freeze_bn=True, progress=False, options=BilevelOptions(implicit_grad="bip-code"))


@pytest.mark.parametrize("accelerate", [False, True])
def test_bip_code_resume_equals_uninterrupted(tmp_path, accelerate):
    """Checkpoint after one iteration, resume in a new model and trainer the way train.py does, run
    the other two: the same tensors as three uninterrupted iterations, bit for bit. The first
    iteration leaves some parameters without a gradient in their run (the scores in the weight
    step, the weights in the accelerated mask step); the second must not, so that state has to
    survive the checkpoint."""
    data = batches(0)
    full = our_model()
    trainer, ms = our_trainer(full, implicit_grad="bip-code", accelerate=accelerate)
    run_ours(trainer, ms, data)

    first = our_model()
    trainer, ms = our_trainer(first, implicit_grad="bip-code", accelerate=accelerate)
    first.train()
    trainer.step((data[0], data[1]))
    path = tmp_path / "checkpoint.pth.tar"
    config = {"arch": "tiny", "k": K}
    save_checkpoint(checkpoint_state(epoch=1, arch="tiny", model=first, maskset=ms, trainer=trainer, best_prec1=0.0,
                                     config=config), str(path))

    resumed = our_model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.zero_()  # nothing of the fresh model may leak into the resumed one
    ms = MaskSet(resumed, k=K, granularity="unstructured", scope="global")
    ckpt = load_checkpoint(str(path))
    resume_into(resumed, ms, ckpt, source=str(path), notice=print)
    trainer = BilevelTrainer(model=resumed, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(LR),
                             score_optim=sgd(MASK_LR),
                             progress=False, options=BilevelOptions(lr2=LR2, implicit_grad="bip-code", accelerate=accelerate))
    trainer.load_state_dict(ckpt["trainer_state"])
    resumed.train()
    for it in range(1, ITERATIONS):
        trainer.step((data[2 * it], data[2 * it + 1]))
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_across_implicit_grads_is_refused():
    model = our_model()
    paper, _ = our_trainer(model, implicit_grad="paper", accelerate=False)
    code, _ = our_trainer(our_model(), implicit_grad="bip-code", accelerate=False)
    with pytest.raises(UserError, match="--implicit-grad paper"):
        code.load_state_dict(paper.state_dict())
    with pytest.raises(UserError, match="--implicit-grad bip-code"):
        paper.load_state_dict(code.state_dict())
