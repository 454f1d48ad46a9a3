"""--amp, --channels-last, --compile (engine.precision): same masks and weights as the plain run where
the maths says so, the OBS rows untouched by autocast, the GradScaler state through a checkpoint, one
pass over the weights per masked layer, and the CLI's refusals."""
from __future__ import annotations

import copy
import glob
import os
import shutil
import sysconfig
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pruning.gradients
import train
from configs.options import SpeedOptions
from engine.checkpoint import load_checkpoint
from engine.optim import OptimSettings
from engine.precision import SCALER_STATE, Precision
from layers import MaskSet, masked_layers
from trainers.base import BaseTrainer
from tests.helpers.tiny import tiny_batch, tiny_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
SHORT = ["--epochs", "1", "--batch-size", "128", "--data-fraction", "0.3", "--no-progress"]


def run(tmp_path, name, source, *args):
    """A 1-epoch prune run on Digits; returns its final checkpoint."""
    out = tmp_path / name
    assert train.main(["--result-dir", str(out), "--exp-name", "t", "--source-net", source, *SHORT, *args]) == 0
    return load_checkpoint(glob.glob(str(out / "t" / "*" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0])


def config(name):
    return os.path.join(ROOT, "configs", "Digits", name)


@pytest.mark.parametrize("yml", ["hydra.yml", "bip.yml"])
def test_channels_last_gives_the_same_masks_and_weights(tmp_path, digits_pretrained, yml):
    plain = run(tmp_path, "plain", digits_pretrained, "--configs", config(yml))
    last = run(tmp_path, "last", digits_pretrained, "--configs", config(yml), "--channels-last")
    assert plain["masks"].keys() == last["masks"].keys()
    for name in plain["masks"]:
        assert torch.equal(plain["masks"][name], last["masks"][name]), name
    # channels_last convolutions sum in another order: float32 rounding, amplified a little by the steps
    for name, value in plain["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], value, rtol=1e-3, atol=1e-4)
    # the checkpoint's tensors are channels_last, and export reads them
    conv = next(v for v in last["state_dict"].values() if v.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_checkpoint_exports_like_the_plain_one(tmp_path, digits_pretrained):
    import export

    outs = {}
    for name, extra in (("plain", []), ("last", ["--channels-last"])):
        run(tmp_path, name, digits_pretrained, "--configs", config("hydra.yml"), *extra)
        ckpt = glob.glob(str(tmp_path / name / "t" / "*" / "*" / "checkpoint" / "checkpoint.pth.tar"))[0]
        outs[name] = str(tmp_path / f"{name}.pth")
        assert export.main([ckpt, "--format", "sparse", "--out", outs[name]]) == 0
    plain, last = (torch.load(outs[n], weights_only=True) for n in ("plain", "last"))
    assert plain["sparse"] and plain["sparse"].keys() == last["sparse"].keys()
    for key, entry in plain["sparse"].items():  # the bitmask is in the logical (row-major) order
        assert torch.equal(entry["bitmask"], last["sparse"][key]["bitmask"]), key


def test_bf16_run_collects_float32_obs_rows_equal_to_the_plain_ones(tmp_path, monkeypatch, digits_pretrained):
    """WoodFisher prunes at epoch 0 before any step: its first Fisher rows must not depend on --amp (no
    autocast region reaches the OBS code), and they are float32."""
    seen: dict[str, list] = {}
    original = pruning.gradients.collect_gradients

    def spy(*args, **kwargs):
        G = original(*args, **kwargs)
        seen.setdefault(current, []).append((G.clone(), torch.is_autocast_enabled("cpu")))
        return G

    monkeypatch.setattr("pruning.solver.collect_gradients", spy)
    for current, amp in (("none", "none"), ("bf16", "bf16")):
        run(tmp_path, current, digits_pretrained, "--configs", config("woodfisher.yml"), "--amp", amp,
            "--prune-end", "0", "--fisher-subsample-size", "16")
    (g_plain, _), (g_bf16, autocast_on) = seen["none"][0], seen["bf16"][0]
    assert g_bf16.dtype == torch.float32 and not autocast_on
    assert torch.equal(g_plain, g_bf16)


def test_bf16_run_keeps_float32_weights_and_no_scaler(tmp_path, digits_pretrained):
    ckpt = run(tmp_path, "bf16", digits_pretrained, "--configs", config("bip.yml"), "--amp", "bf16")
    assert all(v.dtype in (torch.float32, torch.bool, torch.int64) for v in ckpt["state_dict"].values())
    assert SCALER_STATE not in ckpt["trainer_state"]  # bf16 needs no loss scaling


# conv 1->4 (with bias), BatchNorm, linear 64->3, masked; batches of 8 images 1x4x4, 3 classes
net = partial(tiny_net, "unstructured", convs=1, bias=True, num_classes=3)
batch = tiny_batch


def set_scale(trainer, scale):
    state = trainer.precision.scaler.state_dict()
    trainer.precision.scaler.load_state_dict({**state, "scale": scale})


def hydra(model, amp):
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    settings = OptimSettings(optimizer="sgd", lr=0.1, momentum=0.9, wd=0.0, schedule="constant", epochs=1)
    return BaseTrainer(model=model, maskset=ms, mode="finetune", device=CPU, weight_optim=settings, progress=False,
                       speed=SpeedOptions(amp=amp))


def test_fp16_scaler_state_round_trips_through_the_trainer_state():
    """CPU autocast knows float16 too, so the GradScaler path runs here (train.py refuses fp16 without
    CUDA only because that is where it pays)."""
    trainer = hydra(net(), "fp16")
    set_scale(trainer, 1024.0)  # a scale other than the initial one
    for i in range(3):
        trainer.step(batch(i))
    state = trainer.state_dict()
    assert state[SCALER_STATE]["scale"] == 1024.0 and state[SCALER_STATE]["_growth_tracker"] == 3
    resumed = hydra(net(), "fp16")
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.precision.scaler.state_dict() == state[SCALER_STATE]
    with pytest.raises(ValueError, match="GradScaler"):
        hydra(net(), "fp16").load_state_dict({k: v for k, v in state.items() if k != SCALER_STATE})


def test_fp16_skips_a_step_with_inf_gradients_and_halves_the_scale():
    trainer = hydra(net(), "fp16")
    set_scale(trainer, 2.0 ** 120)  # large enough that the scaled float16 gradients overflow
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    trainer.step(batch(0))
    assert trainer.precision.scaler.get_scale() == 2.0 ** 119
    changed = [k for k, v in trainer.model.state_dict().items() if k in before and not torch.equal(v, before[k])
               and "running" not in k]
    assert changed == []  # the step was skipped (BatchNorm statistics move in the forward, as always)


class _WeightSizedOps(TorchDispatchMode):
    """Counts aten ops whose output has as many elements as a masked weight (views are no pass over it)."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.ops = sizes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() in self.sizes and not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_masked_forward_makes_one_product_and_at_most_one_cast_per_weight(amp):
    """The mask's float copy is cached (not rebuilt per step), and autocast casts weight * mask once."""
    model = net()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="layer")
    ms.freeze()
    layers = masked_layers(model)
    sizes = {layer.weight.numel() for layer in layers.values()}
    x = batch(0)[0]
    precision = Precision(options=SpeedOptions(amp=amp), device=CPU)
    with torch.no_grad(), precision.autocast():
        model(x)  # the first forward builds the cached multipliers
        counter = _WeightSizedOps(sizes)
        with counter:
            model(x)
    per_layer = {"none": ["mul"], "bf16": ["mul", "_to_copy"]}[amp]
    assert sorted(counter.ops) == sorted(per_layer * len(layers))


def test_fp16_without_cuda_and_fp16_with_bilevel_are_refused(tmp_path, capsys, digits_pretrained):
    args = ["--result-dir", str(tmp_path / "res"), "--source-net", digits_pretrained, *SHORT]
    assert train.main([*args, "--configs", config("hydra.yml"), "--amp", "fp16", "--device", "cpu"]) == 2
    assert "use --amp bf16" in capsys.readouterr().err
    assert train.main([*args, "--configs", config("bip.yml"), "--amp", "fp16"]) == 2
    assert "--trainer bilevel does not implement" in capsys.readouterr().err  # refused before the device check
    assert not glob.glob(str(tmp_path / "res" / "*" / "*" / "*"))


def _has_compiler() -> bool:
    return shutil.which(sysconfig.get_config_var("CC") or "cc") is not None or shutil.which("gcc") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has_compiler(), reason="torch inductor on the CPU needs a C compiler")
def test_compile_gives_the_eager_masks(tmp_path, digits_pretrained):
    eager = run(tmp_path, "eager", digits_pretrained, "--configs", config("hydra.yml"))
    compiled = run(tmp_path, "compiled", digits_pretrained, "--configs", config("hydra.yml"), "--compile")
    for name in eager["masks"]:
        assert torch.equal(eager["masks"][name], compiled["masks"][name]), name


def _autocast_log(model):
    """Records, for every forward of ``model``, whether CPU autocast was on and the logits' dtype."""
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    return seen


def test_bf16_autocasts_every_forward_of_both_bip_levels_and_of_the_evaluation():
    from configs.options import BilevelOptions
    from engine.evaluate import BASE
    from trainers.bilevel import BilevelTrainer

    model = net()
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="global")
    settings = OptimSettings(optimizer="sgd", lr=0.1, momentum=0.9, wd=0.0, schedule="constant", epochs=1)
    trainer = BilevelTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=settings,
                             score_optim=settings, options=BilevelOptions(), progress=False,
                             speed=SpeedOptions(amp="bf16"))
    seen = _autocast_log(model)
    trainer.step((batch(0), batch(1)))
    assert seen == [(True, torch.bfloat16)] * 2  # lower and upper level
    seen.clear()
    evaluation = Precision(options=SpeedOptions(amp="bf16"), device=CPU).evaluation(BASE)
    metrics = evaluation(model, [batch(2)], device=CPU)
    assert seen == [(True, torch.bfloat16)] and metrics["top1"] >= 0
    assert not torch.is_autocast_enabled("cpu")  # nothing left on after the step or the evaluation
