"""The results report on folders a user was handed: it writes only under its report folder, through
the one atomic writer; a bad summary is a notice and a skip, bad input one `error:` line, exit 2."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from engine import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def good_summary(folder, **changes):
    summary = {"exp_name": "e", "exp_mode": "prune", "dataset": "Digits", "arch": "smallcnn",
               "layer_type": "unstructured", "scope": "global", "k": 0.5, "trainer": "base", "seed": 1,
               "source_net": None, "test_top1": 90.0, "sparsity": 0.5, "wall_seconds": 1.0,
               "params_total": 100, "params_kept": 50, "flops_total": 10, "flops_kept": 5,
               "layers": [{"name": "fc", "type": "Linear", "params": 100, "kept": 50}],
               "finished_at": "2026-01-01T00:00:00Z"}
    summary.update(changes)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.json"), "w") as fh:
        json.dump(summary, fh)


def report(*args, process=False):
    """(exit code, stdout, stderr) of ``python -m study.report ARGS``: its ``main`` in this process (a
    process of its own spends ~3 s importing torch and matplotlib), or with ``process`` a real one."""
    if process:
        done = subprocess.run([sys.executable, "-m", "study.report", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    from study import report as study_report

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = study_report.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def files_under(top):
    return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs)


def test_names_from_data_never_leave_the_report_folder(tmp_path):
    results, outside = tmp_path / "R", tmp_path / "OUTSIDE"
    outside.mkdir()
    good_summary(results / "e" / "prune" / "1", dataset="/../../../OUTSIDE/pwn", arch="x", layer_type="y")
    (results / "report" / "accuracy_").mkdir(parents=True)  # the trap the issue describes
    code, out, err = report(results)
    assert code == 0, err
    assert os.listdir(outside) == []
    written = [f for f in files_under(results / "report") if f.endswith(".png")]
    assert "accuracy__.._.._.._OUTSIDE_pwn_x_y.png" in written and all(os.sep not in f for f in written)


def test_a_symlink_in_the_report_folder_is_replaced_not_followed(tmp_path):
    results, victim = tmp_path / "R", tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    good_summary(results / "e" / "prune" / "1")
    (results / "report").mkdir()
    os.symlink(victim, results / "report" / "table.md")
    code, _, err = report(results)
    assert code == 0, err
    assert victim.read_text() == "keep me\n"
    assert not os.path.islink(results / "report" / "table.md") and "k = 0.5" in (results / "report" / "table.md").read_text()


def test_a_report_folder_that_links_outside_is_refused(tmp_path):
    results, elsewhere = tmp_path / "R", tmp_path / "elsewhere"
    elsewhere.mkdir()
    good_summary(results / "e" / "prune" / "1")
    os.symlink(elsewhere, results / "report")
    code, _, err = report(results)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "outside" in err
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("changes,why", [
    ({"k": "abc"}, "k is not a number"),
    ({"test_top1": "high"}, "test_top1 is not a number"),
    ({"layers": [{"name": "x"}, 5, None]}, "layers holds an entry"),
    ({"k": None}, "k is not a number"),
    ({"seed": {}}, "seed is not an integer"),
    ({"source_net": 5}, "source_net is not a string"),
    ({"layers": [{"name": "fc", "params": 10, "kept": 11}]}, "kept <= params"),
    ({"params_kept": -3}, "params_kept is not a count"),
    ({"imp_rounds": [{"round": 1}]}, "imp_rounds is not a list"),
])
def test_a_malformed_summary_is_a_notice_and_a_skip(tmp_path, changes, why):
    results = tmp_path / "R"
    good_summary(results / "e" / "prune" / "good")
    good_summary(results / "e" / "prune" / "bad", **changes)
    code, out, err = report(results)
    assert code == 0 and "report of 1 rows" in out, err
    [line] = err.strip().splitlines()
    assert line.startswith("notice: skipped ") and why in line and "Traceback" not in err


def test_a_summary_nested_too_deep_is_skipped(tmp_path):
    results = tmp_path / "R"
    good_summary(results / "e" / "prune" / "good")
    deep = results / "e" / "prune" / "deep"
    deep.mkdir(parents=True)
    (deep / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, err = report(results)
    assert code == 0 and "nested too deep" in err and err.count("\n") == 1, err


def test_a_summary_with_many_layers_gets_no_chart_but_a_notice(tmp_path):
    results = tmp_path / "R"
    layers = [{"name": f"l{i}", "type": "Linear", "params": 10, "kept": 5} for i in range(300_000)]
    good_summary(results / "e" / "prune" / "1", layers=layers)
    code, out, err = report(results)
    assert code == 0, err
    assert "no per-layer chart: the run has 300,000 masked layers" in err
    assert not [f for f in os.listdir(results / "report") if f.startswith("layers_")]


@pytest.mark.parametrize("args,needle", [
    (["--ks", "abc"], "invalid float value: 'abc'"),
    (["--ks", "0"], "--ks 0 is not a density in (0, 1]"),
    (["--ks", "nan"], "--ks nan is not a density"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    check_bad_arguments(tmp_path, args, needle, process=False)


def test_bad_arguments_are_one_line_and_exit_2_from_a_process(tmp_path):
    check_bad_arguments(tmp_path, ["--bogus"], "unrecognized arguments: --bogus", process=True)


def check_bad_arguments(tmp_path, args, needle, *, process):
    results = tmp_path / "R"
    good_summary(results / "e" / "prune" / "1")
    code, out, err = report(results, *args, process=process)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (results / "report").exists()


def test_a_full_disk_names_the_file_and_leaves_no_truncated_file(tmp_path, monkeypatch, capsys):
    """Every write of the report goes through the atomic writer: a write that fails midway leaves no
    file under its final name, and the error names the file."""
    from study import report as study_report

    results = tmp_path / "R"
    good_summary(results / "e" / "prune" / "1")
    real = files.atomic_write

    def full(path, write, **kw):
        if path.endswith(".png"):
            def half(fh):
                fh.write(b"\x89PNG half")
                raise OSError(28, "No space left on device")
            return real(path, half, **kw)
        return real(path, write, **kw)

    monkeypatch.setattr(files, "atomic_write", full)
    assert study_report.main([str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and ".png" in err and "None" not in err
    assert not [f for f in os.listdir(results / "report") if f.endswith(".png") or f.startswith(".tmp-")]


def test_temporary_files_of_dead_writers_are_removed_at_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f"{files.TMP_PREFIX}{pid}-abc-table.md"
    live = tmp_path / f"{files.TMP_PREFIX}{os.getppid()}-abc-table.md"  # a running writer's file
    other = tmp_path / ".tmp-notes"  # not named by the writer
    for path in (stale, live, other):
        path.write_text("x")
    files.write_text(str(tmp_path / "table.md"), "new\n")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "table.md").read_text() == "new\n"


def test_safe_name():
    assert files.safe_name("/../../x y") == "_.._.._x_y"  # no separator; a leading dot is stripped
    assert files.safe_name("..") == "_" and files.safe_name("") == "_" and files.safe_name("-rf") == "rf"
    assert files.safe_name("ResNet-50_v1.5+x") == "ResNet-50_v1.5+x" and len(files.safe_name("a" * 500)) == 80
