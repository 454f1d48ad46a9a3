"""Runs are never lost or garbled: bad input is one line before anything is written, checkpoints are
checked when read, resumes keep the run's settings, and kills, signals and full disks leave the last
complete checkpoint (and a metrics.csv that matches it)."""
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import types

import pytest
import torch

import train
from configs.errors import UserError
from configs.schema import load_config, read_options
from layers import MaskSet, to_masked
from models import build_model
from trainers.base import BaseTrainer
from engine.checkpoint import load_checkpoint
from engine.files import atomic_write
from engine.run_folder import new_run_dir
from tests.helpers.cli import QUICK_RUN, interrupt_at, one_line_error, run_error, run_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "128", "--no-progress", "--data-fraction", "0.3", "--lr", "0.05"]


def tree(folder):
    """Every file under ``folder`` with its content hash and mtime: equal trees = nothing written."""
    out = {}
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def csv_epochs(run_dir):
    lines = open(os.path.join(run_dir, "metrics.csv")).read().splitlines()
    return [int(line.split(",")[0]) for line in lines[1:]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained Digits model and a (HYDRA) pruned one, each a finished 2-epoch run folder.

    Not the session's digits_pretrained: these tests resume, copy and edit the run FOLDERS (config.yml,
    metrics.csv, checkpoint.pth.tar with its history) and their messages name this run's own settings
    (epochs=2, lr=0.05, test_batch_size 128, print_freq 100), which a source network does not have."""
    tmp = tmp_path_factory.mktemp("runs")
    pre = run_ok(tmp / "a")
    pruned = run_ok(tmp / "b", "--exp-mode", "prune", "--k", "0.2", "--source-net",
                    os.path.join(pre, "checkpoint", "model_best.pth.tar"))
    return types.SimpleNamespace(pre=pre, pre_ckpt=os.path.join(pre, "checkpoint", "checkpoint.pth.tar"),
                                 pruned=pruned, pruned_ckpt=os.path.join(pruned, "checkpoint", "checkpoint.pth.tar"))


def copy_run(run_dir, tmp_path):
    """A copy of a run folder, in a result tree of its own."""
    dest = tmp_path / "copy" / "t" / "x" / os.path.basename(run_dir)
    shutil.copytree(run_dir, dest)
    return str(dest), str(dest / "checkpoint" / "checkpoint.pth.tar")


# -- A1: flags that crashed later ------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--device", "mps"], "unsupported --device 'mps'"),
    (["--device", "meta"], "unsupported --device 'meta'"),
    (["--device", "cuda:x"], "unsupported --device"),
    (["--seed", str(2**70)], "--seed must be in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
])
def test_bad_device_and_seed(tmp_path, capsys, args, needle):
    assert needle in run_error(tmp_path, capsys, *args)


def test_largest_seed_is_accepted():
    assert load_config(["--seed", str(2**63 - 1)]).seed == 2**63 - 1


# -- A2: checkpoints of the wrong structure --------------------------------------------------------
def mutate(src, dest, change):
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    torch.save(ckpt, dest)
    return str(dest)


def _mask_names(ckpt):
    return sorted(ckpt["masks"])


BAD_SOURCES = {
    "text file": (None, "not a PyTorch checkpoint"),
    "json text": (None, "not a PyTorch checkpoint"),
    "state_dict value not a tensor": (lambda c: c["state_dict"].update({"conv1.weight": 3}), "is a int, not a tensor"),
    "state_dict is a list": (lambda c: c.update(state_dict=list(c["state_dict"].values())), "'state_dict' is a list"),
    "config is a list": (lambda c: c.update(config=["k", 0.2]), "'config' is a list"),
    "masks is a list": (lambda c: c.update(masks=list(c["masks"].values())), "'masks' is a list"),
    "mask not bool": (lambda c: c["masks"].update({n: m.float() for n, m in c["masks"].items()}), "expected a bool tensor"),
    "mask of the wrong shape": (lambda c: c["masks"].update({_mask_names(c)[0]: torch.ones(3, dtype=torch.bool)}),
                                "has shape (3,)"),
    "mask missing for a layer": (lambda c: c["masks"].pop(_mask_names(c)[0]), "stored masks do not fit this model"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_checkpoint_is_one_line(tmp_path, capsys, runs, case):
    change, needle = BAD_SOURCES[case]
    path = tmp_path / "src.pth.tar"
    if case == "text file":
        path.write_text("these are my notes\n")
    elif case == "json text":
        path.write_text('{"state_dict": {}}')
    else:
        mutate(runs.pruned_ckpt, path, change)
    err = run_error(tmp_path, capsys, "--exp-mode", "finetune", "--k", "0.2", "--source-net", str(path), "--epochs", "1")
    assert needle in err and str(path) in err


BAD_RESUMES = {
    "epoch is a string": (lambda c: c.update(epoch="2"), "'epoch' is '2'"),
    "no rng": (lambda c: c.pop("rng"), "no usable 'rng' state"),
    "malformed rng": (lambda c: c["rng"].update(torch=torch.zeros(3)), "no usable 'rng' state"),
    "truncated torch rng": (lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "no usable 'rng' state"),
    "malformed numpy rng": (lambda c: c["rng"]["numpy"].update(keys=torch.zeros(5, dtype=torch.int64)),
                            "no usable 'rng' state"),
    "no trainer_state": (lambda c: c.pop("trainer_state"), "no usable 'trainer_state'"),
    "trainer_state of another optimizer": (lambda c: c["trainer_state"].update(optimizer={"state": {}}),
                                           "optimizer state does not fit"),
    "config is a list": (lambda c: c.update(config=[1, 2]), "'config' is a list"),
    "no config": (lambda c: c.pop("config"), "no config in it"),
    "unknown config key": (lambda c: c["config"].update(fancy_option=1), "fancy_option"),
    "history not a list": (lambda c: c.update(history="rows"), "'history'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESUMES))
def test_bad_resume_checkpoint_is_one_line_and_touches_nothing(tmp_path, capsys, runs, case):
    change, needle = BAD_RESUMES[case]
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    mutate(ckpt, ckpt, change)
    before = tree(run_dir)
    err = run_error(tmp_path, capsys, "--resume", ckpt)
    assert needle in err
    assert tree(run_dir) == before


def test_public_checkpoint_without_config_cannot_be_resumed(tmp_path, capsys, runs):
    path = mutate(runs.pre_ckpt, tmp_path / "public.pth.tar", lambda c: c.pop("config"))
    assert "--source-net" in run_error(tmp_path, capsys, "--resume", path)


# -- A3: a result folder that cannot be written ----------------------------------------------------
def test_result_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    err = run_error(tmp_path, capsys, "--result-dir", str(target))
    assert "is a file, not a folder" in err and target.read_text() == "x"


def test_result_dir_under_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert "is a file, not a folder" in run_error(tmp_path, capsys, "--result-dir", str(target / "sub" / "res"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_result_dir_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "not writable" in run_error(tmp_path, capsys, "--result-dir", str(locked / "res"))
    finally:
        locked.chmod(0o755)


def test_read_only_file_system_is_an_error_before_training(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(BaseTrainer, "train_epoch", lambda self, epoch, loaders: trained.append(epoch))

    def read_only(path, mode=0o777, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "mkdir", read_only)
    err = run_error(tmp_path, capsys, "--epochs", "1", *FAST)
    assert "Read-only file system" in err and "--result-dir" in err
    assert not trained and not (tmp_path / "res").exists()


# -- A4: resume keeps the run's settings ------------------------------------------------------------
def test_bare_resume_takes_everything_from_the_checkpoint(tmp_path, runs, monkeypatch):
    args = ["--exp-mode", "prune", "--k", "0.3", "--scope", "layer", "--optimizer", "adam", "--lr", "0.01",
            "--source-net", os.path.join(runs.pre, "checkpoint", "model_best.pth.tar"), "--epochs", "3"]
    full = run_ok(tmp_path / "a", *args)
    restore = interrupt_at(monkeypatch, BaseTrainer, 1)
    assert train.main(["--result-dir", str(tmp_path / "b"), "--exp-name", "t", *FAST, *args]) == 130
    restore()
    cut = glob.glob(str(tmp_path / "b" / "t" / "prune" / "*"))[0]
    config_before = open(os.path.join(cut, "config.yml")).read()
    ckpt = os.path.join(cut, "checkpoint", "checkpoint.pth.tar")
    assert train.main(["--resume", ckpt]) == 0  # no other flag: defaults would be pretrain, sgd, 100 epochs
    a = load_checkpoint(os.path.join(full, "checkpoint", "checkpoint.pth.tar"))
    b = load_checkpoint(ckpt)
    assert b["epoch"] == 3 and b["config"]["optimizer"] == "adam" and b["config"]["scope"] == "layer"
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert open(os.path.join(cut, "config.yml")).read() == config_before
    assert csv_epochs(cut) == [1, 2, 3]


def test_resume_auto_is_one_command_for_a_start_and_every_restart(tmp_path, runs, monkeypatch, capsys):
    run = ["--exp-mode", "prune", "--k", "0.3", "--source-net", os.path.join(runs.pre, "checkpoint", "model_best.pth.tar"),
           "--epochs", "3", "--exp-name", "t", *FAST]
    assert train.main([*run, "--result-dir", str(tmp_path / "a")]) == 0  # the same run, never interrupted
    full = glob.glob(str(tmp_path / "a" / "t" / "prune" / "*"))[0]
    args = [*run, "--result-dir", str(tmp_path / "b"), "--resume", "auto"]
    restore = interrupt_at(monkeypatch, BaseTrainer, 1)
    assert train.main(args) == 130  # the first start: nothing to continue, a new run, killed in epoch 2
    restore()
    assert "--resume auto: no unfinished run under" in capsys.readouterr().out
    cut = glob.glob(str(tmp_path / "b" / "t" / "prune" / "*"))
    assert len(cut) == 1
    assert train.main(args) == 0  # the restart: the same command continues that run in its folder
    assert f"--resume auto: continuing {os.path.join(cut[0], 'checkpoint', 'checkpoint.pth.tar')}" in \
        capsys.readouterr().out
    assert glob.glob(str(tmp_path / "b" / "t" / "prune" / "*")) == cut and csv_epochs(cut[0]) == [1, 2, 3]
    a = load_checkpoint(os.path.join(full, "checkpoint", "checkpoint.pth.tar"))
    b = load_checkpoint(os.path.join(cut[0], "checkpoint", "checkpoint.pth.tar"))
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key  # as if never interrupted
    assert train.main(args) == 0  # finished (summary.json written): the same command starts a new run
    assert "no unfinished run" in capsys.readouterr().out
    assert len(glob.glob(str(tmp_path / "b" / "t" / "prune" / "*"))) == 2


def test_a_run_a_live_process_holds_is_never_continued_by_another(tmp_path, runs, monkeypatch, capsys):
    """A run folder's lock (RUN/.lock, flock) is held while a process runs it: --resume auto leaves such
    a run alone (a requeued job while the old one still runs starts its own), and an explicit --resume
    of it is refused with one line, nothing touched."""
    import fcntl
    run = ["--exp-mode", "prune", "--k", "0.3", "--source-net", os.path.join(runs.pre, "checkpoint", "model_best.pth.tar"),
           "--epochs", "3", "--exp-name", "t", "--result-dir", str(tmp_path), "--resume", "auto", *FAST]
    restore = interrupt_at(monkeypatch, BaseTrainer, 1)
    assert train.main(run) == 130  # an unfinished run: its checkpoint after epoch 1
    restore()
    (first,) = glob.glob(str(tmp_path / "t" / "prune" / "*"))
    ckpt = os.path.join(first, "checkpoint", "checkpoint.pth.tar")
    with open(os.path.join(first, ".lock"), "a") as live:  # another process running it
        fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
        capsys.readouterr()
        assert train.main([*run[:-len(FAST) - 2], "--resume", ckpt, *FAST]) == 2
        assert f"error: {first} is in use: another process is running this run" in capsys.readouterr().err
        restore = interrupt_at(monkeypatch, BaseTrainer, 0)
        assert train.main(run) == 130  # --resume auto: not that run; a new one
        restore()
        assert "no unfinished run under" in capsys.readouterr().out
        assert len(glob.glob(str(tmp_path / "t" / "prune" / "*"))) == 2
        assert hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == before
    assert train.main(run) == 0  # the lock is gone (the process ended): the newest unfinished run continues
    assert "--resume auto: continuing" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle,drop", [
    (["--optimizer", "adam"], "optimizer='sgd' but this run asks for optimizer='adam'", "drop --optimizer"),
    (["--lr", "0.2"], "lr=0.05 but this run asks for lr=0.2", "drop --lr (or pass --lr 0.05)"),
    (["--epochs", "5"], "epochs=2 but this run asks for epochs=5", "drop --epochs"),
    (["--normalize"], "normalize=False but this run asks for normalize=True", "(or pass --no-normalize)"),
    (["--label-smoothing", "0.1"], "label_smoothing=0.0", "drop --label-smoothing"),
    (["--reset-head"], "reset_head=False", "drop --reset-head"),
    (["--exp-mode", "prune", "--k", "0.5"], "exp_mode='pretrain'", "--source-net instead of --resume"),
])
def test_resume_refuses_a_changed_setting(tmp_path, capsys, runs, args, needle, drop):
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    before = tree(run_dir)
    err = run_error(tmp_path, capsys, "--resume", ckpt, *args)
    assert needle in err and drop in err
    assert tree(run_dir) == before  # config.yml included


def test_resume_refuses_a_changed_setting_from_yaml(tmp_path, capsys, runs):
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    yml = tmp_path / "c.yml"
    yml.write_text("lr: 0.3\nnum_workers: 0\n")
    err = run_error(tmp_path, capsys, "--resume", ckpt, "--configs", str(yml))
    assert "lr=0.05" in err and "lr=0.3" in err and f"drop lr from {yml}" in err


def test_resume_with_the_same_settings_repeated_is_accepted(tmp_path, runs):
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    mutate(ckpt, ckpt, lambda c: c.update(epoch=1, history=c["history"][:1]))
    assert train.main(["--result-dir", str(tmp_path / "res"), "--exp-name", "t", "--epochs", "2", *FAST,
                       "--resume", ckpt]) == 0
    assert load_checkpoint(ckpt)["epoch"] == 2


def test_resume_may_change_run_control_and_records_it(tmp_path, runs):
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    mutate(ckpt, ckpt, lambda c: c.update(epoch=1, history=c["history"][:1]))
    config_before = open(os.path.join(run_dir, "config.yml")).read()
    assert train.main(["--resume", ckpt, "--print-freq", "7", "--test-batch-size", "64", "--device", "cpu"]) == 0
    after = load_checkpoint(ckpt)
    assert after["config"]["print_freq"] == 7 and after["config"]["test_batch_size"] == 64
    assert after["config"]["lr"] == 0.05  # the rest is the saved config
    config_after = open(os.path.join(run_dir, "config.yml")).read()
    assert config_after.startswith(config_before.rstrip("\n"))  # the original settings stay
    added = config_after[len(config_before.rstrip("\n")):].strip()
    assert added.startswith("# resumed after epoch 1 with") and "print_freq: 7 (was 100)" in added
    assert "test_batch_size: 64 (was 128)" in added and "lr" not in added
    assert "print_freq: 7 (was 100)" in open(os.path.join(run_dir, "run.log")).read()


def test_options_know_which_keys_were_set(tmp_path):
    yml = tmp_path / "c.yml"
    yml.write_text("wd: 1e-4\n")
    options = read_options(["--configs", str(yml), "--lr", "0.2"])
    assert options.from_cli == {"configs", "lr"} and options.from_yaml == {"wd"}
    assert options.values["momentum"] == 0.9 and "momentum" not in options.explicit


# -- B5: stale temporary files ---------------------------------------------------------------------
def test_resume_removes_our_stale_temp_files_only(tmp_path, capsys, runs):
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    mutate(ckpt, ckpt, lambda c: c.update(epoch=1, history=c["history"][:1]))
    folder = os.path.join(run_dir, "checkpoint")
    ours = [os.path.join(folder, ".tmp-k2j3_x9a-checkpoint.pth.tar"), os.path.join(folder, ".tmp-ab1c.pth.tar"),
            os.path.join(run_dir, ".tmp-q7w8e9r0-summary.json")]
    theirs = [os.path.join(folder, ".tmp-notes.md"), os.path.join(folder, "keep.tmp"), os.path.join(run_dir, "tmp-x.json")]
    for path in ours + theirs:
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(UserError, match="temporary file of an unfinished checkpoint write"):
        load_checkpoint(ours[0])
    assert train.main(["--resume", ckpt]) == 0
    assert not [p for p in ours if os.path.exists(p)]
    assert all(os.path.exists(p) for p in theirs)
    assert "left by an interrupted write" in capsys.readouterr().out


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def half_then_fail(fh):
        fh.write(b"new, but only ha")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        atomic_write(str(path), half_then_fail)
    assert info.value.filename == str(path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


# -- B6: metrics.csv is the checkpoint's history; model_best never falls behind ---------------------
def fail_on_write(monkeypatch, name, epoch, exc):
    """Make ``save_checkpoint`` raise ``exc`` instead of writing ``name`` at ``epoch``."""
    import engine.loop

    real = engine.loop.save_checkpoint
    order = []

    def save(state, path):
        order.append((state.get("epoch"), os.path.basename(path)))
        if os.path.basename(path) == name and state.get("epoch") == epoch:
            raise exc
        real(state, path)

    monkeypatch.setattr(engine.loop, "save_checkpoint", save)
    return order


def test_kill_between_csv_row_and_checkpoint_lists_no_epoch_twice(tmp_path, monkeypatch):
    order = fail_on_write(monkeypatch, "checkpoint.pth.tar", 2, KeyboardInterrupt())
    assert train.main(["--result-dir", str(tmp_path), "--exp-name", "t", "--epochs", "3", *FAST]) == 130
    run_dir = glob.glob(str(tmp_path / "t" / "pretrain" / "*"))[0]
    ckpt = os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar")
    assert csv_epochs(run_dir) == [1, 2] and load_checkpoint(ckpt)["epoch"] == 1
    # model_best is written before checkpoint.pth.tar, so it may be ahead, never behind
    assert order[:2] == [(1, "model_best.pth.tar"), (1, "checkpoint.pth.tar")]
    if (2, "model_best.pth.tar") in order:
        assert order.index((2, "model_best.pth.tar")) < order.index((2, "checkpoint.pth.tar"))
    monkeypatch.undo()
    assert train.main(["--resume", ckpt]) == 0
    assert csv_epochs(run_dir) == [1, 2, 3]
    final = load_checkpoint(ckpt)
    assert [row["epoch"] for row in final["history"]] == [1, 2, 3]
    best = load_checkpoint(os.path.join(run_dir, "checkpoint", "model_best.pth.tar"))
    assert best["best_prec1"] == final["best_prec1"]
    assert final["history"][best["epoch"] - 1]["val_top1"] == best["best_prec1"]


def test_legacy_checkpoint_without_history_trims_metrics_csv(tmp_path, runs):
    run_dir, ckpt = copy_run(runs.pre, tmp_path)
    mutate(ckpt, ckpt, lambda c: (c.update(epoch=1), c.pop("history")))
    with open(os.path.join(run_dir, "metrics.csv"), "a") as fh:
        fh.write("2,0.1,2.3")  # the start of a row cut by a kill
    assert train.main(["--resume", ckpt]) == 0
    assert csv_epochs(run_dir) == [1, 2]


def test_summary_has_what_a_results_table_needs(runs):
    summary = json.load(open(os.path.join(runs.pruned, "summary.json")))
    expected = {"exp_name": "t", "exp_mode": "prune", "dataset": "Digits", "arch": "smallcnn",
                "layer_type": "unstructured", "scope": "global", "k": 0.2, "trainer": "base", "seed": 1234,
                "epochs": 2, "run_dir": runs.pruned}
    assert {key: summary[key] for key in expected} == expected
    for key in ("test_top1", "test_top5", "best_val_top1", "sparsity", "wall_seconds", "train_seconds"):
        assert isinstance(summary[key], float), key
    assert abs(summary["sparsity"] - 0.8) < 0.01 and summary["wall_seconds"] >= summary["train_seconds"] > 0
    # What the results report reads: the source, the per-layer counts, weights and FLOPs kept.
    assert summary["source_net"] == os.path.abspath(os.path.join(runs.pre, "checkpoint", "model_best.pth.tar"))
    assert summary["prune_method"] is None  # set for the woodfisher trainer only
    layers = {row["name"]: row for row in summary["layers"]}
    assert set(layers) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert summary["masked_params"] == sum(r["params"] for r in layers.values()) == 159_264
    assert summary["masked_kept"] == sum(r["kept"] for r in layers.values()) == 159_264 - int(0.8 * 159_264)
    assert summary["masked_zeros"] == 159_264 - summary["masked_kept"]  # trained weights: no zero is kept
    assert summary["sparsity_masked"] == summary["masked_zeros"] / 159_264
    # All weights of the model: the masked ones plus 586 biases and BatchNorm affine parameters,
    # counted nonzero from the saved weights (the scores are not weights).
    state = torch.load(runs.pruned_ckpt, weights_only=True)["state_dict"]
    others = [v for key, v in state.items() if key.rsplit(".", 1)[-1] in ("bias",) or key.startswith("bn")
              and key.endswith("weight")]
    assert sum(v.numel() for v in others) == 159_850 - 159_264 == summary["params_total"] - 159_264
    assert summary["params_kept"] == summary["masked_kept"] + sum(int(v.count_nonzero()) for v in others)
    assert summary["sparsity_model"] == pytest.approx(1 - summary["params_kept"] / 159_850, abs=1e-15)
    # smallcnn on 8x8 inputs: conv1/conv2 at 8x8 (64 positions), conv3 at 4x4 (16), linear once.
    per_weight = {"conv1": 64, "conv2": 64, "conv3": 16, "fc1": 1, "fc2": 1}
    assert summary["flops_total"] == sum(r["params"] * per_weight[n] for n, r in layers.items()) == 2_444_544
    assert summary["flops_kept"] == sum(r["kept"] * per_weight[n] for n, r in layers.items())
    assert summary["flops_uncounted"] == []
    assert summary["finished_at"].endswith("Z")


# -- B7: SIGINT / SIGTERM while a checkpoint is written ----------------------------------------------
DRIVER = r"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
import engine.checkpoint
import train
real_write = engine.checkpoint.atomic_write
count = [0]

def atomic_write(path, write):
    if os.path.basename(path) == "checkpoint.pth.tar":
        count[0] += 1
        if count[0] == 2:  # the epoch-2 checkpoint: the signal arrives while the file is being written
            def write_interrupted(fh):
                os.kill(os.getpid(), signal.{sig})
                time.sleep(0.3)
                write(fh)
            return real_write(path, write_interrupted)
    return real_write(path, write)

engine.checkpoint.atomic_write = atomic_write
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_checkpoint_write(tmp_path, train_processes, sig):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, sig=sig))
    # python driver.py ... in a process of its own, forked after the imports (tests/helpers/processes.py)
    proc = train_processes.run_script(str(driver), "--result-dir", str(tmp_path / "res"), "--exp-name", "t",
                                      "--epochs", "4", *FAST)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("interrupted") and proc.stderr.count("\n") == 1, proc.stderr
    run_dir = glob.glob(str(tmp_path / "res" / "t" / "pretrain" / "*"))[0]
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))
    assert ckpt["epoch"] == 2  # the write was finished, then the run stopped
    assert not glob.glob(os.path.join(run_dir, "checkpoint", ".tmp-*"))
    assert csv_epochs(run_dir) == [1, 2]


def test_interrupt_while_closing_the_log_is_one_line(tmp_path, capsys, monkeypatch):
    from engine.run_log import RunLog

    def close(self, *, after_error=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunLog, "close", close)
    code = train.main(["--result-dir", str(tmp_path), "--exp-name", "t", "--epochs", "1", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 130 and err.startswith("interrupted") and "\n" not in err


# -- B8: a full disk ------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, code):
    number = getattr(errno, code)
    fail_on_write(monkeypatch, "checkpoint.pth.tar", 2, OSError(number, os.strerror(number)))
    exit_code = train.main(["--result-dir", str(tmp_path), "--exp-name", "t", "--epochs", "2", *FAST])
    err = one_line_error(capsys, exit_code, 1)
    run_dir = glob.glob(str(tmp_path / "t" / "pretrain" / "*"))[0]
    ckpt = os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar")
    assert os.strerror(number) in err and f"--resume {ckpt}" in err and "checkpoint.pth.tar" in err
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert not glob.glob(os.path.join(run_dir, "checkpoint", ".tmp-*"))


FSIZE_DRIVER = r"""
import os, resource, signal, sys
sys.path.insert(0, {root!r})
import engine.loop
import train
real = engine.loop.save_checkpoint

def save(state, path):
    real(state, path)
    if os.path.basename(path) == "checkpoint.pth.tar" and state["epoch"] == 1:
        # from now on no file may grow past the size of this checkpoint: the next one fails (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = os.path.getsize(path) - 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

engine.loop.save_checkpoint = save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_file_size_limit_in_torch_save_is_a_clean_stop(tmp_path, train_processes):
    driver = tmp_path / "driver.py"
    driver.write_text(FSIZE_DRIVER.format(root=ROOT))
    proc = train_processes.run_script(str(driver), "--result-dir", str(tmp_path / "res"), "--exp-name", "t",
                                      "--epochs", "3", *FAST)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: could not write") and proc.stderr.count("\n") == 1, proc.stderr
    assert os.strerror(errno.EFBIG) in proc.stderr
    run_dir = glob.glob(str(tmp_path / "res" / "t" / "pretrain" / "*"))[0]
    assert load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))["epoch"] == 1


# -- B9: run folders created at the same time ----------------------------------------------------------
def test_concurrent_run_folders_get_distinct_numbers(tmp_path):
    cfg = load_config(["--result-dir", str(tmp_path), "--exp-name", "t"])
    parent = tmp_path / "t" / "pretrain"
    parent.mkdir(parents=True)
    (parent / "2--k-1_old-run").mkdir()  # a folder of an older train.py, without a claim
    (parent / ".4.claim").touch()          # a number claimed whose folder was deleted
    count = 12
    barrier = threading.Barrier(count)
    made, errors = [], []

    def create():
        barrier.wait()
        try:
            made.append(new_run_dir(cfg))
        except Exception as exc:  # noqa: BLE001 - any failure is the bug under test
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    numbers = sorted(int(os.path.basename(p).split("--")[0]) for p in made)
    assert numbers == list(range(5, 5 + count))
    assert all(os.path.isdir(p) for p in made)


# slow (four interpreters importing torch at once: ~20 s on 2 busy cores): the claim that numbers run
# folders is an O_EXCL file, the same across threads and processes, and the test above races twelve
# threads on it, with stale claims and older folders besides.
@pytest.mark.slow
def test_concurrent_processes_get_distinct_numbers(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from engine.run_folder import new_run_dir; from configs.schema import load_config; "
            "print(new_run_dir(load_config(['--result-dir', %r, '--exp-name', 't'])))" % (ROOT, str(tmp_path)))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(os.path.basename(p).split("--")[0]) for p in paths) == [1, 2, 3, 4]
    assert all(os.path.isdir(p) for p in paths)


# -- C11: --reset-head ----------------------------------------------------------------------------------
def five_class_source(path, pruned=False):
    """A Digits-shaped smallcnn trained (here: initialised) on 5 classes; pruned: masked, with masks."""
    torch.manual_seed(3)
    model = build_model("smallcnn", num_classes=5, in_channels=1, image_size=8)
    if not pruned:
        torch.save(model.state_dict(), path)  # a bare state dict, like a torchvision download
        return model.state_dict()
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.2, granularity="unstructured", scope="global")
    ms.step(force=True)
    config = {"arch": "smallcnn", "layer_type": "unstructured", "k": 0.2, "scope": "global"}
    torch.save({"arch": "smallcnn", "state_dict": model.state_dict(), "masks": ms.masks(), "config": config}, path)
    return {"state_dict": model.state_dict(), "masks": ms.masks()}


def test_other_class_count_suggests_reset_head(tmp_path, capsys):
    five_class_source(tmp_path / "src.pth.tar")
    err = run_error(tmp_path, capsys, "--source-net", str(tmp_path / "src.pth.tar"), "--epochs", "1")
    assert "5 classes" in err and "10" in err and "--reset-head" in err


def test_reset_head_needs_a_source(tmp_path, capsys):
    assert "--source-net" in run_error(tmp_path, capsys, "--reset-head")


def test_reset_head_pretrain_keeps_the_body_and_replaces_the_classifier(tmp_path):
    src = five_class_source(tmp_path / "src.pth.tar")
    run_dir = run_ok(tmp_path, "--source-net", str(tmp_path / "src.pth.tar"), "--reset-head", "--epochs", "1",
                     "--lr", "0", "--wd", "0")
    sd = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))["state_dict"]
    assert torch.equal(sd["conv1.weight"], src["conv1.weight"]) and torch.equal(sd["fc1.weight"], src["fc1.weight"])
    assert sd["fc2.weight"].shape[0] == 10 and src["fc2.weight"].shape[0] == 5
    log = open(os.path.join(run_dir, "run.log")).read()
    assert "--reset-head: dropped its classifier fc2 (5 classes)" in log and "for 10 classes" in log


def test_reset_head_prune(tmp_path):
    src = five_class_source(tmp_path / "src.pth.tar")
    run_dir = run_ok(tmp_path, "--exp-mode", "prune", "--k", "0.2", "--source-net", str(tmp_path / "src.pth.tar"),
                     "--reset-head", "--epochs", "1")
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))
    assert torch.equal(ckpt["state_dict"]["conv1.weight"], src["conv1.weight"])  # HYDRA prune freezes weights
    assert ckpt["masks"]["fc2"].shape == (10, 128)
    total = sum(m.numel() for m in ckpt["masks"].values())
    assert abs(sum(int(m.sum()) for m in ckpt["masks"].values()) / total - 0.2) < 0.01


def test_reset_head_finetune_keeps_the_masks_and_a_dense_new_head(tmp_path):
    src = five_class_source(tmp_path / "src.pth.tar", pruned=True)
    run_dir = run_ok(tmp_path, "--exp-mode", "finetune", "--k", "0.2", "--source-net", str(tmp_path / "src.pth.tar"),
                     "--reset-head", "--epochs", "1")
    masks = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))["masks"]
    for name in ("conv1", "conv2", "fc1"):
        assert torch.equal(masks[name], src["masks"][name]), name
    assert masks["fc2"].shape == (10, 128) and bool(masks["fc2"].all())
    assert "stays dense" in open(os.path.join(run_dir, "run.log")).read()


def test_resume_with_frozen_masks_that_do_not_fit_names_the_file(runs):
    from engine.source import resume_into

    ckpt = load_checkpoint(runs.pruned_ckpt)
    ckpt["masks_frozen"] = True
    ckpt["masks"].pop(sorted(ckpt["masks"])[0])
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.2, granularity="unstructured", scope="global")
    with pytest.raises(UserError, match="stored masks do not fit this model") as info:
        resume_into(model, ms, ckpt, source="RUN/checkpoint.pth.tar", notice=print)
    assert "RUN/checkpoint.pth.tar" in str(info.value)


def test_written_files_get_the_mode_open_would_give(tmp_path):
    # mkstemp makes 0600 files: checkpoints and logs would be unreadable to a shared machine's group
    from engine.files import write_text
    write_text(str(tmp_path / "summary.json"), "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "summary.json").st_mode & 0o777 == 0o666 & ~umask


# -- names and places a run is told to write to ------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--exp-name", "../../escape"], "must be one folder name inside --result-dir"),
    (["--exp-name", ".."], "must be one folder name inside --result-dir"),
    (["--exp-name", "a\udcffb"], "--exp-name 'a\\udcffb' is not valid UTF-8 text"),
    (["--exp-name", "x" * 300], "a folder name of 300 bytes"),
])
def test_names_that_would_escape_or_break_the_results_folder_are_refused(tmp_path, capsys, args, needle):
    err = run_error(tmp_path, capsys, *QUICK_RUN, *args)
    assert needle in err, err
    assert os.listdir(tmp_path) == []  # nothing made, not even above --result-dir


def test_a_result_dir_too_long_or_not_utf8_is_refused_without_a_folder(tmp_path, capsys):
    deep = os.path.join(str(tmp_path), *(["d" * 200] * 21))  # 4,200+ characters
    err = one_line_error(capsys, train.main([*QUICK_RUN, "--result-dir", deep]), 2)
    assert "--result-dir is too long" in err and os.listdir(tmp_path) == []
    err = one_line_error(capsys, train.main([*QUICK_RUN, "--result-dir", str(tmp_path / "r\udcff")]), 2)
    assert "is not valid UTF-8 text" in err and os.listdir(tmp_path) == []


def test_an_experiment_folder_linked_outside_the_results_folder_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "res").mkdir()
    os.symlink(outside, tmp_path / "res" / "t")
    err = one_line_error(capsys, train.main(["--result-dir", str(tmp_path / "res"), *QUICK_RUN, "--exp-name", "t"]), 2)
    assert "outside" in err and os.listdir(outside) == []


def test_resume_auto_does_not_follow_a_run_folder_that_is_a_symlink(tmp_path, capsys, runs):
    """A linked "run folder" (someone else's, outside --result-dir) is never taken over by --resume auto."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs.pruned, outside)
    os.remove(outside / "summary.json")  # looks unfinished: --resume auto would pick it
    before = tree(str(outside))
    parent = tmp_path / "res" / "t" / "pretrain"
    parent.mkdir(parents=True)
    os.symlink(outside, parent / "1--k-1_trainer-base_epochs-2_arch-smallcnn")
    run_ok(tmp_path, "--resume", "auto", "--epochs", "1")
    assert tree(str(outside)) == before


def test_compile_without_a_cxx_compiler_is_refused_before_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    err = run_error(tmp_path, capsys, *QUICK_RUN, "--compile")
    assert "--compile needs a C++ compiler" in err, err
