"""Every module the package imports at run time comes from a dependency pyproject.toml declares
(or from one of their own requirements), so `pip install .` (README command 1, no test extras)
brings all of them."""

import ast
import bisect
import functools
import importlib.metadata as metadata
import importlib.util
import os
import sys
import tomllib

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "raytrain_spot")
TEST_ONLY = os.path.join(PACKAGE, "testing")  # the tests' servers, never imported by runtime code
OPTIONAL = {"wandb": "imported only when monitoring.wandb_project is set"}
EXTRA_SCOPES = {os.path.join("raytrain_spot", "tasks", "hf_vlm"): "hf"}
"""Modules that only run with an optional extra installed, and that extra: they may import from it."""


def _key(name: str) -> str:
    return name.lower().replace("_", "-")


def _available(extra: str = "") -> set:
    """Declared distributions (with ``extra``'s) and what they require with the extras asked for."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = [Requirement(r) for r in project["dependencies"] + (project["optional-dependencies"][extra]
                                                                   if extra else [])]
    available = {_key(r.name) for r in declared}
    for requirement in declared:
        for line in metadata.requires(requirement.name) or ():
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra})
                                            for extra in requirement.extras | {""}):
                available.add(_key(needed.name))
    return available


def _imports():
    """(module, file) for every third-party import; ``from a.b import c`` counts as a.b.c when that is a module."""
    for directory, _, files in os.walk(PACKAGE):
        if directory.startswith(TEST_ONLY):
            continue
        for file in (f for f in files if f.endswith(".py")):
            path = os.path.join(directory, file)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                             for a in node.names]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] not in sys.stdlib_module_names | {"raytrain_spot", "__future__"}:
                        yield name, os.path.relpath(path, ROOT)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@functools.cache
def _installed_files():
    files = sorted((str(d.locate_file(f)), _key(d.metadata["Name"])) for d in metadata.distributions()
                   for f in d.files or ())
    return files, [path for path, _ in files]


def _owner(module: str) -> str:
    """The distribution whose files hold ``module`` (a namespace package: the first file under it)."""
    spec = importlib.util.find_spec(module)
    location = spec.origin if spec.has_location else list(spec.submodule_search_locations)[0] + os.sep
    files, paths = _installed_files()
    at = bisect.bisect_left(paths, location)
    assert at < len(paths) and paths[at].startswith(location), f"no installed distribution holds {module}"
    return files[at][1]


def _extra_of(where: str) -> str:
    return next((extra for scope, extra in EXTRA_SCOPES.items() if where.startswith(scope + os.sep)), "")


def test_every_runtime_import_comes_from_a_declared_dependency():
    available = {extra: _available(extra) for extra in {"", *EXTRA_SCOPES.values()}}
    missing = sorted({f"{_owner(module)} (import {module} in {where})" for module, where in _imports()
                      if module.split(".")[0] not in OPTIONAL and _owner(module) not in available[_extra_of(where)]})
    assert not missing, f"add to [project] dependencies (or the module's extra) in pyproject.toml: {missing}"


def test_modules_of_an_extra_are_not_imported_by_the_rest_of_the_package():
    from tests.test_layout import import_graph

    scopes = tuple(scope.replace(os.sep, ".") for scope in EXTRA_SCOPES)
    offenders = {name: sorted(t for t in targets if t.startswith(scopes))
                 for name, targets in import_graph().items() if not name.startswith(scopes)}
    assert {k: v for k, v in offenders.items() if v} == {}, "pip install . (no extras) would fail to import these"
