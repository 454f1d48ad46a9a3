"""The house rules that keep the code readable, checked on the source itself:

- imports point one way, CLI -> trainers -> engine/pruning/deploy/robust -> layers/models/data ->
  configs, with no circle between modules (``TYPE_CHECKING`` imports count: a circle of annotations
  is still a circle for the reader);
- no generic module names a trainer or a prune method: a trainer declares what it needs in its
  capability record (``configs.capabilities``), which generic code reads;
- the driver and the trainers stay short enough to read in one sitting.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The layers of the house, lowest first: a module may import its own layer's packages and lower ones.
LAYERS = (("configs",), ("layers", "models", "data"), ("robust", "pruning", "engine", "deploy"), ("trainers",),
          ("train", "export", "study"))
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def modules() -> dict[str, str]:
    """Every module of the project's packages and top-level scripts: dotted name -> path."""
    found = {}
    for package in LEVEL:
        path = os.path.join(ROOT, package)
        if os.path.isfile(path + ".py"):
            found[package] = path + ".py"
            continue
        for folder, _, files in os.walk(path):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                    found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return found


MODULES = modules()


def imports(path: str) -> set[str]:
    """The project modules ``path`` imports: ``from p import name`` is the module p.name when that is one."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            if subs:
                out.update(subs)
            if len(subs) < len(node.names) and node.module in MODULES:
                out.add(node.module)
    return out


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` that point to a higher layer."""
    return sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                  if LEVEL[b.split(".")[0]] > LEVEL[a.split(".")[0]])


def test_imports_point_down_the_layers():
    assert not upward(GRAPH), upward(GRAPH)


def test_no_circle_between_packages_of_one_layer_or_between_modules():
    packages: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        packages.setdefault(a.split(".")[0], set()).update(b.split(".")[0] for b in targets)
    for graph in (GRAPH, {a: b - {a} for a, b in packages.items()}):
        assert not circles(graph), circles(graph)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_layout_test_finds_a_circle_and_an_upward_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward({"engine.loop": {"trainers.base", "layers.maskset"}, "data.registry": {"configs.schema"}}) == [
        "engine.loop imports trainers.base"]


# -- generic code names no trainer and no prune method ---------------------------------------------
# Where a name may appear: the trainers themselves and the prune-method registry's own module.
NAMED_HERE = ("trainers.", "pruning.methods")
WHO = re.compile(r"trainer|prune_method")  # the expression a name would be compared with
REGISTRIES = re.compile(r"TRAINERS|PRUNE_METHODS|get_trainer")


def named(tree: ast.AST, names: set[str], trainers: set[str]) -> list[str]:
    """Comparisons of a trainer/method expression with a name, look-ups of a name in their registries, and
    dicts keyed by trainer names, in ``tree``."""
    def constant(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(constant(e) for e in node.elts)
        return isinstance(node, ast.Constant) and node.value in names

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(constant(o) for o in operands) and any(WHO.search(ast.unparse(o)) for o in operands
                                                          if not constant(o)):
                out.append(ast.unparse(node))
        elif isinstance(node, ast.Subscript) and constant(node.slice) and REGISTRIES.search(ast.unparse(node.value)):
            out.append(ast.unparse(node))
        elif (isinstance(node, ast.Call) and node.args and constant(node.args[0])
              and REGISTRIES.search(ast.unparse(node.func))):
            out.append(ast.unparse(node))
        elif isinstance(node, ast.Dict) and sum(isinstance(k, ast.Constant) and k.value in trainers
                                                for k in node.keys) >= 2:
            out.append(ast.unparse(node)[:80])
    return out


def test_no_generic_module_names_a_trainer_or_a_prune_method():
    from pruning.methods import PRUNE_METHODS
    from trainers import TRAINERS

    trainers = set(TRAINERS.names())
    names = trainers | set(PRUNE_METHODS.names())
    found = {name: hits for name, path in MODULES.items() if not name.startswith(NAMED_HERE)
             for hits in [named(ast.parse(open(path, encoding="utf-8").read()), names, trainers)] if hits}
    assert not found, found


def test_the_naming_check_finds_what_it_looks_for():
    trainers = {"base", "woodfisher"}
    code = ('a = cfg.trainer == "woodfisher"\nb = PRUNE_METHODS.get("woodfisher")\nc = TRAINERS["base"]\n'
            'd = {"base": 1, "woodfisher": 2}\ne = s.get("trainer") in ("base", "x")\nf = val_method == "base"\n')
    assert len(named(ast.parse(code), trainers, trainers)) == 5  # all but f: --val-method base is no trainer


# -- short enough to read ------------------------------------------------------------------------
@pytest.mark.parametrize("path,limit", [("train.py", 250)] + [
    (os.path.join("trainers", name), 350) for name in sorted(os.listdir(os.path.join(ROOT, "trainers")))
    if name.endswith(".py")])
def test_the_driver_and_every_trainer_read_in_one_sitting(path, limit):
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        assert len(fh.readlines()) < limit
