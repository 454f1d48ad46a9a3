"""The operator and host-read counter (engine.dispatch_count) and the step budgets it measures: the same
count on every device, so CI (no GPU) sees what a GPU step would launch and wait for."""
import pytest
import torch

from configs.options import LthOptions, WoodFisherOptions
from engine.dispatch_count import HOST_READS, DispatchCount
from engine.optim import OptimSettings
from layers import MaskSet, to_masked
from layers.coupling import Coupling
from models import build_model
from tests.helpers.tiny import sgd, tiny_loaders, tiny_net
from trainers import TRAINERS
from trainers.base import BaseTrainer
from trainers.bilevel import BilevelTrainer

CPU = torch.device("cpu")


def test_the_counter_counts_operators_and_host_reads():
    x = torch.randn(4, 3)
    with DispatchCount() as count:
        y = torch.relu(x)
        y.sum().item()          # a scalar read: the host waits
        bool((y > 0).any())     # another
        torch.nonzero(y)        # a data-dependent size: a read too
    assert count.counts["relu"] == 1 and count.counts["sum"] == 1
    assert count.host_reads == 3 and count.reads() == {"_local_scalar_dense": 2, "nonzero": 1}
    assert count.operators == sum(count.counts.values())


def settings(lr):
    return OptimSettings(optimizer="sgd", lr=lr, momentum=0.9, wd=5e-4, schedule="constant", epochs=1)


def step_counts(*, sync_free: bool):
    """Operators and host reads of one dense, HYDRA and BiP step of the CIFAR ResNet-20 (after two warm-up
    steps), and its number of masked layers."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))

    def masked():
        model = build_model("resnet20s", num_classes=10)
        to_masked(model, granularity="unstructured")
        return model, MaskSet(model, k=0.05, granularity="unstructured", scope="global", sync_free=sync_free)

    dense = BaseTrainer(model=build_model("resnet20s", num_classes=10), maskset=None, mode="pretrain", device=CPU,
                        weight_optim=settings(0.01), progress=False)
    model, ms = masked()
    hydra = BaseTrainer(model=model, maskset=ms, mode="prune", device=CPU, weight_optim=settings(0.1), progress=False)
    model, ms2 = masked()
    bip = BilevelTrainer(model=model, maskset=ms2, mode="prune", device=CPU, weight_optim=settings(0.01),
                         score_optim=settings(0.1), progress=False)
    out = {}
    for name, step in (("dense", lambda: dense.step((x, y))), ("hydra", lambda: hydra.step((x, y))),
                       ("bip", lambda: bip.step(((x, y), (x, y))))):
        step()
        step()
        with DispatchCount() as count:
            step()
        out[name] = (count.operators, count.host_reads)
    return out, len(ms.layers)


@pytest.mark.parametrize("sync_free", [True, False])
def test_step_operator_budgets_of_the_masked_layers(sync_free):
    """The issue's budgets: HYDRA at most 3 operators more than the dense step per masked layer (it takes 2: the
    product w * m and the straight-through product of the backward; the selection, the multipliers and the signed
    weights are a constant number of operators for all layers), BiP at most twice the dense step plus 3 per masked
    layer. The sync-free selection reads nothing back; the CPU's host-bracketing kernel reads its counts."""
    counts, layers = step_counts(sync_free=sync_free)
    (dense, _), (hydra, hydra_reads), (bip, bip_reads) = counts["dense"], counts["hydra"], counts["bip"]
    assert hydra - dense <= 3 * layers
    assert bip <= 2 * dense + 3 * layers
    if sync_free:
        assert hydra_reads == 0 and bip_reads == 0
    else:
        assert 0 < hydra_reads <= 5 and 0 < bip_reads <= 5


class ReadsByStep(DispatchCount):
    """Host reads by the index of the training step they happen in or after (-1: before the first step)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.by_step: dict[int, list[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.by_step.setdefault(self.step, []).append(name)
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("name,granularity,scope", [
    ("base", "unstructured", "global"), ("base", "filter", "global"), ("bilevel", "unstructured", "global"),
    ("woodfisher", "unstructured", "global"), ("lth", "unstructured", "global"),
    ("base", "coupled", "global"), ("base", "coupled", "layer")])
def test_no_host_read_inside_a_step_outside_the_print_steps(name, granularity, scope):
    """20 steps of HYDRA (unstructured, filter and coupled filter masks), BiP, WoodFisher's weight steps and LTH
    with the sync-free selection (what a GPU runs): the steps that do not print read nothing back from the device;
    the print steps (every 7th, and the last) read the running sums and the NaN flags. Pruning events and rounds
    (before the first step) may read: they are not training steps."""
    coupling = None
    if granularity == "coupled":  # filter j of both convs one unit (as a residual addition would tie them)
        granularity = "filter"
        coupling = Coupling.of([[("0", j), ("3", j)] for j in range(4)], {"0": 4, "3": 4})
    model = tiny_net(granularity, seed=0)
    assert coupling is None or set(coupling.unit_of) == {n for n, m in model.named_modules() if hasattr(m, "mask")}
    ms = MaskSet(model, k=0.5, granularity=granularity, scope=scope, sync_free=True, coupling=coupling)
    options = {"woodfisher": WoodFisherOptions(prune_start=0, prune_freq=1, prune_end=0, init_sparsity=0.3,
                                               fisher_subsample_size=6, fisher_mini_bsz=2, fittable_params=16,
                                               fisher_damp=1e-4),
               "lth": LthOptions(imp_rate=0.3)}.get(name)
    trainer = TRAINERS[name](model=model, maskset=ms, mode="prune", device=CPU, weight_optim=sgd(0.1, momentum=0.9),
                             score_optim=sgd(0.2, momentum=0.9), progress=False, log=lambda line: None,
                             options=options, print_freq=7)
    loaders = tiny_loaders(40, batch_size=2)
    batches, total = trainer.batches(loaders)
    batches = list(batches)  # the data is read before counting: its labels' int() are host memory, not a device
    assert total == 20
    trainer.batches = lambda loaders: (iter(batches), total)
    count = ReadsByStep()
    step = trainer.step

    def counted_step(batch):
        count.step += 1
        return step(batch)

    trainer.step = counted_step
    trainer.set_epoch(0)
    with count:
        metrics = trainer.train_epoch(0, loaders)
    assert count.step == 19 and metrics["top1"] >= 0
    printing = {0, 7, 14, 19}
    assert {i: reads for i, reads in count.by_step.items() if i >= 0 and i not in printing} == {}
    assert all(i in count.by_step for i in printing)  # the print steps do read: the count is not blind
