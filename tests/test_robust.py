"""Robust training and evaluation: the PGD attack, the TRADES loss, CERTIFY, the magnitude baseline,
the robust metrics of a run, and the bad input they refuse."""
import csv
import glob
import json
import math
import os
from functools import partial
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from configs.options import RobustOptions
from engine.checkpoint import load_checkpoint
from layers import MaskSet, n_keep, to_masked
from robust.attacks import cross_entropy_loss, pgd
from robust.certify import ABSTAIN, certified_accuracy, certify, lower_confidence_bound
from robust.objectives import build_objective
from tests.helpers.cli import interrupt_at, run_error
from tests.helpers.tiny import tiny_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "1", "--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]


# dense: conv 1->4 (no bias), BatchNorm, linear 64->3
tiny_conv = partial(tiny_net, convs=1, num_classes=3)


def images(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    x[:, :, 0, 0] = 0.0  # pixels at both ends of the range: the clip must bind there
    x[:, :, 0, 1] = 1.0
    return x, torch.randint(0, 3, (n,), generator=g)


# -- the attack --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["linf", "l2"])
@pytest.mark.parametrize("start", ["ball", "gauss", "none"])
def test_pgd_never_leaves_the_ball_or_the_pixel_range(distance, start):
    model = tiny_conv()
    x, y = images()
    eps = 0.3 if distance == "linf" else 0.8
    for steps, step_size in ((1, 0.05), (7, 0.5), (20, 10.0)):  # step sizes far larger than the ball, too
        x_adv = pgd(model, x, loss=cross_entropy_loss(y), epsilon=eps, step_size=step_size, num_steps=steps,
                    distance=distance, clip_min=0.0, clip_max=1.0, start=start,
                    generator=torch.Generator().manual_seed(steps))
        delta = (x_adv - x).flatten(1)
        size = delta.abs().max(1).values if distance == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-6)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert float(size.max()) > 0  # and it did move
    x_adv = pgd(model, x, loss=cross_entropy_loss(y), epsilon=0.2, step_size=0.1, num_steps=3, distance="linf",
                clip_min=0.25, clip_max=0.75)
    assert float(x_adv.min()) >= 0.25 and float(x_adv.max()) <= 0.75  # another range is honoured as well


def trained_linear(seed=0):
    """A natural model that classifies its data perfectly: two classes split by the mean pixel,
    with margins smaller than the attack's budget."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, 4, 4, generator=g) * 0.5 + 0.25
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
        model[1].bias.copy_(torch.tensor([8.0, -8.0]))
    return model, x, y


def test_pgd_lowers_the_accuracy_of_a_natural_model():
    model, x, y = trained_linear()
    assert bool((model(x).argmax(1) == y).all())
    accuracy = {}
    for distance, eps in (("linf", 0.1), ("l2", 0.4)):
        x_adv = pgd(model, x, loss=cross_entropy_loss(y), epsilon=eps, step_size=eps / 4, num_steps=10,
                    distance=distance, clip_min=0.0, clip_max=1.0, generator=torch.Generator().manual_seed(0))
        accuracy[distance] = float((model(x_adv).argmax(1) == y).float().mean())
        noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps / 4  # smaller, random
        assert accuracy[distance] < float((model((x + noise).clamp(0, 1)).argmax(1) == y).float().mean())
    # linf: every sample within 0.1 * 16 = 1.6 of the boundary (in w.x units) is flipped
    margin = (x.flatten(1).sum(1) - 8.0).abs()
    assert accuracy["linf"] == pytest.approx(float((margin > 1.6).float().mean()))


def test_pgd_uses_the_current_mask_and_takes_no_parameter_gradient():
    model = tiny_conv()
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope="global")
    ms.step(force=True)
    for p in model.parameters():
        p.requires_grad_(True)  # scores and weights trainable, as in BiP
    calls = []
    for name, p in model.named_parameters():
        p.register_hook(lambda grad, name=name: calls.append(name))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    x, y = images()
    kwargs = dict(loss=cross_entropy_loss(y), epsilon=0.2, step_size=0.05, num_steps=5, distance="linf",
                  clip_min=0.0, clip_max=1.0)
    x_adv = pgd(model, x, generator=torch.Generator().manual_seed(3), **kwargs)
    assert calls == [] and all(p.grad is None for p in model.parameters())  # no weight or score gradient
    assert all(torch.equal(stats[k], model.state_dict()[k]) for k in stats)  # eval mode: BN statistics kept
    assert model.training and all(m.training for m in model.modules())      # the mode is restored
    # the same attack on a plain copy whose weights are the masked ones gives the same examples
    plain = tiny_conv()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".mask", ".popup_scores"))}
    for name, layer in ms.layers.items():
        state[f"{name}.weight"] = layer.weight.detach() * layer.mask
    plain.load_state_dict(state)
    plain.train()
    assert torch.equal(pgd(plain, x, generator=torch.Generator().manual_seed(3), **kwargs), x_adv)


# -- TRADES, by hand -------------------------------------------------------------------------------------
def test_trades_loss_equals_a_hand_computation():
    """f(x) = Wx + b (float64). One linf step from x + 0.001 N(0, 1): the gradient of
    sum_i KL(p_i || softmax(W x_i + b)) w.r.t. x_i is W^T (q_i - p_i); then
    loss = CE(f(x), y) + beta * sum_i KL(p_i || q_i(x_adv)) / n."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    options = RobustOptions(objective="trades", epsilon=0.1, step_size=0.03, num_steps=1, beta=6.0)
    torch.manual_seed(42)
    loss, logits = build_objective(options, nn.CrossEntropyLoss())(model, x, y)

    W, b = model[1].weight.detach(), model[1].bias.detach()
    flat = x.flatten(1)
    torch.manual_seed(42)
    x0 = (flat + 0.001 * torch.randn(x.shape, dtype=torch.float64).flatten(1)).clamp(0, 1)
    p = torch.softmax(flat @ W.T + b, dim=1)
    q0 = torch.softmax(x0 @ W.T + b, dim=1)
    x1 = (x0 + 0.03 * torch.sign((q0 - p) @ W)).clamp(flat - 0.1, flat + 0.1).clamp(0, 1)
    log_q1 = torch.log_softmax(x1 @ W.T + b, dim=1)
    ce = -torch.log(p[torch.arange(5), y]).mean()
    kl = (p * (torch.log(p) - log_q1)).sum() / 5
    assert float(loss.detach()) == pytest.approx(float(ce + 6.0 * kl), rel=1e-10)
    assert torch.allclose(logits, flat @ W.T + b)  # the clean logits are reported
    # natural CE at beta = 0
    torch.manual_seed(42)
    loss0, _ = build_objective(RobustOptions(objective="trades", beta=0.0, num_steps=1), nn.CrossEntropyLoss())(
        model, x, y)
    assert float(loss0.detach()) == pytest.approx(float(ce), rel=1e-12)


def test_pgd_objective_is_the_cross_entropy_of_its_adversarial_examples():
    model, x, y = trained_linear()
    options = RobustOptions(objective="pgd", epsilon=0.1, step_size=0.025, num_steps=10)
    torch.manual_seed(5)
    loss, logits = build_objective(options, nn.CrossEntropyLoss())(model, x, y)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, y).detach()))
    assert float(loss.detach()) > float(F.cross_entropy(model(x), y).detach())  # the attack raised the loss


# -- certification ----------------------------------------------------------------------------------------
class Constant(nn.Module):
    def __init__(self, label, num_classes=4):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        return F.one_hot(torch.full((x.shape[0],), self.label), self.num_classes).float()


def test_certification_of_a_constant_classifier_gives_the_closed_form_radius():
    """All N noisy predictions agree: the Clopper-Pearson lower bound is alpha^(1/N) (the alpha
    quantile of Beta(N, 1)), and the radius sigma * Phi^-1(alpha^(1/N))."""
    x = torch.rand(1, 4, 4)
    for sigma, n, alpha in ((0.25, 10000, 0.001), (0.5, 100, 0.01), (1.0, 1000, 0.05)):
        cert = certify(Constant(2), x, sigma=sigma, n0=100, n=n, alpha=alpha, batch=333, num_classes=4)
        assert cert.prediction == 2
        assert cert.radius == pytest.approx(sigma * NormalDist().inv_cdf(alpha ** (1 / n)), rel=1e-9)
    assert lower_confidence_bound(0, 10, 0.01) == 0.0


def test_certification_abstains_on_a_coin_flip_and_counts_certified_accuracy():
    class Coin(nn.Module):  # the sign of the noise on one pixel decides: P(top class) = 1/2
        def forward(self, x):
            return F.one_hot((x[:, 0, 0, 0] > 0.5).long(), 2).float()

    x = torch.full((1, 2, 2), 0.5)
    cert = certify(Coin(), x, sigma=0.25, n0=100, n=2000, alpha=0.001, batch=500, num_classes=2,
                   generator=torch.Generator().manual_seed(0))
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    sure = certify(Constant(1, 2), x, sigma=0.25, n0=10, n=100, alpha=0.001, batch=50, num_classes=2)
    acc = certified_accuracy([sure, sure, cert], [1, 0, 1], (0.0, sure.radius, sure.radius + 1e-9))
    assert acc == pytest.approx([100 / 3, 100 / 3, 0.0])


# -- the magnitude baseline ------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_type,scope", [("unstructured", "global"), ("unstructured", "layer"),
                                              ("filter", "global"), ("channel", "layer")])
def test_magnitude_baseline_keeps_exact_counts_of_the_largest_weights(tmp_path, digits_pretrained, layer_type, scope):
    k = 0.1
    assert train.main(["--configs", "configs/Digits/finetune.yml", "--source-net", digits_pretrained,
                       "--scaled-score-init", "--k", str(k), "--layer-type", layer_type, "--scope", scope,
                       "--result-dir", str(tmp_path), *FAST]) == 0
    ckpt = load_checkpoint(glob.glob(str(tmp_path / "*" / "finetune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0])
    source = load_checkpoint(digits_pretrained)["state_dict"]
    masks = ckpt["masks"]
    assert ckpt["masks_frozen"]

    def unit_norms(name):  # |w| per weight, or the L2 norm per filter/channel
        w = source[f"{name}.weight"].abs()
        if layer_type == "unstructured":
            return w.flatten(), masks[name].flatten()
        units = w.flatten(1) if layer_type == "filter" else w.transpose(0, 1).flatten(1)
        m = masks[name].flatten(1) if layer_type == "filter" else masks[name].transpose(0, 1).flatten(1)
        assert torch.equal(m.all(1), m.any(1))
        return units.norm(dim=1), m.any(1)

    pairs = [unit_norms(name) for name in masks]
    groups = [pairs] if scope == "global" else [[pair] for pair in pairs]
    for group in groups:
        norms = torch.cat([n for n, _ in group])
        kept = torch.cat([m for _, m in group])
        floor = 1 if (layer_type != "unstructured" and scope == "global") else 0
        if not floor:
            assert int(kept.sum()) == n_keep(k, kept.numel())
            if bool((~kept).any()):  # (conv1 has a single input channel: nothing to drop there)
                assert float(norms[kept].min()) >= float(norms[~kept].max())  # the largest ones are kept
        else:  # a global structured selection keeps one unit per layer at least; the total stays exact
            assert int(kept.sum()) == n_keep(k, kept.numel())


def test_finetune_from_a_dense_checkpoint_names_the_magnitude_baseline(tmp_path, capsys, digits_pretrained):
    code = train.main(["--configs", "configs/Digits/finetune.yml", "--source-net", digits_pretrained,
                       "--result-dir", str(tmp_path), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--scaled-score-init" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


# -- a robust run end to end ---------------------------------------------------------------------------------
ROBUST = ["--dataset", "Digits", "--no-normalize", "--epsilon", "0.125", "--step-size", "0.03125"]


def read_csv(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_robust_run_reports_its_robust_metric_everywhere_and_keeps_the_best_by_it(tmp_path, capsys):
    assert train.main(["--objective", "pgd", "--num-steps", "2", "--val-method", "adv", "--eval-num-steps", "3",
                       *ROBUST, "--result-dir", str(tmp_path), "--exp-name", "r", "--epochs", "3",
                       "--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]) == 0
    out = capsys.readouterr().out
    run_dir = glob.glob(str(tmp_path / "r" / "pretrain" / "*"))[0]
    assert "val adv_top1" in out and "test adv_top1" in out  # the per-epoch line
    rows = read_csv(run_dir)
    assert {"val_adv_top1", "test_adv_top1", "val_adv_loss"} <= set(rows[0])
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["objective"] == "pgd" and summary["model_best_by"] == "val_adv_top1"
    assert "test_adv_top1" in summary and "best_val_adv_top1" in summary
    adv = [float(r["val_adv_top1"]) for r in rows]
    assert summary["best_val_adv_top1"] == pytest.approx(max(adv))
    best = load_checkpoint(os.path.join(run_dir, "checkpoint", "model_best.pth.tar"))
    assert best["epoch"] == 1 + adv.index(max(adv)) and best["best_prec1"] == pytest.approx(max(adv))
    events = b"".join(open(f, "rb").read() for f in glob.glob(os.path.join(run_dir, "tensorboard", "*")))
    assert b"val/adv_top1" in events and b"test/adv_top1" in events


def test_a_smoothing_run_certifies_at_its_radii(tmp_path):
    assert train.main(["--objective", "smooth", "--noise-std", "0.25", "--val-method", "smooth",
                       "--certify-n0", "10", "--certify-n", "200", "--certify-subset", "8",
                       "--certify-radii", "0,0.25", *ROBUST, "--result-dir", str(tmp_path), "--exp-name", "s",
                       *FAST]) == 0
    run_dir = glob.glob(str(tmp_path / "s" / "pretrain" / "*"))[0]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["model_best_by"] == "val_cert_r0"
    assert 0 <= summary["test_cert_r0.25"] <= summary["test_cert_r0"] <= 100
    assert {"val_cert_r0", "val_cert_r0.25", "val_certified"} <= set(read_csv(run_dir)[0])
    assert float(read_csv(run_dir)[0]["val_certified"]) == 8


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--epsilon", "-0.1"], "--epsilon must be a finite number >= 0"),
    (["--epsilon", "nan"], "--epsilon must be a finite number >= 0"),
    (["--epsilon", "inf", "--objective", "pgd"], "--epsilon must be a finite number >= 0"),
    (["--num-steps", "0", "--objective", "pgd"], "--num-steps must be at least 1"),
    (["--objective", "smooth"], "needs --noise-std"),
    (["--objective", "stability"], "needs --noise-std"),
    (["--val-method", "smooth"], "needs --noise-std"),
    (["--noise-std", "0", "--objective", "smooth"], "--noise-std must be a finite number > 0"),
    (["--objective", "pgd", "--normalize"], "drop --normalize"),
    (["--objective", "pgd", "--clip-min", "1", "--clip-max", "0"], "must be below --clip-max"),
    (["--certify-radii", "0,x"], "--certify-radii must be comma-separated numbers"),
    (["--objective", "fgsm"], "invalid choice"),
    (["--val-method", "pgd"], "invalid choice"),
])
def test_bad_robust_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, needle):
    err = run_error(tmp_path, capsys, "--no-normalize", *args)
    assert needle in err, err


def test_bip_code_refuses_a_robust_objective(tmp_path, capsys, digits_pretrained):
    code = train.main(["--configs", "configs/Digits/bip.yml", "--no-normalize", "--implicit-grad", "bip-code",
                       "--objective", "trades", "--source-net", digits_pretrained, "--result-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--implicit-grad paper" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_robust_options_defaults_are_hydras():
    o = RobustOptions()
    assert (o.epsilon, o.num_steps, o.step_size, o.beta, o.clip_min, o.clip_max, o.distance) == \
        (8 / 255, 10, 2 / 255, 6.0, 0.0, 1.0, "linf")
    assert (o.certify_n0, o.certify_n, o.certify_alpha) == (100, 10000, 0.001)
    assert math.isclose(o.radii[1], 0.25)


@pytest.mark.slow
def test_robust_sweep_runs_every_method_and_prints_the_pgd_column(tmp_path, digits_pretrained):
    import subprocess
    import sys
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "res")}
    proc = subprocess.run(["bash", "sh/robust_sweep.sh", "Digits", digits_pretrained, "0.1", "--epochs", "1",
                           "--data-fraction", "0.3", "--num-steps", "2", "--eval-num-steps", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("test PGD")[-1]  # the rows under the closing table's header
    for name in ("Digits_robust_hydra_k0.1", "Digits_robust_bip_k0.1", "Digits_robust_magnitude_k0.1"):
        assert name in table


def test_a_robust_bip_run_resumes_exactly(tmp_path, digits_pretrained, monkeypatch):
    """The attacks draw from the run's random stream (reseeded per epoch) and the evaluations from their
    own generator: a run interrupted after two epochs and resumed ends bit for bit as the uninterrupted one,
    with the same model_best choice."""
    from trainers.bilevel import BilevelTrainer
    args = ["--configs", "configs/Digits/robust_bip.yml", "--source-net", digits_pretrained, "--epochs", "3",
            "--num-steps", "1", "--eval-num-steps", "1", "--data-fraction", "0.3", "--batch-size", "128",
            "--no-progress", "--exp-name", "t"]
    assert train.main([*args, "--result-dir", str(tmp_path / "a")]) == 0
    restore = interrupt_at(monkeypatch, BilevelTrainer, 2)
    assert train.main([*args, "--result-dir", str(tmp_path / "b")]) == 130
    restore()
    ckpt = glob.glob(str(tmp_path / "b" / "t" / "prune" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0]
    assert train.main([*args, "--result-dir", str(tmp_path / "b"), "--resume", ckpt]) == 0
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        a = load_checkpoint(glob.glob(str(tmp_path / "a" / "t" / "prune" / "*" / "checkpoint" / name))[0])
        b = load_checkpoint(os.path.join(os.path.dirname(ckpt), name))
        assert a["epoch"] == b["epoch"] and a["best_prec1"] == b["best_prec1"]
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), (name, key)
