"""train.py end to end on Digits: config precedence, bad input, resume, dense export."""
import glob
import os
import subprocess
import sys

import pytest
import torch

import train
from configs.schema import load_config
from models import build_model
from engine.checkpoint import load_checkpoint
from tests.helpers.cli import QUICK_RUN, interrupt_at, run_error, run_ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = QUICK_RUN  # run_ok's settings: the resume test repeats its run


# -- configuration ---------------------------------------------------------------------------------
def test_precedence_defaults_yaml_cli(tmp_path):
    yml = tmp_path / "c.yml"
    yml.write_text("lr: 0.3\nwd: 1e-4\nepochs: 7\nmask-lr: 0.2\n")
    cfg = load_config(["--configs", str(yml), "--lr", "0.01"])
    assert cfg.lr == 0.01            # command line beats YAML
    assert cfg.wd == 1e-4 and cfg.epochs == 7 and cfg.mask_lr == 0.2   # YAML beats defaults ("1e-4" read as float)
    assert cfg.momentum == 0.9       # default
    assert load_config(["--configs", str(yml), "--no-normalize"]).normalize is False


def test_every_shipped_config_loads():
    for path in glob.glob(os.path.join(ROOT, "configs", "*", "*.yml")):
        extra = ["--source-net", "x.pth.tar"] if not path.endswith("pretrain.yml") else []
        load_config(["--configs", path, *extra])


@pytest.mark.parametrize("args,needle", [
    (["--lr-schedul", "cosine"], "did you mean '--lr-schedule'"),
    (["--k", "0"], "must be in (0, 1]"),
    (["--k", "1.5", "--exp-mode", "prune", "--source-net", "x"], "must be in (0, 1]"),
    (["--k", "abc"], "invalid float value"),
    (["--layer-type", "unstructurd"], "invalid choice"),
    (["--exp-mode", "prune", "--k", "0.1"], "needs --source-net"),
    (["--exp-mode", "finetune", "--k", "0.1"], "needs --source-net"),
    (["--exp-mode", "prune", "--layer-type", "dense", "--k", "0.1", "--source-net", "x"], "masked layer"),
    (["--k", "0.5"], "pretrain trains every weight"),
])
def test_bad_flags(tmp_path, capsys, args, needle):
    assert needle in run_error(tmp_path, capsys, *args)


def test_unknown_yaml_key_names_the_closest(tmp_path, capsys):
    yml = tmp_path / "c.yml"
    yml.write_text("mask_lr_schedul: step\n")
    err = run_error(tmp_path, capsys, "--configs", str(yml))
    assert "unknown key 'mask_lr_schedul'" in err and "mask_lr_schedule" in err


def test_yaml_that_would_execute_code_is_rejected(tmp_path, capsys):
    yml = tmp_path / "c.yml"
    yml.write_text("lr: !!python/object/apply:os.system ['echo hi']\n")
    assert "not valid YAML" in run_error(tmp_path, capsys, "--configs", str(yml))


@pytest.mark.parametrize("args,needle", [
    (["--arch", "resnet19"], "did you mean 'resnet18'"),
    (["--dataset", "CIFAR11"], "CIFAR1"),
    (["--trainer", "bilevl", "--exp-mode", "prune", "--k", "0.1", "--source-net", "x"], "did you mean 'bilevel'"),
    (["--exp-mode", "prune", "--k", "0.1", "--source-net", "/nonexistent.pth.tar"], "checkpoint not found"),
    (["--dataset", "CIFAR10", "--data-dir", "/nonexistent-dir"], "/nonexistent-dir"),
])
def test_bad_names_and_missing_files(tmp_path, capsys, args, needle):
    assert needle in run_error(tmp_path, capsys, *args)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "other.pth.tar"
    torch.save({"arch": "resnet20s", "state_dict": build_model("resnet20s", num_classes=10).state_dict()}, ckpt)
    err = run_error(tmp_path, capsys, "--exp-mode", "prune", "--k", "0.1", "--source-net", str(ckpt))
    assert "'resnet20s'" in err and "--arch resnet20s" in err
    torch.save({"state_dict": build_model("resnet20s", num_classes=10).state_dict()}, ckpt)
    err = run_error(tmp_path, capsys, "--exp-mode", "prune", "--k", "0.1", "--source-net", str(ckpt))
    assert "does not fit this model" in err


def test_help_lists_every_flag(capsys):
    # in this process: argparse prints the help and exits 0 (test_subprocess_exit_code_and_single_line
    # below runs train.py as a program)
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    for flag in ("--exp-mode", "--mask-lr-schedule", "--implicit-grad", "--fisher-damp", "--layer-floor"):
        assert flag in out


def test_subprocess_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "train.py", "--k", "2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and proc.stdout == ""


# -- full pipeline, resume, export (source network: digits_pretrained of tests/conftest.py) ----------
def test_run_folder_contents(tmp_path, digits_pretrained):
    run_dir = run_ok(tmp_path, "--exp-mode", "prune", "--trainer", "bilevel", "--k", "0.2", "--source-net", digits_pretrained,
                     "--scaled-score-init", "--save-dense")
    assert os.path.basename(run_dir) == "1--k-0.2_trainer-bilevel_epochs-2_arch-smallcnn"
    for name in ("config.yml", "metrics.csv", "run.log", "summary.json", "sparsity.txt", "tensorboard",
                 "checkpoint/checkpoint.pth.tar", "checkpoint/model_best.pth.tar", "checkpoint/checkpoint_dense.pth.tar"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    lines = open(os.path.join(run_dir, "metrics.csv")).read().splitlines()
    assert len(lines) == 3 and "sparsity" in lines[0]
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    # the dense export holds the same masks and loads strictly into the plain model
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))
    dense = torch.load(os.path.join(run_dir, "checkpoint", "checkpoint_dense.pth.tar"), weights_only=True)
    plain = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    plain.load_state_dict(dense, strict=True)
    for name, mask in ckpt["masks"].items():
        assert torch.equal(dense[f"{name}.weight"][~mask], torch.zeros(int((~mask).sum())))
    total = sum(m.numel() for m in ckpt["masks"].values())
    kept = sum(int(m.sum()) for m in ckpt["masks"].values())
    assert kept == total - int(0.8 * total)


def test_resume_equals_uninterrupted(tmp_path, digits_pretrained, monkeypatch):
    args = ["--exp-mode", "prune", "--trainer", "bilevel", "--k", "0.2", "--source-net", digits_pretrained, "--epochs", "3",
            "--mask-lr-schedule", "step"]
    full = run_ok(tmp_path / "a", *args)
    # interrupt the same run after two epochs, then resume it
    from trainers.bilevel import BilevelTrainer
    restore = interrupt_at(monkeypatch, BilevelTrainer, 2)
    assert train.main(["--result-dir", str(tmp_path / "b" / "res"), "--exp-name", "t", *FAST, *args]) == 130
    restore()
    cut = glob.glob(str(tmp_path / "b" / "res" / "t" / "prune" / "*"))[0]
    ckpt = os.path.join(cut, "checkpoint", "checkpoint.pth.tar")
    assert load_checkpoint(ckpt)["epoch"] == 2
    assert train.main(["--result-dir", str(tmp_path / "b" / "res"), "--exp-name", "t", *FAST, *args, "--resume", ckpt]) == 0
    a = load_checkpoint(os.path.join(full, "checkpoint", "checkpoint.pth.tar"))
    b = load_checkpoint(ckpt)
    assert b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert len(open(os.path.join(cut, "metrics.csv")).read().splitlines()) == 4  # continued in the same folder


def test_resume_with_other_k_is_refused(tmp_path, capsys, digits_pretrained):
    run_dir = run_ok(tmp_path, "--exp-mode", "prune", "--k", "0.2", "--source-net", digits_pretrained, "--epochs", "1")
    ckpt = os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar")
    err = run_error(tmp_path / "x", capsys, "--exp-mode", "prune", "--k", "0.3", "--resume", ckpt)
    assert "k=0.2" in err and "--k 0.2" in err


def test_hydra_prune_then_finetune_keeps_mask(tmp_path, digits_pretrained):
    pruned = run_ok(tmp_path, "--exp-mode", "prune", "--k", "0.1", "--scope", "layer", "--layer-type", "channel",
                    "--source-net", digits_pretrained, "--epochs", "1")
    src = os.path.join(pruned, "checkpoint", "model_best.pth.tar")
    # the finetune run keeps the default (global) scope: stored masks are used as they are
    fine = run_ok(tmp_path, "--exp-mode", "finetune", "--k", "0.1", "--layer-type", "channel",
                  "--source-net", src, "--epochs", "1")
    before = load_checkpoint(src)["masks"]
    after = load_checkpoint(os.path.join(fine, "checkpoint", "checkpoint.pth.tar"))["masks"]
    for name in before:
        assert torch.equal(before[name], after[name])


def test_evaluate_writes_nothing(tmp_path, capsys, digits_pretrained):
    assert train.main(["--result-dir", str(tmp_path / "res"), "--source-net", digits_pretrained, "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "test: loss" in out and not (tmp_path / "res").exists()


# slow (about half a minute: ResNet-18, four runs): the pieces run in the default set, on Digits (the
# pipeline pretrain -> prune (bip, channel hydra) -> finetune and the masks it keeps, above), for the
# CIFAR-10 files (test_data.py) and for the configs (test_every_shipped_config_loads, and
# test_first_contact.py: they read ./datasets); this is the README's commands verbatim end to end.
@pytest.mark.slow
def test_design_commands_run_as_written_on_cifar10_layout(tmp_path, monkeypatch):
    """The README's four pipeline commands, on CIFAR-10 files in the torchvision layout under ./datasets
    (the configs' data_dir and the CLI default), with --epochs 1 appended to keep the test fast."""
    from tests.helpers.data_files import write_cifar10

    write_cifar10(str(tmp_path / "datasets"), per_batch=26, test=10)  # 130 images: the configs' batch of 128 fits
    monkeypatch.chdir(tmp_path)
    cfg = os.path.join(ROOT, "configs", "CIFAR10")
    quick = ["--epochs", "1", "--no-progress", "--result-dir", str(tmp_path / "res")]
    assert train.main(["--k", "1.0", "--arch", "resnet18", "--configs", f"{cfg}/pretrain.yml", "--seed", "1234",
                       "--exp-name", "C10_r18_pre", *quick]) == 0
    pre = glob.glob(str(tmp_path / "res" / "C10_r18_pre" / "pretrain" / "*" / "checkpoint" / "model_best.pth.tar"))[0]
    assert train.main(["--arch", "resnet18", "--exp-mode", "prune", "--configs", f"{cfg}/bip.yml", "--k", "0.01",
                       "--source-net", pre, "--seed", "1234", "--exp-name", "C10_r18_unstructured_bip_k0.01", *quick]) == 0
    assert train.main(["--arch", "resnet18", "--exp-mode", "prune", "--configs", f"{cfg}/hydra.yml", "--layer-type",
                       "channel", "--k", "0.5", "--source-net", pre, "--exp-name", "C10_r18_channel_hydra_k0.5", *quick]) == 0
    pruned = glob.glob(str(tmp_path / "res" / "C10_r18_unstructured_bip_k0.01" / "prune" / "*" / "checkpoint"
                           / "model_best.pth.tar"))[0]
    assert train.main(["--arch", "resnet18", "--exp-mode", "finetune", "--configs", f"{cfg}/finetune.yml", "--k", "0.01",
                       "--source-net", pruned, "--exp-name", "C10_r18_unstructured_bip_k0.01", *quick]) == 0
    fine = glob.glob(str(tmp_path / "res" / "C10_r18_unstructured_bip_k0.01" / "finetune" / "*" / "checkpoint"
                         / "checkpoint.pth.tar"))[0]
    masks = load_checkpoint(fine)["masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - int(0.99 * total)


def test_diverging_run_stops_with_an_error_not_a_hang(tmp_path, capsys, digits_pretrained):
    code = train.main(["--result-dir", str(tmp_path / "res"), "--exp-name", "t", *FAST, "--exp-mode", "prune",
                       "--trainer", "bilevel", "--k", "0.2", "--source-net", digits_pretrained, "--lr", "1e6", "--mask-lr", "1e6"])
    err = capsys.readouterr().err
    assert code == 1 and "lower --lr" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--lr", "nan"], ["--mask-lr", "inf"], ["--wd", "-1"]])
def test_non_finite_or_negative_rates_are_rejected(tmp_path, capsys, args):
    assert "finite number >= 0" in run_error(tmp_path, capsys, *args)


def test_resume_with_another_seed_or_mode_is_refused(tmp_path, capsys, digits_pretrained):
    run_dir = run_ok(tmp_path, "--exp-mode", "prune", "--k", "0.2", "--source-net", digits_pretrained, "--epochs", "1")
    ckpt = os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar")
    err = run_error(tmp_path / "x", capsys, "--exp-mode", "prune", "--k", "0.2", "--resume", ckpt, "--seed", "7",
                    "--batch-size", "128", "--data-fraction", "0.3")
    assert "seed=1234" in err
    err = run_error(tmp_path / "y", capsys, "--exp-mode", "finetune", "--k", "0.2", "--resume", ckpt,
                    "--batch-size", "128", "--data-fraction", "0.3")
    assert "--source-net instead of --resume" in err


def test_freeze_bn_is_honoured_by_bilevel(tmp_path, digits_pretrained):
    run_dir = run_ok(tmp_path, "--exp-mode", "prune", "--trainer", "bilevel", "--k", "0.2", "--source-net", digits_pretrained,
                     "--epochs", "1", "--freeze-bn")
    before = load_checkpoint(digits_pretrained)["state_dict"]
    after = load_checkpoint(os.path.join(run_dir, "checkpoint", "checkpoint.pth.tar"))["state_dict"]
    assert torch.equal(before["bn1.weight"], after["bn1.weight"]) and torch.equal(before["bn1.bias"], after["bn1.bias"])
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_old_option_name_is_still_accepted_as_flag_and_yaml_key(tmp_path):
    """--woodburry-joint-sparsify (the public WoodFisher code's spelling) is an alias of the new name."""
    assert load_config(["--no-woodburry-joint-sparsify"]).woodbury_joint_sparsify is False
    assert load_config(["--no-woodbury-joint-sparsify"]).woodbury_joint_sparsify is False
    yml = tmp_path / "c.yml"
    yml.write_text("woodburry_joint_sparsify: false\n")
    assert load_config(["--configs", str(yml)]).woodbury_joint_sparsify is False


def test_each_trainer_declares_its_options_once():
    """The flags a trainer receives are exactly the fields of its options dataclass, all in the schema."""
    from configs.schema import FIELDS
    from trainers import TRAINERS

    for name, cls in TRAINERS.items():
        if cls.Options is None:
            continue
        assert set(cls.Options.names()) <= set(FIELDS), name
        defaults = cls.Options()
        for field_name in cls.Options.names():  # one default, the same in the schema and the section
            assert FIELDS[field_name].default == getattr(defaults, field_name), (name, field_name)
