"""Benchmark: our batched exact Fisher inverse vs the public code's sequential rank-1 Woodbury updates.

    .venv/bin/python bench/bench_fisher.py [--threads 1] [--repeats 3] [--device auto|cpu|cuda]
                                           [--skip-whole-layer] [--json out.json]

What is measured (all in one process, so machine load hits both sides alike):

1. ResNet-20 (CIFAR; the 18 3x3 convs after the stem, 267,264 weights, the set WoodFisher prunes),
   blocks of 1000 weights inside each layer (the last block of a layer shorter), lambda = 1e-5,
   m = 256 and m = 64 random gradients. Work per side: diag(F^-1) and one F^-1 v for every block.
   The sequential baseline is slow, so both sides are timed on the same subset of layers (the first
   conv of each stage: 27 blocks, the three short tail blocks included) and the ratio is taken
   there: same blocks, same outputs, a fair per-block comparison. Ours is also timed on the whole
   network; the sequential whole-network time is extrapolated from the subset by its O(m c^2) cost.
   Timing = median of ``--repeats`` runs.
2. Accuracy: max relative error of diag(F^-1) against an explicit float64 inverse of every block
   of the subset, for ours and for the sequential float32 updates, on random gradients and on real
   per-mini-batch gradients of a small CNN trained on sklearn's digits (all of its blocks).
3. Peak extra memory (bytes, analytic: the buffers each method allocates, not counting G):
   ours as reported by ``EmpiricalFisherInverse.peak_memory_bytes``; sequential = its c x c
   inverses kept as the public code keeps them, plus one c x c outer product being built.
4. Whole-layer blocks on a ResNet-18-sized layer (512 x 512 x 3 x 3 = 2,359,296 weights, one
   block), m = 64 and 128 (and 256 on CUDA): time and memory; the sequential method would need a
   22 TB float32 matrix. Accuracy there is the residual ||F (F^-1 v) - v|| / ||v||.
5. The same on CUDA when ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.woodbury_sequential import SequentialWoodburyInverse, sequential_peak_bytes, split_bounds  # noqa: E402
from pruning.fisher_inverse import EmpiricalFisherInverse  # noqa: E402

DAMP = 1e-5
BLOCK = 1000
MiB = 2**20


# ------------------------------------------------------------------------------------------------
# shapes


def resnet20_conv_sizes() -> list[int]:
    """Weights of the 18 3x3 convs of CIFAR ResNet-20 after the stem (16/32/64 channels)."""
    sizes = []
    in_ch = 16
    for ch in (16, 32, 64):
        for _ in range(3):  # 3 basic blocks per stage, 2 convs each
            sizes.append(ch * in_ch * 9)
            sizes.append(ch * ch * 9)
            in_ch = ch
    try:  # cross-check against the project's model when it is importable
        from models import build_model

        model = build_model("resnet20s", num_classes=10)
        convs = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1:]
        if convs != sizes:
            raise RuntimeError(f"models.resnet20s convs {convs} differ from the built-in list {sizes}")
    except ImportError:
        pass
    assert sum(sizes) == 267_264, sum(sizes)
    return sizes


SUBSET_LAYERS = (0, 6, 12)  # first conv of each stage: 2304, 4608, 18432 weights -> 3 + 5 + 19 blocks


# ------------------------------------------------------------------------------------------------
# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], *, repeats: int,
                 device: torch.device) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time of each function, the repeats interleaved (a, b, a, b, ...) so that a
    change in machine load during the run hits every side alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def random_gradients(m: int, d: int, *, device: torch.device, seed: int) -> torch.Tensor:
    """i.i.d. N(0, 0.01^2) entries, float32 (the scale of mini-batch gradients of a trained net)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(m, d, generator=gen) * 1e-2).to(device)


def ours_layerwise(G: torch.Tensor, layer_sizes: list[int], *, layers: list[int]) -> dict:
    """diag(F^-1) and one F^-1 v for every block of the given layers; memory as the trainer sees it."""
    offsets = [0]
    for n in layer_sizes:
        offsets.append(offsets[-1] + n)
    diags, kept, transient, layer_peak = [], 0, 0, 0
    for i in layers:
        a, b = offsets[i], offsets[i + 1]
        inv = EmpiricalFisherInverse(G[:, a:b], block_size=BLOCK, damp=DAMP)
        diags.append(inv.diag())
        inv.mul(torch.ones(b - a, device=G.device, dtype=G.dtype))
        kept += inv.kept_memory_bytes()
        transient = max(transient, inv.peak_memory_bytes() - inv.kept_memory_bytes())
        layer_peak = max(layer_peak, inv.peak_memory_bytes())
    # all layers' inverses alive at once (global selection, then the update) / one layer at a time
    return {"diag": torch.cat(diags), "peak_all_kept": kept + transient, "peak_one_layer": layer_peak}


def seq_layer_peak(layer_sizes: list[int]) -> int:
    """Sequential, one layer at a time: the public code keeps a layer's list of block inverses."""
    return max(sequential_peak_bytes([b - a for a, b in split_bounds([n], BLOCK)], keep_all=True)
               for n in layer_sizes)


def sequential(G: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    seq = SequentialWoodburyInverse(G, bounds=bounds, damp=DAMP)
    diag = seq.diag()
    seq.mul(torch.ones(diag.numel(), device=G.device, dtype=G.dtype))
    return diag


def reference_diag(G: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Explicit float64 inverse of every block (Cholesky inverse of the formed F)."""
    out = []
    for a, b in bounds:
        Gb = G[:, a:b].double()
        F = Gb.T @ Gb / G.shape[0]
        F.diagonal().add_(DAMP)
        out.append(torch.cholesky_inverse(torch.linalg.cholesky(F)).diagonal())
    return torch.cat(out)


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs() / ref.abs()).max().item()


def subset_bounds(layer_sizes: list[int], layers: tuple[int, ...]) -> list[tuple[int, int]]:
    all_bounds = split_bounds(layer_sizes, BLOCK)
    offsets = [0]
    for n in layer_sizes:
        offsets.append(offsets[-1] + n)
    return [(a, b) for a, b in all_bounds if any(offsets[i] <= a < offsets[i + 1] for i in layers)]


# ------------------------------------------------------------------------------------------------
# 1-3: ResNet-20, random gradients


def bench_resnet20(m: int, *, device: torch.device, repeats: int) -> dict:
    sizes = resnet20_conv_sizes()
    G = random_gradients(m, sum(sizes), device=device, seed=m)
    bounds_all = split_bounds(sizes, BLOCK)
    bounds_sub = subset_bounds(sizes, SUBSET_LAYERS)
    widths_all = [b - a for a, b in bounds_all]
    widths_sub = [b - a for a, b in bounds_sub]

    t, out = median_times({
        "ours_sub": lambda: ours_layerwise(G, sizes, layers=list(SUBSET_LAYERS)),
        "seq_sub": lambda: sequential(G, bounds_sub),
        "ours_all": lambda: ours_layerwise(G, sizes, layers=list(range(len(sizes)))),
    }, repeats=repeats, device=device)
    t_ours_sub, t_seq_sub, t_ours_all = t["ours_sub"], t["seq_sub"], t["ours_all"]
    ours_sub, seq_diag, ours_all = out["ours_sub"], out["seq_sub"], out["ours_all"]
    # sequential cost is m * c^2 per block: extrapolate the subset to the whole network
    t_seq_all = t_seq_sub * sum(c * c for c in widths_all) / sum(c * c for c in widths_sub)

    ref = reference_diag(G, bounds_sub)
    return {
        "case": f"ResNet-20 random m={m}",
        "m": m,
        "blocks_subset": len(bounds_sub),
        "blocks_all": len(bounds_all),
        "t_ours_subset": t_ours_sub,
        "t_seq_subset": t_seq_sub,
        "speedup_subset": t_seq_sub / t_ours_sub,
        "t_ours_all": t_ours_all,
        "t_seq_all_extrapolated": t_seq_all,
        "err_ours": max_rel_err(ours_sub["diag"], ref),
        "err_seq": max_rel_err(seq_diag, ref),
        "mem_ours_all_kept": ours_all["peak_all_kept"],
        "mem_seq_all_kept": sequential_peak_bytes(widths_all, keep_all=True),
        "mem_ours_one_layer": ours_all["peak_one_layer"],
        "mem_seq_one_layer": seq_layer_peak(sizes),
    }


# ------------------------------------------------------------------------------------------------
# real gradients: a small CNN trained on sklearn's digits


class DigitsCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def digits_gradients(m_values: tuple[int, ...], *, mini_batch: int = 16, epochs: int = 15) -> tuple[dict, list[int], float]:
    """Train the CNN, then m per-mini-batch mean gradients of its weights (no biases)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    X = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    weights = [model.conv1.weight, model.conv2.weight, model.fc.weight]
    sizes = [w.numel() for w in weights]
    out = {}
    for m in m_values:
        rows = []
        for _ in range(m):
            idx = torch.randint(len(X), (mini_batch,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)]))
        out[m] = torch.stack(rows)
    return out, sizes, acc


def bench_digits(*, repeats: int, device: torch.device) -> list[dict]:
    results = []
    # 1 epoch: mid-training gradients (what gradual pruning sees); 15 epochs: converged, tiny gradients
    for epochs in (1, 15):
        results += _bench_digits(epochs=epochs, repeats=repeats, device=device)
    return results


def _bench_digits(*, epochs: int, repeats: int, device: torch.device) -> list[dict]:
    grads, sizes, acc = digits_gradients((256, 64), epochs=epochs)
    results = []
    for m, G in grads.items():
        G = G.to(device)
        bounds = split_bounds(sizes, BLOCK)
        t, out = median_times({
            "ours": lambda: ours_layerwise(G, sizes, layers=list(range(len(sizes)))),
            "seq": lambda: sequential(G, bounds),
        }, repeats=repeats, device=device)
        t_ours, t_seq, ours, seq_diag = t["ours"], t["seq"], out["ours"], out["seq"]
        ref = reference_diag(G, bounds)
        results.append({
            "case": f"digits CNN real, {epochs} ep, m={m}",
            "m": m,
            "train_acc": acc,
            "blocks_all": len(bounds),
            "t_ours_all": t_ours,
            "t_seq_all": t_seq,
            "speedup_all": t_seq / t_ours,
            "err_ours": max_rel_err(ours["diag"], ref),
            "err_seq": max_rel_err(seq_diag, ref),
            "mem_ours_all_kept": ours["peak_all_kept"],
            "mem_seq_all_kept": sequential_peak_bytes([b - a for a, b in bounds], keep_all=True),
            "mem_ours_one_layer": ours["peak_one_layer"],
            "mem_seq_one_layer": seq_layer_peak(sizes),
        })
    return results


# ------------------------------------------------------------------------------------------------
# 4: a whole ResNet-18 layer as one block


def bench_whole_layer(m: int, *, device: torch.device) -> dict:
    d = 512 * 512 * 3 * 3
    G = random_gradients(m, d, device=device, seed=1000 + m)
    # float64 v: F^-1 v comes back in v's dtype, so the residual measures the solver itself
    # (a float32 result is rounded to ~1e-7 relative, amplified by cond(F) in the residual)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync(device)
    t0 = time.perf_counter()
    inv = EmpiricalFisherInverse(G, block_size=None, damp=DAMP)
    inv.diag()
    u = inv.mul(v)
    sync(device)
    elapsed = time.perf_counter() - t0
    measured = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    # residual of F u = v with F u = lambda u + G^T (G u) / m, in float64, chunked over rows of G
    Fu = DAMP * u
    for r0 in range(0, m, 16):
        Gr = G[r0:r0 + 16].double()
        Fu += Gr.T @ (Gr @ u) / m
    residual = ((Fu - v).norm() / v.norm()).item()
    return {
        "case": f"ResNet-18 layer 2.36M, whole-layer block, m={m}",
        "m": m,
        "t_ours": elapsed,
        "residual": residual,
        "mem_ours": inv.peak_memory_bytes(),
        "mem_ours_measured_cuda": measured,
        "mem_seq": sequential_peak_bytes([d], keep_all=True),
    }


# ------------------------------------------------------------------------------------------------
# report


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def print_tables(device: torch.device, r20: list[dict], digits: list[dict], whole: list[dict]) -> None:
    print(f"\n## device: {device}  (threads: {torch.get_num_threads()}, lambda = {DAMP}, blocks of {BLOCK})\n")
    print("| case | blocks timed | ours (s) | sequential (s) | speed-up | ours whole net (s) | "
          "seq whole net (s, extrap.) | max rel err diag ours | seq | peak mem all layers kept: ours | seq "
          "| one layer at a time: ours | seq |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in r20:
        print(f"| {r['case']} | {r['blocks_subset']} of {r['blocks_all']} | {r['t_ours_subset']:.3f} | "
              f"{r['t_seq_subset']:.3f} | {r['speedup_subset']:.1f}x | {r['t_ours_all']:.3f} | "
              f"{r['t_seq_all_extrapolated']:.1f} | {r['err_ours']:.1e} | {r['err_seq']:.1e} | "
              f"{fmt_bytes(r['mem_ours_all_kept'])} | {fmt_bytes(r['mem_seq_all_kept'])} | "
              f"{fmt_bytes(r['mem_ours_one_layer'])} | {fmt_bytes(r['mem_seq_one_layer'])} |")
    for r in digits:
        print(f"| {r['case']} (train acc {r['train_acc']:.3f}) | {r['blocks_all']} of {r['blocks_all']} | "
              f"{r['t_ours_all']:.3f} | {r['t_seq_all']:.3f} | {r['speedup_all']:.1f}x | - | - | "
              f"{r['err_ours']:.1e} | {r['err_seq']:.1e} | {fmt_bytes(r['mem_ours_all_kept'])} | "
              f"{fmt_bytes(r['mem_seq_all_kept'])} | {fmt_bytes(r['mem_ours_one_layer'])} | "
              f"{fmt_bytes(r['mem_seq_one_layer'])} |")
    if whole:
        print("\n| whole-layer case | ours (s) | residual ||F u - v||/||v|| | peak mem ours (analytic) | "
              "measured (CUDA) | sequential would need |")
        print("|---|---|---|---|---|---|")
        for r in whole:
            print(f"| {r['case']} | {r['t_ours']:.2f} | {r['residual']:.1e} | {fmt_bytes(r['mem_ours'])} | "
                  f"{fmt_bytes(r['mem_ours_measured_cuda'])} | {fmt_bytes(r['mem_seq'])} |")


def run(device: torch.device, *, repeats: int, whole_layer: bool) -> dict:
    r20 = [bench_resnet20(m, device=device, repeats=repeats) for m in (256, 64)]
    digits = bench_digits(repeats=repeats, device=device)
    ms = (64, 128) if device.type == "cpu" else (64, 128, 256)
    whole = [bench_whole_layer(m, device=device) for m in ms] if whole_layer else []
    print_tables(device, r20, digits, whole)
    return {"device": str(device), "resnet20": r20, "digits": digits, "whole_layer": whole}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both sides (default: torch's, one per core; pass 1 on a "
                         "machine shared with other jobs, where multi-threaded LAPACK stalls on busy cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU, then CUDA too when available")
    ap.add_argument("--skip-whole-layer", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    t0 = time.perf_counter()
    results = [run(dev, repeats=args.repeats, whole_layer=not args.skip_whole_layer) for dev in devices]
    print(f"\ntotal benchmark time: {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
