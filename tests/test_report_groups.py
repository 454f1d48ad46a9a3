"""The results report pools seeds only: runs that differ in any setting but the seed are separate lines
named by what differs, a repeated (setting, seed) is not a second seed, a FLOPs-target run sits at the
density it reached, and bookkeeping options (paths, devices, logging) never split a setting."""
from __future__ import annotations

import csv
import os

import pytest
import yaml

from configs.schema import FIELDS
from study import report as study_report
from study.runs import BOOKKEEPING, load_runs
from tests.test_study import ckpt, fake_run


def with_config(folder, **options):
    """Give the fake run in ``folder`` the config.yml train.py writes: every option, defaults but ``options``."""
    config = {name: f.default for name, f in FIELDS.items()}
    config.update(options)
    with open(os.path.join(folder, "config.yml"), "w") as fh:
        yaml.safe_dump(config, fh)
    return folder


def wf_run(root, n, *, seed, top1, k=0.1, exp=None, config=None, **summary):
    """A WoodFisher prune run (summary and config.yml) of seed ``seed``."""
    options = {"exp_mode": "prune", "trainer": "woodfisher", "prune_method": "woodfisher", "k": k, "seed": seed,
               "epochs": 8, "exp_name": exp or f"wf_s{seed}_{n}", **(config or {})}
    summary = {"sparsity": 1 - k, "params_kept": int(1000 * k), **summary}
    folder = fake_run(root, options["exp_name"], "prune", n, trainer="woodfisher", prune_method="woodfisher",
                      method="woodfisher", k=k, seed=seed, test_top1=top1, epochs=options["epochs"],
                      source_net="/elsewhere/pre/pretrain/1/checkpoint/model_best.pth.tar", **summary)
    return with_config(folder, **options)


def table_and_rows(root, notices=None):
    rows = study_report.collect_rows(load_runs(str(root)), notice=(notices if notices is not None else []).append)
    return study_report.markdown_table(rows), rows


def line(table, name):
    found = [x for x in table.splitlines() if x.startswith(f"| {name} |")]
    assert len(found) == 1, table
    return found[0]


def test_three_seeds_of_one_setting_are_one_row_of_three(tmp_path):
    for seed, top1 in ((1, 90.0), (2, 92.0), (3, 94.0)):
        wf_run(tmp_path, 1, seed=seed, top1=top1)
    table, rows = table_and_rows(tmp_path)
    assert len({r["setting"] for r in rows}) == 1
    assert line(table, "woodfisher") == "| woodfisher | 92.00 ± 2.00 (3) |"


def test_one_seed_at_three_prune_freqs_is_three_rows_named_by_prune_freq(tmp_path):
    # the issue's case: one seed, three settings, once pooled as "92.76 ± 6.84 (3)"
    for n, (freq, top1) in enumerate(((2, 97.0), (4, 95.0), (8, 86.0)), start=1):
        wf_run(tmp_path, n, seed=1, top1=top1, exp="wf", config={"prune_freq": freq})
    table, rows = table_and_rows(tmp_path)
    assert len({r["setting"] for r in rows}) == 3 and all(r["duplicate_of"] is None for r in rows)
    assert line(table, "woodfisher (prune_freq=2)") == "| woodfisher (prune_freq=2) | 97.00 (1) |"
    assert line(table, "woodfisher (prune_freq=4)") == "| woodfisher (prune_freq=4) | 95.00 (1) |"
    assert line(table, "woodfisher (prune_freq=8)") == "| woodfisher (prune_freq=8) | 86.00 (1) |"
    assert "±" not in table and "| woodfisher |" not in table


def test_a_repeated_seed_of_one_setting_is_counted_once_the_newest_and_named(tmp_path):
    old = wf_run(tmp_path, 1, seed=1, top1=50.0, exp="wf_s1", finished_at="2026-01-01T00:00:01Z")
    new = wf_run(tmp_path, 2, seed=1, top1=90.0, exp="wf_s1", finished_at="2026-01-02T00:00:00Z")
    wf_run(tmp_path, 1, seed=2, top1=92.0)
    notices: list[str] = []
    table, rows = table_and_rows(tmp_path, notices)
    assert line(table, "woodfisher") == "| woodfisher | 91.00 ± 1.41 (2) |"  # 90 and 92: the older 50 is left out
    by_folder = {r["prune_run"]: r for r in rows}
    assert by_folder[old]["duplicate_of"] == new and by_folder[new]["duplicate_of"] is None
    assert len(notices) == 1 and old in notices[0] and new in notices[0] and "seed 1" in notices[0]


def test_a_flops_target_run_is_reported_at_the_density_it_reached(tmp_path):
    # --flops-target runs keep --k at its default 1; they reached 19 % and 17 % of the weights: one cell at 18 %
    for seed, sparsity in ((1, 0.81), (2, 0.83)):
        wf_run(tmp_path, 1, seed=seed, top1=90.0 + seed, k=1.0, sparsity=sparsity, params_kept=180,
               config={"flops_target": 0.3})
    wf_run(tmp_path, 1, seed=3, top1=80.0, k=0.1, exp="plain")
    table, rows = table_and_rows(tmp_path)
    flops = sorted(float(r["k"]) for r in rows if r["flops_target"] is not None)
    assert flops == [0.17, 0.19]
    assert "k = 1 " not in table and "| k = 0.18 | k = 0.1 |" in table
    assert line(table, "woodfisher (flops_target=0.3)") == "| woodfisher (flops_target=0.3) | 91.50 ± 0.71 (2) |  |"
    assert line(table, "woodfisher (flops_target=none)") == "| woodfisher (flops_target=none) |  | 80.00 (1) |"


@pytest.mark.parametrize("key", BOOKKEEPING)
def test_bookkeeping_options_do_not_split_a_setting(tmp_path, key):
    values = {"configs": ("a.yml", "b.yml"), "result_dir": ("/r1", "/r2"), "exp_name": ("wf_s1", "wf_s2"),
              "resume": (None, "/r/x/checkpoint/checkpoint.pth.tar"), "source_net": ("/p1/m.pth", "/p2/m.pth"),
              "data_dir": ("./datasets", "/data"), "device": ("cpu", "cuda:1"), "num_workers": (0, 8),
              "test_batch_size": (128, 512), "print_freq": (10, 100), "progress": (None, False),
              "dist_timeout": (600, 60), "evaluate": (False, True), "save_dense": (False, True),
              "decode": ("auto", "gpu"), "channels_last": (False, True), "compile": (False, True)}
    assert set(values) == set(BOOKKEEPING)
    for seed in (1, 2):
        wf_run(tmp_path, 1, seed=seed, top1=90.0 + seed, config={key: values[key][seed - 1]})
    table, rows = table_and_rows(tmp_path)
    assert len({r["setting"] for r in rows}) == 1 and line(table, "woodfisher").endswith("(2) |")


@pytest.mark.parametrize("key, a, b", [("lr", 0.01, 0.001), ("epochs", 8, 16), ("exclude_layers", None, "fc"),
                                       ("coupled", False, True), ("objective", "natural", "trades"),
                                       ("option_of_a_newer_version", None, 3)])
def test_every_other_option_splits_a_setting_unknown_ones_included(tmp_path, key, a, b):
    wf_run(tmp_path, 1, seed=1, top1=90.0, config={key: a} if a is not None else {})
    wf_run(tmp_path, 1, seed=2, top1=92.0, config={key: b})
    table, rows = table_and_rows(tmp_path)
    assert len({r["setting"] for r in rows}) == 2
    names = [x.split(" |")[0][2:] for x in table.splitlines() if x.startswith("| woodfisher")]
    assert len(names) == 2 and all(f"{key}=" in name for name in names), names


def test_finetune_and_dense_settings_split_too_and_the_plot_draws_a_line_each(tmp_path):
    root = str(tmp_path)
    pre = with_config(fake_run(root, "pre", "pretrain", 1, test_top1=98.0, epochs=15), epochs=15)
    with_config(fake_run(root, "pre_short", "pretrain", 1, test_top1=95.0, epochs=1, seed=2), epochs=1, seed=2)
    for seed, ft_epochs in ((1, 8), (2, 4)):
        prune = fake_run(root, f"hy_s{seed}", "prune", 1, k=0.1, seed=seed, test_top1=60.0, sparsity=0.9,
                         params_kept=100, method="hydra", source_net=ckpt(pre))
        with_config(prune, exp_mode="prune", k=0.1, seed=seed, source_net=ckpt(pre))
        fine = fake_run(root, f"hy_s{seed}", "finetune", 1, k=0.1, seed=seed, test_top1=90.0 + seed, sparsity=0.9,
                        params_kept=100, epochs=ft_epochs, source_net=ckpt(prune))
        with_config(fine, exp_mode="finetune", k=0.1, seed=seed, epochs=ft_epochs, source_net=ckpt(prune))
    notices: list[str] = []
    written = study_report.report(root, notice=notices.append)
    table = open(os.path.join(root, "report", "table.md")).read()
    assert "(dense (epochs=1): 95.00 (1) %; dense (epochs=15): 98.00 (1) %)" in table
    assert line(table, "hydra (finetune:epochs=4)") == "| hydra (finetune:epochs=4) | 92.00 (1) |"
    assert line(table, "hydra (finetune:epochs=8)") == "| hydra (finetune:epochs=8) | 91.00 (1) |"
    rows = list(csv.DictReader(open(os.path.join(root, "report", "results.csv"))))
    assert len({r["setting"] for r in rows if r["method"] == "hydra"}) == 2
    assert all(r["duplicate_of"] == "" for r in rows) and notices == []
    assert sum(p.endswith(".png") for p in written) == 2
