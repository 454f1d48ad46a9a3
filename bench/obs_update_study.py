"""Does ``--obs-update`` help HYDRA and BiP? Test top-1 after pruning and after a short fine-tune,
without and with the OBS compensation of the weights the learned mask removes, on Digits (or MNIST5k).

    python bench/obs_update_study.py [--result-dir results/obs_update_study] [--methods hydra bip]
                                     [--ks 0.05 0.02] [--seeds 1 2 3] [--pretrained CKPT] [--dataset Digits]
                                     [--solvers fisher fisher-steps4 layerwise] [--finetune-epochs N] [--oneshot]

With ``--solvers`` the prune run has no compensation; each solver compensates at the start of its own
fine-tune of the prune run's last checkpoint (``--obs-update`` in finetune mode, the solver's flags below),
next to one fine-tune without: a table row per method, k and solver, with the top-1 just before and just
after the compensation, the scales the line search kept and the top-1 after fine-tuning.

With ``--oneshot`` (and no ``--methods``): one-shot pruning of the dense model at each k and seed, the
configs/DATASET/woodfisher.yml run with ``--one-shot --prune-start 0 --prune-end 0`` (one event, no training),
(a) by WoodFisher (its own OBS update at the event) and (b) by global magnitude (no update), each then
fine-tuned; the magnitude run also once with ``--obs-update --obs-update-solver layerwise`` at the start
of its fine-tune (from a copy of its checkpoint that holds the dense weights the mask removes, which the
one-shot run zeroes): a table row per criterion and compensation, as with ``--solvers``.

Procedure (every run is ``train.py`` in a subprocess, with this interpreter):
1. pretrain once (configs/DATASET/pretrain.yml) unless ``--pretrained`` names a dense checkpoint;
   the source of every prune run is its ``checkpoint/model_best.pth.tar``;
2. for each method, k and seed: prune with configs/DATASET/{method}.yml and ``--obs-update``
   (Fisher from ``--fisher-subsample-size`` x ``--fisher-mini-bsz`` samples, blocks of
   ``--fittable-params``); summary.json's ``obs_update.prune_end`` gives the test top-1 of the last
   epoch's masked model without the update (``test_top1_before``), with it (``test_top1_after``) and
   the update scale the line search kept;
3. fine-tune (configs/DATASET/finetune.yml, same k, seed and scope) twice: (a) without the update,
   from the prune run's ``checkpoint/checkpoint.pth.tar`` (the last epoch: the model that was
   compensated, not ``model_best``, which may be another epoch); (b) with it, from
   ``checkpoint/model_obs.pth.tar``. Each fine-tune's final test top-1 comes from its summary.json.

Prints a Markdown table (mean +- sample std over seeds, per-seed scales) and the raw rows as JSON.
Run folders are taken from the ``run folder: PATH`` line each run prints.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FOLDER = re.compile(r"run folder: (.+)$", re.M)
SOURCE_TOP1 = re.compile(r"source network before the first epoch: val top1 ([0-9.]+)")


def train(args: list[str], *, log_dir: str, tag: str) -> tuple[str, dict, str]:
    """Run train.py with ``args``; return (run folder, summary.json, console output). Stops on failure."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, "--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, f"{tag}.log"), "w", encoding="utf-8") as fh:
        fh.write(" ".join(cmd) + "\n\n" + out)
    if proc.returncode != 0:
        sys.exit(f"{tag} failed (exit {proc.returncode}):\n  {' '.join(cmd)}\n" + out[-4000:])
    found = RUN_FOLDER.findall(out)
    if not found:
        sys.exit(f"{tag}: no 'run folder:' line in its output:\n" + out[-4000:])
    run_dir = os.path.join(ROOT, found[-1].strip())  # absolute paths stay as they are
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    print(f"  {tag}: {time.monotonic() - t0:.0f}s, test top1 {summary['test_top1']:.2f}  ({run_dir})", flush=True)
    return run_dir, summary, out


def source_top1(out: str) -> float | None:
    match = SOURCE_TOP1.search(out)
    return float(match.group(1)) if match else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| method | k | prune top-1 without | prune top-1 with | scales (per seed) "
             "| fine-tune top-1 without | fine-tune top-1 with |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["k"]), []).append(row)
    for (method, k), group in groups.items():
        def col(key: str) -> str:
            return mean_std([r[key] for r in group])
        scales = ", ".join(f"{r['scale']:g}" for r in group)
        lines.append(f"| {method} | {k:g} | {col('prune_top1_without')} | {col('prune_top1_with')} | {scales} "
                     f"| {col('finetune_top1_without')} | {col('finetune_top1_with')} |")
    return "\n".join(lines)


# --solvers: the flags of each compensation (engine.obs_update)
SOLVERS = {"fisher": [], "fisher-steps4": ["--obs-update-steps", "4"], "layerwise": ["--obs-update-solver", "layerwise"]}


def solver_table(rows: list[dict]) -> str:
    lines = ["| method | k | compensation | top-1 before | top-1 after compensating | scales (per seed) "
             "| after fine-tuning |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["k"], row["solver"]), []).append(row)
    for (method, k, solver), group in groups.items():
        def col(key: str) -> str:
            return mean_std([r[key] for r in group if r[key] is not None])
        scales = ", ".join(f"{r['scale']:g}" for r in group) if solver != "none" else "-"
        lines.append(f"| {method} | {k:g} | {solver} | {col('top1_before')} | {col('top1_after')} | {scales} "
                     f"| {col('finetune_top1')} |")
    return "\n".join(lines)


def config(common: list[str], name: str) -> str:
    """configs/DATASET/NAME.yml of the study's dataset (``common`` carries ``--dataset DATASET``)."""
    return f"configs/{common[common.index('--dataset') + 1]}/{name}.yml"


def finetune_rows(*, tag: str, k: float, seed: int, source: str, prune: dict, common: list[str], extras: dict,
                  epochs: int | None, log_dir: str, row: dict) -> list[dict]:
    """One fine-tune of ``source`` per entry of ``extras`` (name -> compensation flags): a row each."""
    finetune = ["--configs", config(common, "finetune"), *common, "--k", str(k), "--seed", str(seed),
                "--scope", prune["scope"], "--source-net", source, *(["--epochs", str(epochs)] if epochs else [])]
    rows = []
    for solver, extra in extras.items():
        _, done, _ = train([*finetune, "--exp-name", f"{tag}_ft_{solver}", *extra], log_dir=log_dir,
                           tag=f"{tag}_ft_{solver}")
        obs = (done.get("obs_update") or {}).get("finetune_start", {})
        rows.append({**row, "k": k, "seed": seed, "solver": solver,
                     "top1_before": obs.get("test_top1_before"), "top1_after": obs.get("test_top1_after"),
                     "scale": obs.get("scale"), "line_search_losses": obs.get("line_search_losses"),
                     "finetune_top1": done["test_top1"]})
    return rows


def with_dense_weights(checkpoint: str, dense: str) -> str:
    """A copy of the one-shot ``checkpoint`` whose masked layers hold the ``dense`` model's weights again (masks
    unchanged): the one-shot run zeroes what it prunes, and a compensation needs the removed weights' values."""
    import torch  # the study itself only runs train.py; this step edits one checkpoint

    pruned = torch.load(checkpoint, map_location="cpu", weights_only=True)
    source = torch.load(dense, map_location="cpu", weights_only=True)["state_dict"]
    state = pruned["state_dict"]
    for key in [k for k in state if k.endswith(".mask")]:
        weight = key[: -len("mask")] + "weight"
        state[weight] = source[weight].clone()
    out = os.path.join(os.path.dirname(checkpoint), "checkpoint_dense_weights.pth.tar")
    torch.save(pruned, out)
    return out


def oneshot_rows(args: argparse.Namespace, *, pretrained: str, common: list[str], fisher: list[str],
                 log_dir: str) -> list[dict]:
    """--oneshot: WoodFisher one-shot against global magnitude one-shot, with and without layer-wise OBS."""
    rows = []
    args.methods = ["woodfisher", "globalmagnitude"]
    for method, k, seed, tag in cases(args):
        prune_dir, prune, _ = train(
            ["--configs", config(common, "woodfisher"), *common, "--exp-name", f"{tag}_prune", "--k", str(k),
             "--seed", str(seed), "--source-net", pretrained, "--prune-method", method, "--one-shot",
             "--prune-start", "0", "--prune-end", "0", "--epochs", "1"], log_dir=log_dir, tag=f"{tag}_prune")
        source = os.path.join(prune_dir, "checkpoint", "checkpoint.pth.tar")
        done = finetune_rows(tag=tag, k=k, seed=seed, prune=prune, common=common, extras={"none": []},
                             epochs=args.finetune_epochs, log_dir=log_dir, source=source,
                             row={"method": method, "prune_run": prune_dir})
        if method == "globalmagnitude":  # the same mask, compensated from the dense weights it removed
            done += finetune_rows(tag=tag, k=k, seed=seed, prune=prune, common=common, log_dir=log_dir,
                                  extras={"layerwise": ["--obs-update", *fisher, *SOLVERS["layerwise"]]},
                                  epochs=args.finetune_epochs, source=with_dense_weights(source, pretrained),
                                  row={"method": method, "prune_run": prune_dir})
        for row in done:  # "before" is the one-shot model (WoodFisher's with its own update at the event)
            row["top1_before"] = prune["test_top1"] if row["top1_before"] is None else row["top1_before"]
        rows += done
    return rows


def cases(args: argparse.Namespace) -> Iterator[tuple[str, float, int, str]]:
    """(method, k, seed, tag) of every prune run, announced as it starts."""
    for method in args.methods:
        for k in args.ks:
            for seed in args.seeds:
                tag = f"{method}_k{k:g}_s{seed}"
                print(tag, flush=True)
                yield method, k, seed, tag


def prune_run(method: str, k: float, seed: int, tag: str, *, pretrained: str, common: list[str], log_dir: str,
              extra: Sequence[str] = ()) -> tuple[str, dict, str]:
    return train(["--configs", config(common, method), *common, "--exp-name", f"{tag}_prune", "--k", str(k),
                  "--seed", str(seed), "--source-net", pretrained, *extra], log_dir=log_dir, tag=f"{tag}_prune")


def solver_rows(args: argparse.Namespace, *, pretrained: str, common: list[str], fisher: list[str],
                log_dir: str) -> list[dict]:
    """--solvers: per method, k and seed, one prune run, then a fine-tune without and one per solver."""
    rows = []
    for method, k, seed, tag in cases(args):
        prune_dir, prune, _ = prune_run(method, k, seed, tag, pretrained=pretrained, common=common,
                                        log_dir=log_dir)
        extras = {"none": [], **{solver: ["--obs-update", *fisher, *SOLVERS[solver]] for solver in args.solvers}}
        rows += finetune_rows(tag=tag, k=k, seed=seed, prune=prune, common=common, extras=extras,
                              epochs=args.finetune_epochs, log_dir=log_dir,
                              source=os.path.join(prune_dir, "checkpoint", "checkpoint.pth.tar"),
                              row={"method": method, "prune_run": prune_dir})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result-dir", default=os.path.join("results", "obs_update_study"),
                        help="root of the run folders (and of logs/, one console log per run)")
    parser.add_argument("--dataset", default="Digits", choices=["Digits", "MNIST5k"],
                        help="the configs/DATASET/*.yml of every run")
    parser.add_argument("--methods", nargs="+", default=["hydra", "bip"], help="configs/DATASET/{method}.yml")
    parser.add_argument("--ks", nargs="+", type=float, default=[0.05, 0.02], help="densities")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--pretrained", default=None, help="dense checkpoint to prune (skips pretraining)")
    parser.add_argument("--fisher-subsample-size", type=int, default=64)
    parser.add_argument("--fisher-mini-bsz", type=int, default=8)
    parser.add_argument("--fittable-params", type=int, default=512)
    parser.add_argument("--json-out", default=None, help="also write the raw rows to this file")
    parser.add_argument("--solvers", nargs="+", default=None, choices=sorted(SOLVERS),
                        help="compensate at the start of fine-tuning with each of these (see the module docstring)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="epochs of each fine-tune (default: config)")
    parser.add_argument("--oneshot", action="store_true",
                        help="WoodFisher one-shot against global magnitude one-shot + layer-wise OBS (docstring)")
    args = parser.parse_args()

    started = time.monotonic()
    out_dir = os.path.abspath(args.result_dir)
    log_dir = os.path.join(out_dir, "logs")
    common = ["--result-dir", out_dir, "--dataset", args.dataset]  # config() reads the dataset here
    fisher = ["--fisher-subsample-size", str(args.fisher_subsample_size), "--fisher-mini-bsz",
              str(args.fisher_mini_bsz), "--fittable-params", str(args.fittable_params)]

    pretrained = os.path.abspath(args.pretrained) if args.pretrained else None
    pre_top1 = None
    if pretrained is None:
        print("pretrain", flush=True)
        pre_dir, pre_summary, _ = train(["--configs", config(common, "pretrain"), *common, "--exp-name", "pre"],
                                        log_dir=log_dir, tag="pretrain")
        pretrained = os.path.join(pre_dir, "checkpoint", "model_best.pth.tar")
        pre_top1 = pre_summary["test_top1"]

    if args.solvers or args.oneshot:
        collect = oneshot_rows if args.oneshot else solver_rows
        rows = collect(args, pretrained=pretrained, common=common, fisher=fisher, log_dir=log_dir)
        print(f"\npretrained: {pretrained}; Fisher: m {args.fisher_subsample_size} x {args.fisher_mini_bsz} samples, "
              f"blocks of {args.fittable_params}; wall time {time.monotonic() - started:.0f}s\n")
        print(solver_table(rows))
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump({"rows": rows, "pretrained": pretrained}, fh, indent=1)
        return
    rows = []
    for method, k, seed, tag in cases(args):
        prune_dir, prune, _ = prune_run(method, k, seed, tag, pretrained=pretrained, common=common,
                                        log_dir=log_dir, extra=["--obs-update", *fisher])
        obs = prune["obs_update"]["prune_end"]
        finetune = ["--configs", config(common, "finetune"), *common, "--k", str(k), "--seed", str(seed),
                    "--scope", prune["scope"]]
        _, without, out_without = train(
            [*finetune, "--exp-name", f"{tag}_ft_without",
             "--source-net", os.path.join(prune_dir, "checkpoint", "checkpoint.pth.tar")],
            log_dir=log_dir, tag=f"{tag}_ft_without")
        _, with_, out_with = train(
            [*finetune, "--exp-name", f"{tag}_ft_with", "--source-net", obs["checkpoint"]],
            log_dir=log_dir, tag=f"{tag}_ft_with")
        rows.append({
            "method": method, "k": k, "seed": seed,
            "prune_top1_without": obs["test_top1_before"], "prune_top1_with": obs["test_top1_after"],
            "scale": obs["scale"], "line_search_losses": obs["line_search_losses"],
            "removed": obs["removed"], "obs_seconds": obs["seconds"],
            "prune_best_val_top1": prune["best_val_top1"], "prune_sparsity": prune["sparsity"],
            "finetune_top1_without": without["test_top1"], "finetune_top1_with": with_["test_top1"],
            # each fine-tune's source as it logged it (val top-1, not test): a check of the two sources
            "finetune_start_val_top1_without": source_top1(out_without),
            "finetune_start_val_top1_with": source_top1(out_with),
            "prune_run": prune_dir, "prune_wall_s": prune["wall_seconds"],
            "finetune_wall_s": [without["wall_seconds"], with_["wall_seconds"]],
        })

    wall = time.monotonic() - started
    print()
    if pre_top1 is not None:
        print(f"pretrained: test top-1 {pre_top1:.2f} ({pretrained})")
    else:
        print(f"pretrained: {pretrained}")
    print(f"Fisher: m {args.fisher_subsample_size} x {args.fisher_mini_bsz} samples, blocks of "
          f"{args.fittable_params}; mean ± sample std over seeds {', '.join(map(str, args.seeds))}\n")
    print(table(rows))
    print(f"\nwall time of the study: {wall:.0f}s\n")
    print(json.dumps(rows, indent=1))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "wall_seconds": round(wall, 1), "pretrained": pretrained}, fh, indent=1)


if __name__ == "__main__":
    main()
