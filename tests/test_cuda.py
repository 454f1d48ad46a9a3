"""The OBS, HYDRA and BiP steps on a CUDA device against the same steps on the CPU (skipped without CUDA).

The OBS step must stay on the device (no per-layer host synchronisation: see test_solver.py for the
CPU count) and give the CPU's masks and, within float tolerance, its weights, also with the
gradient matrix kept in host memory (--offload-grads)."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from configs.options import BilevelOptions
from layers import MaskSet, masked_layers, n_keep, to_masked
from pruning.methods import PRUNE_METHODS
from pruning.solver import FisherSettings, OBSSolver
from trainers.base import BaseTrainer
from trainers.bilevel import BilevelTrainer
from tests.helpers import tiny
from tests.helpers.tiny import tiny_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU, GPU = torch.device("cpu"), torch.device("cuda")


# conv 3->8, BatchNorm, conv 8->8 stride 2, linear 128->10, all masked, on 8x8 inputs
net = partial(tiny_net, "unstructured", in_channels=3, width=8, image_size=8, num_classes=10)


def data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


sgd = partial(tiny.sgd, momentum=0.9, wd=5e-4, epochs=1)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("joint", [True, False])
def test_obs_step_on_the_gpu_matches_the_cpu(offload, joint):
    x, y = data()
    results = {}
    for device in (CPU, GPU):
        model = net().to(device)
        ms = MaskSet(model, k=0.3, granularity="unstructured", scope="global")
        ms.set_masks({n: torch.ones_like(layer.mask) for n, layer in ms.layers.items()})
        solver = OBSSolver(ms.layers, granularity="unstructured", method=PRUNE_METHODS["woodfisher"],
                           fisher=FisherSettings(m=16, samples_per_grad=4, damp=1e-4, block_size=64,
                                                 offload=offload), device=device)
        solver.collect(model, [(x, y)])
        assert solver.G.device.type == ("cpu" if offload or device == CPU else "cuda")
        masks = solver.prune_to(0.3, scope="global", joint=joint)
        results[device.type] = ({n: m.cpu() for n, m in masks.items()},
                                {n: layer.weight.detach().cpu() for n, layer in ms.layers.items()})
    (cpu_masks, cpu_w), (gpu_masks, gpu_w) = results["cpu"], results["cuda"]
    total = sum(m.numel() for m in cpu_masks.values())
    assert sum(int(m.sum()) for m in gpu_masks.values()) == n_keep(0.3, total)
    agree = sum(int((cpu_masks[n] == gpu_masks[n]).sum()) for n in cpu_masks) / total
    assert agree > 0.995  # float32 statistics: only near-ties at the threshold may flip
    for n in cpu_w:
        same = cpu_masks[n] & gpu_masks[n]
        torch.testing.assert_close(gpu_w[n][same], cpu_w[n][same], rtol=1e-3, atol=1e-4)


def test_hydra_and_bip_steps_on_the_gpu_match_the_cpu():
    x, y = data(16)
    for trainer_cls, extra in ((BaseTrainer, {}), (BilevelTrainer, {"score_optim": sgd(0.1),
                                                                      "options": BilevelOptions()})):
        states = {}
        for device in (CPU, GPU):
            model = net().to(device)
            ms = MaskSet(model, k=0.2, granularity="unstructured", scope="global")
            for layer in masked_layers(model).values():
                with torch.no_grad():
                    layer.popup_scores.copy_(layer.weight.abs())
            ms.step(force=True)
            trainer = trainer_cls(model=model, maskset=ms, mode="prune", device=device, weight_optim=sgd(0.05),
                                  progress=False, **copy.deepcopy(extra))
            batch = (x, y) if trainer_cls is BaseTrainer else ((x, y), (x.flip(0), y.flip(0)))
            trainer.step(batch)
            states[device.type] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for key, value in states["cpu"].items():
            if value.dtype == torch.bool:
                agree = float((states["cuda"][key] == value).float().mean())
                assert agree > 0.99, key
            else:
                torch.testing.assert_close(states["cuda"][key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("trainer_cls", [BaseTrainer, BilevelTrainer])
def test_hydra_and_bip_steps_never_synchronise_after_the_first(trainer_cls):
    """torch.cuda.set_sync_debug_mode("error") raises at any call that waits for the device: 20 HYDRA / BiP steps
    after the first run under it (the epoch loop's reads happen on the steps that print; tests/test_dispatch_count.py
    checks them by count on every device)."""
    x, y = (t.to(GPU) for t in data(16))  # on the device already: the test is about the step, not the input copy
    model = net().to(GPU)
    ms = MaskSet(model, k=0.2, granularity="unstructured", scope="global")
    extra = {} if trainer_cls is BaseTrainer else {"score_optim": sgd(0.1), "options": BilevelOptions()}
    trainer = trainer_cls(model=model, maskset=ms, mode="prune", device=GPU, weight_optim=sgd(0.05), progress=False,
                          **extra)
    batch = (x, y) if trainer_cls is BaseTrainer else ((x, y), (x.flip(0), y.flip(0)))
    trainer.step(batch)
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            trainer.step(batch)
    finally:
        torch.cuda.set_sync_debug_mode(before)
    ms.check_finite()
    total = sum(layer.mask.numel() for layer in ms.layers.values())
    assert sum(int(layer.mask.sum()) for layer in ms.layers.values()) == n_keep(0.2, total)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 kernels need compute capability >= 8.0")
def test_two_four_linear_layers_run_as_semi_structured_tensors():
    """A 2:4 mask of ``layers.selector`` is the layout torch's semi-structured tensors take: the
    converted network gives the dense fp16 network's outputs (fp16 tolerance)."""
    from deploy.semi_structured import semi_structured
    from layers.convert import to_dense

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    to_masked(model, granularity="nm")
    ms = MaskSet(model, k=0.5, granularity="nm", scope="global", nm=(2, 4))
    ms.step(force=True)
    ms.freeze()
    result = semi_structured(model)
    assert result.converted == ["0", "2"], result.notes
    dense = to_dense(copy.deepcopy(model)).to(GPU, torch.float16).eval()
    x = torch.randn(64, 128, device=GPU, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), dense(x), rtol=1e-2, atol=1e-2)


def test_decode_gpu_path_on_cuda_matches_the_cpu_path(tmp_path):
    """--decode gpu with device="cuda": nvJPEG's batch decode, the device steps and the loader wrapper.

    nvJPEG's IDCT and chroma upsampling are not libjpeg's, so pixels are compared by their mean
    difference per image (4/255): the same crop and flip stay well inside it, a wrong crop, scale
    or flip of these smooth-plus-noise images is far outside. Labels and shapes are exact.
    """
    from bench.bench_data import make_images
    from data import build_dataset, build_loaders
    from data.gpu_decode import DeviceLoader, encoded_splits
    from data.image_folder import scan_image_folder
    from data.lmdb_writer import write_lmdb

    make_images(str(tmp_path / "tree"), count=24, size=(120, 90), classes=3)
    listing = scan_image_folder(str(tmp_path / "tree"), fix="test")
    for name in ("train.lmdb", "val.lmdb"):
        write_lmdb(listing, str(tmp_path / name), progress=False)
    cpu = build_dataset("ImageNet", data_dir=str(tmp_path), image_dim=64, num_classes=3)
    dev = encoded_splits(cpu, dataset="ImageNet", normalize=False, device=GPU)
    settings = dict(batch_size=8, test_batch_size=8, seed=1, num_workers=0)
    cpu_loaders, gpu_loaders = build_loaders(cpu, **settings), build_loaders(dev, **settings)
    assert isinstance(gpu_loaders.train, DeviceLoader)
    for loaders in (cpu_loaders, gpu_loaders):
        loaders.set_epoch(2)
    for name in ("train", "test"):
        pairs = list(zip(getattr(gpu_loaders, name), getattr(cpu_loaders, name), strict=True))
        assert len(pairs) == 3
        for (x, y), (ref, ref_y) in pairs:
            assert x.device.type == y.device.type == "cuda" and x.shape == ref.shape
            assert torch.equal(y.cpu(), ref_y)
            assert (x.cpu() - ref).abs().mean(dim=(1, 2, 3)).max() <= 4 / 255


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_speed_options_on_the_gpu_match_the_float32_step(amp, channels_last):
    """--amp and --channels-last on CUDA: a HYDRA step agrees with the float32 one within the autocast
    dtype's tolerance, the weights stay float32, and fp16's GradScaler state is in the trainer state."""
    from configs.options import SpeedOptions
    from engine.precision import SCALER_STATE

    x, y = data(16)
    states, trainers = {}, {}
    for name, speed in (("float32", SpeedOptions()), ("amp", SpeedOptions(amp=amp, channels_last=channels_last))):
        model = net().to(GPU)
        ms = MaskSet(model, k=0.2, granularity="unstructured", scope="global")
        ms.step(force=True)
        trainer = BaseTrainer(model=model, maskset=ms, mode="prune", device=GPU, weight_optim=sgd(0.05),
                              progress=False, speed=speed)
        if speed.amp == "fp16":  # a scale whose first step cannot overflow: this compares one step
            scaler = trainer.precision.scaler
            scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0})
        trainer.step((x, y))
        states[name] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        trainers[name] = trainer
    for key, value in states["float32"].items():
        assert states["amp"][key].dtype == value.dtype, key
        if value.is_floating_point():
            torch.testing.assert_close(states["amp"][key], value, rtol=5e-2, atol=5e-3, msg=key)
    assert (SCALER_STATE in trainers["amp"].state_dict()) == (amp == "fp16")
