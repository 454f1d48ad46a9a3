"""Several processes, one run: PyTorch's DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node=N train.py ...`` starts N copies of train.py with RANK, WORLD_SIZE and
LOCAL_RANK set; ``Dist.from_env`` joins them into one process group (``nccl`` on GPUs, ``gloo`` on
CPU). What each part of a run does with the group:

- ``--batch-size`` is the GLOBAL batch: every rank draws the same global order of samples
  (data.sampling) and takes its slice of each global batch (``RankBatches``), so the samples, their
  order and their augmentation do not depend on N. A slice's loss is scaled by
  ``n_local * N / n_global`` (``Dist.loss_scale``) so that DDP's average of the ranks' gradients is
  the gradient of the global batch's mean loss, also when the last batch does not split evenly.
- DDP (``wrap``) all-reduces the gradients of weights and scores in ``backward()``; the optimizers
  then take identical steps on every rank, so the scores, hence the masks, stay identical. A cheap
  checksum of the masks is compared every epoch (``check_masks``); a mismatch stops the run.
- BatchNorm: SyncBatchNorm where the backend supports it (CUDA), so the statistics are the global
  batch's; gloo on CPU has no SyncBatchNorm, so there each rank normalises with its own slice and
  the running statistics are averaged over the ranks before every evaluation (``average_buffers``).
- Evaluation: each rank evaluates a contiguous shard and the sums are reduced (``reduce_mean``).
- WoodFisher: each rank computes a contiguous block of the m Fisher gradient rows, the blocks are
  gathered (``gather_rows``) so every rank holds the same m global rows, and the OBS step's result
  is broadcast from rank 0 (``broadcast_state``) so that every rank continues from bit-identical
  weights whatever the numerical libraries do.
- Only rank 0 writes the run folder, logs and checkpoints.
A plain ``python train.py`` is a group of one (``SINGLE``): no process group, nothing reduced.
"""
from __future__ import annotations

import datetime
import os
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous
from torch.nn.parallel import DistributedDataParallel

from configs.errors import RunStopped, UserError
from data.sampling import shard
from engine.evaluate import Evaluation

if TYPE_CHECKING:  # annotations only
    from data.loaders import Batches, Loaders


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(*, cuda: bool, timeout_s: float) -> Dist:
        """The group torchrun describes in the environment (WORLD_SIZE > 1), joined; else ``SINGLE``."""
        rank, world = launched()
        if world <= 1:
            return SINGLE
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if cuda else "gloo"
        if not tdist.is_initialized():
            if cuda:
                torch.cuda.set_device(local_rank)
            _join_interruptibly(rank=rank, world=world, backend=backend, timeout_s=timeout_s)
        return Dist(rank=rank, world=world, local_rank=local_rank, backend=backend)

    # -- collectives (no-ops in a group of one) -------------------------------------------------
    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        tdist.all_reduce(t)
        return t.tolist()

    def reduce_mean(self, metrics: dict[str, float], count: int) -> dict[str, float]:
        """Means over each rank's ``count`` samples -> the means over all ranks' samples."""
        if not self.enabled:
            return metrics
        keys = sorted(metrics)
        sums = self.all_sum([metrics[key] * count for key in keys] + [float(count)])
        total = sums[-1]
        return {key: value / total if total else float("nan") for key, value in zip(keys, sums)}

    def loss_scale(self, n_local: int, device: torch.device) -> torch.Tensor | None:
        """``n_local * N / n_global`` for this rank's slice of a global batch (None in a group of one).
        A one-number all-reduce per step; it stays on the device (no host synchronisation)."""
        if not self.enabled:
            return None
        # torch.full is a kernel on a GPU; torch.tensor([...], device=cuda) would copy from the host and wait
        n = torch.full((1,), float(n_local), dtype=torch.float32, device=self._device())
        tdist.all_reduce(n)
        return (float(n_local) * self.world / n).to(device)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()

    # -- model state ------------------------------------------------------------------------------
    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm's running statistics) over the ranks. With
        SyncBatchNorm they are equal already; without it (gloo) each rank saw only its slices."""
        if not self.enabled:
            return
        with torch.no_grad():
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    tdist.all_reduce(buffer)
                    buffer.div_(self.world)

    def broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers (masks included) on every rank."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.dtype == torch.bool:  # gloo/nccl reduce numbers: send the mask as bytes
                    as_bytes = tensor.to(torch.uint8)
                    tdist.broadcast(as_bytes, src=0)
                    tensor.copy_(as_bytes.bool())
                else:
                    tdist.broadcast(tensor.data, src=0)

    def gather_rows(self, block: torch.Tensor, rows: int) -> torch.Tensor:
        """The (rows x D) matrix whose consecutive row blocks are the ranks' ``block``s (rank order).
        Gathered into one buffer (no per-rank copies): the rows plus at most world - 1 padding rows."""
        if not self.enabled:
            return block
        sizes = [stop - start for start, stop in (shard(rows, r, self.world) for r in range(self.world))]
        most = max(sizes)
        if block.shape[0] < most:  # shard() blocks differ by one row at most: pad the short ones
            block = torch.cat([block, block.new_zeros(most - block.shape[0], *block.shape[1:])])
        out = block.new_empty(most * self.world, *block.shape[1:])
        tdist.all_gather_into_tensor(out, block.contiguous())
        start = 0
        for r, size in enumerate(sizes):  # close the padding gaps, moving rows down (never overlapping forward)
            if start != r * most:
                for i in range(size):
                    out[start + i].copy_(out[r * most + i])
            start += size
        return out[:rows]

    def check_masks(self, masks: dict[str, torch.Tensor], *, epoch: int) -> None:
        """Stop the run if any rank's masks differ from rank 0's (per layer: count and a position checksum)."""
        if not self.enabled:
            return
        sums = torch.tensor([v for mask in masks.values() for v in mask_checksum(mask)], dtype=torch.float64,
                            device=self._device())
        parts = [torch.empty_like(sums) for _ in range(self.world)]
        tdist.all_gather(parts, sums)
        bad = [r for r, part in enumerate(parts) if not torch.equal(part, parts[0])]
        if bad:
            raise RunStopped(f"the masks of rank(s) {', '.join(map(str, bad))} differ from rank 0's after epoch "
                             f"{epoch}: the ranks no longer train one model (a non-deterministic selection or a "
                             "rank-local change); the last checkpoint is kept; resume with --resume auto")


SINGLE = Dist()


def mask_checksum(mask: torch.Tensor) -> tuple[float, float]:
    """(kept count, sum of the kept positions' indices modulo a prime), both exact in float64."""
    flat = mask.reshape(-1)
    positions = torch.nonzero(flat).reshape(-1) % 1_000_003
    return float(flat.sum()), float(positions.sum())


def wrap(model: nn.Module, *, group: Dist, device: torch.device, unused_parameters: bool) -> nn.Module:
    """The model a training step runs: DDP around ``model`` in a group of several, ``model`` itself in
    one. Buffers are not broadcast per forward pass (the masks are rank-identical by construction and
    checked each epoch; BatchNorm statistics: see ``average_buffers``)."""
    if not group.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, find_unused_parameters=unused_parameters)


def run_device(name: str, *, group: Dist) -> torch.device:
    """The device of this process for ``--device name`` (auto: cuda when available); under torchrun
    one GPU per process, as torchrun numbers them (LOCAL_RANK)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
            index = int(name.partition(":")[2] or 0)
            count = torch.cuda.device_count()
            if index >= count:
                raise UserError(f"--device {name}: there are {count} CUDA devices (cuda:0 to cuda:{count - 1}); "
                                "pass one of them")
        device = torch.device(name)  # the schema admits only auto, cpu, cuda and cuda:N
    if group.enabled and device.type == "cuda":
        return torch.device("cuda", group.local_rank)
    return device


def sync_batchnorm(model: nn.Module, *, group: Dist, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm where the backend supports it (CUDA)."""
    if group.enabled and device.type == "cuda":
        return cast(nn.Module, nn.SyncBatchNorm.convert_sync_batchnorm(model))
    return model


def _join(*, rank: int, world: int, backend: str, timeout_s: float) -> None:
    # torchrun's store outlives a restart (--max-restarts): keys of the failed attempt (its
    # processes' addresses) must not be read by the next one, so each attempt gets a prefix.
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    tdist.init_process_group(backend=backend, store=PrefixStore(f"train-attempt-{attempt}", store),
                             rank=rank, world_size=world, timeout=timeout)


def _join_interruptibly(*, rank: int, world: int, backend: str, timeout_s: float) -> None:
    """Join the group in a helper thread while the main thread waits for it in Python.

    Joining waits in C++ for every rank to arrive. A rank that failed before joining (bad input it
    alone sees: a missing config file on its node) never arrives; torchrun then sends SIGTERM, but a
    signal's Python handler runs only once the main thread is back in Python, so a main thread
    blocked in the join ignored it until torchrun's SIGKILL 30 s later, without its line. Waiting
    here in short Python-level joins lets SIGTERM stop the process at once. The thread is a daemon:
    a stopped process does not wait for a join that will never complete."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _join(rank=rank, world=world, backend=backend, timeout_s=timeout_s)
        except BaseException as exc:  # handed to the main thread, which raises it
            failure.append(exc)

    thread = threading.Thread(target=target, name="join-process-group", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if failure:
        raise failure[0]


PEER_FAILURE = ("gloo", "NCCL", "Connection reset", "Connection closed", "ProcessGroup")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process died or hangs (gloo and NCCL
    report it as a RuntimeError raised inside backward() or a collective)."""
    return isinstance(exc, tdist.DistError) or (isinstance(exc, RuntimeError)
                                                and any(word in str(exc) for word in PEER_FAILURE))


def launched() -> tuple[int, int]:
    """(rank, world size) that torchrun set in the environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launch(*, device_flag: str) -> None:
    """Refuse settings that contradict torchrun's (one device per rank, chosen by LOCAL_RANK)."""
    if launched()[1] > 1 and device_flag.startswith("cuda:"):
        raise UserError(f"--device {device_flag} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda "
                        "(or auto)")


def sharded_evaluation(evaluation: Evaluation, *, loaders: Loaders, group: Dist) -> Evaluation:
    """``evaluation`` with each rank evaluating its contiguous shard of the loader it is given (one of
    ``loaders``' val/test) and the means reduced over all samples; itself in a group of one."""
    if not group.enabled:
        return evaluation
    shards: dict[int, tuple[Batches, int]] = {}

    def run(model: nn.Module, loader: Batches, *, device: torch.device) -> dict[str, float]:
        if id(loader) not in shards:
            shards[id(loader)] = loaders.shard(loader)
        part, n = shards[id(loader)]
        return group.reduce_mean(evaluation(model, part, device=device), n)
    return replace(evaluation, run=run)
