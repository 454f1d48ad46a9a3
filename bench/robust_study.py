"""Robust pruning on Digits, 3 seeds: natural and PGD-20 test accuracy of dense adversarial pretraining,
HYDRA-robust prune + finetune, BiP-robust and the magnitude baseline, at k = 0.1 and 0.01.

    python bench/robust_study.py [--out results/robust_study] [--seeds 1 2 3] [--ks 0.1 0.01]

Every run uses the shipped configs/Digits/robust_*.yml (TRADES, linf eps 0.125 = 2/16, 10 steps of eps/4,
PGD-20 evaluation with a random start; unnormalised inputs) and their epochs; one seed per repetition of the
whole pipeline (pretraining included). The figures are the final models' (checkpoint.pth.tar) test accuracies
from each run's summary.json. Runs already finished under --out are reused, so an interrupted study continues.
Prints a Markdown table (mean ± std over the seeds).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import train  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run(out: str, seed: int, name: str, config: str, *extra: str) -> dict:
    """One train.py run (in this process, its console output into OUT/seedS/NAME.log); its summary."""
    folder = os.path.join(out, f"seed{seed}")
    found = glob.glob(os.path.join(folder, name, "*", "*", "summary.json"))
    if not found:
        os.makedirs(folder, exist_ok=True)
        args = ["--configs", os.path.join(ROOT, "configs", "Digits", f"{config}.yml"), "--seed", str(seed),
                "--result-dir", folder, "--exp-name", name, "--no-progress", *extra]
        t0 = time.perf_counter()
        with open(os.path.join(folder, f"{name}.log"), "w") as log, contextlib.redirect_stdout(log):
            code = train.main(args)
        if code != 0:
            raise SystemExit(f"train.py {' '.join(args)} exited with {code}; see {folder}/{name}.log")
        found = glob.glob(os.path.join(folder, name, "*", "*", "summary.json"))
        print(f"  seed {seed} {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    summary = json.load(open(found[0]))
    return summary


def checkpoint(summary: dict, which: str = "checkpoint.pth.tar") -> str:
    return os.path.join(summary["run_dir"], "checkpoint", which)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "robust_study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ks", type=float, nargs="+", default=[0.1, 0.01])
    args = parser.parse_args()
    rows: dict[tuple[str, float], list[dict]] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        dense = run(args.out, seed, "dense", "robust_pretrain")
        rows.setdefault(("dense adversarial pretraining (TRADES)", 1.0), []).append(dense)
        for k in args.ks:
            kk = ["--k", str(k)]
            hydra = run(args.out, seed, f"hydra_prune_k{k}", "robust_hydra", *kk, "--source-net", checkpoint(dense))
            rows.setdefault(("HYDRA-robust prune (scores only)", k), []).append(hydra)
            fine = run(args.out, seed, f"hydra_finetune_k{k}", "robust_finetune", *kk,
                       "--source-net", checkpoint(hydra))
            rows.setdefault(("HYDRA-robust prune + finetune", k), []).append(fine)
            bip = run(args.out, seed, f"bip_k{k}", "robust_bip", *kk, "--source-net", checkpoint(dense))
            rows.setdefault(("BiP-robust (both levels on TRADES)", k), []).append(bip)
            mag = run(args.out, seed, f"magnitude_k{k}", "robust_magnitude", *kk, "--source-net", checkpoint(dense))
            rows.setdefault(("magnitude (per layer) + finetune", k), []).append(mag)

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    print(f"\n{len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), {time.perf_counter() - t0:.0f} s in this "
          "invocation; test top-1 in percent, mean ± std\n")
    print("| method | k | sparsity | natural | PGD-20 (eps 0.125) | epochs |")
    print("|---|---|---|---|---|---|")
    for (method, k), summaries in rows.items():
        sparsity = statistics.mean(s["sparsity"] for s in summaries)
        print(f"| {method} | {k:g} | {100 * sparsity:.1f} % | {cell([s['test_top1'] for s in summaries])} | "
              f"{cell([s['test_adv_top1'] for s in summaries])} | {summaries[0]['epochs']} |")


if __name__ == "__main__":
    main()
