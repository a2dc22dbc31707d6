"""The tree is the architecture: the README's Layout table places every module, the packages
import one another without cycles, and test-only servers stay out of the product."""

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
    return {m for m in imported if m.startswith("raytrain_spot")}


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


def test_the_layout_table_places_every_module_and_no_other():
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    placed: Dict[str, List[str]] = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`raytrain_spot/"):
            placed[cells[0].strip("`")] = re.findall(r"`([\w]+\.py)`", cells[2])
    on_disk: Dict[str, List[str]] = {}
    for root, _, files in os.walk(PACKAGE):
        names = sorted(f for f in files if f.endswith(".py") and f != "__init__.py")
        if names:
            on_disk[os.path.relpath(root, REPO) + "/"] = names
    assert {k: sorted(v) for k, v in placed.items()} == on_disk


def test_the_packages_import_each_other_without_cycles():
    graph = import_graph()
    state: Dict[str, int] = {}
    cycles = []

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_test_only_servers_are_never_imported_by_the_product():
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.startswith("raytrain_spot.testing"))
                 for name, targets in graph.items() if not name.startswith("raytrain_spot.testing")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_training_loop_imports_no_model_tokenizer_or_dataset():
    graph = import_graph()
    loop_side = [n for n in graph if n.startswith(("raytrain_spot.train", "raytrain_spot.checkpoint",
                                                   "raytrain_spot.elastic"))]
    assert {n: sorted(t for t in graph[n] if t.startswith("raytrain_spot.tasks")) for n in loop_side
            if any(t.startswith("raytrain_spot.tasks") for t in graph[n])} == {}
