"""The tree is the architecture: the README's Layout table places every module in a layer, every
import goes to its own layer or below, the packages import one another without cycles, the config
loads without torch, and test-only servers stay out of the product."""

from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Set

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "raytrain_spot")


def modules() -> Dict[str, str]:
    """Dotted module name -> path, for every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                relative = os.path.relpath(os.path.join(root, file), REPO)[:-3]
                found[relative.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(root, file)
    return found


def runtime_imports(path: str, name: str) -> Set[str]:
    """Modules of the package ``path`` imports, anywhere but under ``if TYPE_CHECKING``."""
    tree = ast.parse(open(path).read())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            imported |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in imported if m.startswith(("raytrain_spot", "tests"))}


def import_graph() -> Dict[str, Set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for target in runtime_imports(path, name):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layout_table() -> Dict[str, tuple]:
    """README's Layout: module path -> (layer, package directory), one row per package and layer."""
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    placed = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit() and cells[1].startswith("`raytrain_spot/"):
            for file in re.findall(r"`([\w]+\.py)`", cells[3]):
                placed[cells[1].strip("`") + file] = (int(cells[0]), cells[1].strip("`"))
    return placed


def test_the_layout_table_places_every_module_and_no_other():
    on_disk = sorted(os.path.relpath(os.path.join(root, f), REPO) for root, _, files in os.walk(PACKAGE)
                     for f in files if f.endswith(".py") and f != "__init__.py")
    assert sorted(layout_table()) == on_disk


def row_of(module: str) -> str:
    """The Layout table's row of a module: its directory and layer (the top-level directory has two
    rows, Ray's names at the bottom and the entry points at the top). A package's ``__init__.py``
    belongs to the highest row at or under its directory."""
    table = layout_table()
    path = os.path.relpath(modules()[module], REPO)
    directory = os.path.dirname(path) + "/"
    layer = table[path][0] if path in table else max(layer for layer, d in table.values() if d.startswith(directory))
    return f"{directory} (layer {layer})"


def test_every_import_goes_to_the_same_layer_or_below():
    """The README's layers hold: a module imports only modules of its layer or a lower one."""
    layer_of = {name: layout_table()[os.path.relpath(path, REPO)][0] for name, path in modules().items()
                if not path.endswith("__init__.py")}
    upward = sorted(f"{name} (layer {layer_of[name]}) -> {target} (layer {layer_of[target]})"
                    for name, targets in import_graph().items() if name in layer_of
                    for target in targets if target in layer_of and layer_of[target] > layer_of[name])
    assert upward == []


def test_the_packages_import_each_other_without_cycles():
    """At the level of packages, not modules alone: two packages that import each other are one concern
    split in two, and neither can be read or tested without the other."""
    graph: Dict[str, Set[str]] = {}
    for name, targets in import_graph().items():
        graph.setdefault(row_of(name), set()).update(row_of(t) for t in targets)
    for package, targets in graph.items():
        targets.discard(package)
    state: Dict[str, int] = {}
    cycles = []

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_config_loads_without_torch_or_ray():
    """Checking settings (a notebook, the CLI's checks, a CI lint) must not pay for torch or Ray."""
    import subprocess
    import sys

    code = ("import sys; from raytrain_spot.config.schema import config_from_dict; config_from_dict({}); "
            "heavy = sorted(m for m in ('torch', 'ray') if m in sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_test_only_servers_stay_out_of_the_shipped_package():
    assert not os.path.exists(os.path.join(PACKAGE, "testing")), "test doubles live in tests/servers/"
    offenders = {name: sorted(t for t in runtime_imports(path, name) if t.startswith("tests"))
                 for name, path in modules().items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_training_loop_imports_no_model_tokenizer_or_dataset():
    graph = import_graph()
    loop_side = [n for n in graph if n.startswith(("raytrain_spot.loop", "raytrain_spot.checkpoint",
                                                   "raytrain_spot.elastic"))]
    assert {n: sorted(t for t in graph[n] if t.startswith("raytrain_spot.tasks")) for n in loop_side
            if any(t.startswith("raytrain_spot.tasks") for t in graph[n])} == {}
