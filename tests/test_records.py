"""The event log's schema (observe/records.py): every emitter sends a record of it, a record's line is
the line the log has always held, and every reader compares kinds with the schema's constants."""

import ast
import json
import pathlib

import pytest

from raytrain_spot.observe.events import EventWriter, read_events
from raytrain_spot.observe.records import (RECORDS, Alert, CheckpointFailed, EventRecord, Group, Handoff, Samples, Step,
                                           to_line)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "raytrain_spot"
EMITTERS = ("emit", "emit_soon", "_emit")
FORWARDERS = {"raytrain_spot/preemption/node_events.py", "raytrain_spot/loop/survivor_commit.py"}
"""Emit a record made elsewhere (``node_changes``' records, which tests/test_node_events.py checks; the
step records the loop made, which the survivors write again for a lost rank 0)."""
RECORD_NAMES = {cls.__name__ for cls in RECORDS.values()}


def python_files(*folders):
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def parsed(path):
    return ast.parse(path.read_text(), filename=str(path))


def relative(path):
    return path.relative_to(ROOT).as_posix()


def constructed_record(node):
    """The record class a call constructs (``Step(...)``, ``records.Step(...)``), else None."""
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        return name if name in RECORD_NAMES else None
    return None


def test_every_event_the_package_emits_is_a_record_of_the_schema():
    emits = []
    for path in python_files("raytrain_spot"):
        tree = parsed(path)
        # A record built into a name first (``step_record = Step(...)``), then emitted.
        built = {node.targets[0].id: constructed_record(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                 and constructed_record(node.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in EMITTERS:
                where = f"{relative(path)}:{node.lineno}"
                assert len(node.args) == 1 and not node.keywords, f"{where}: emit takes one record"
                [argument] = node.args
                if relative(path) in FORWARDERS and isinstance(argument, ast.Name):
                    continue
                record = built.get(argument.id) if isinstance(argument, ast.Name) else constructed_record(argument)
                assert record, f"{where}: emits {ast.unparse(argument)}, not a record"
                emits.append(record)
    assert len(emits) > 20 and {"Step", "Samples", "Group", "Checkpoint", "Alert", "End"} <= set(emits)


def test_no_line_of_the_log_is_built_by_hand_in_the_package():
    for path in python_files("raytrain_spot"):
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    is_kind = isinstance(key, ast.Constant) and key.value == "ev"
                    assert not (is_kind and isinstance(value, ast.Constant)), (
                        f"{relative(path)}:{node.lineno}: a line built by hand; emit a record of observe/records.py")


def test_the_schema_registers_every_record_class_once_with_a_docstring_per_field():
    assert set(RECORDS.values()) == set(EventRecord.__subclasses__())
    assert all(kind == cls.ev for kind, cls in RECORDS.items())
    tree = parsed(PACKAGE / "observe" / "records.py")
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in RECORD_NAMES):
        assert ast.get_docstring(cls), cls.name
        body = cls.body
        for i, statement in enumerate(body):
            if isinstance(statement, ast.AnnAssign) and statement.target.id != "ev":
                following = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant), (
                    f"{cls.name}.{statement.target.id} has no docstring")


def kind_comparisons(tree):
    """Comparisons of a line's kind (``e["ev"]``, ``e.get("ev")``, a variable ``ev``) with anything."""
    def is_kind(node):
        return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "ev"
                or isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "ev"
                or isinstance(node, ast.Name) and node.id == "ev")
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(is_kind(n) for n in [node.left, *node.comparators]):
            yield node


@pytest.mark.parametrize("folder", ["raytrain_spot", "bench"])
def test_readers_compare_kinds_with_the_schemas_constants_not_string_literals(folder):
    compared = 0
    for path in python_files(folder):
        tree = parsed(path)
        for comparison in kind_comparisons(tree):
            for operand in [comparison.left, *comparison.comparators]:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                for element in elements:
                    where = f"{relative(path)}:{comparison.lineno}"
                    assert not (isinstance(element, ast.Constant) and isinstance(element.value, str)), (
                        f"{where}: compares a kind with {element.value!r}; use the record class's ev")
            compared += 1
        for node in ast.walk(tree):  # every X.ev names a class of the schema
            if isinstance(node, ast.Attribute) and node.attr == "ev" and isinstance(node.ctx, ast.Load):
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
                if owner not in ("record", "cls"):  # a record (class) of the schema itself, in records.py
                    assert owner in RECORD_NAMES, f"{relative(path)}:{node.lineno}: {owner}.ev is not in the schema"
    assert compared > 0


def written_line(tmp_path, line):
    """``line`` as the event-log actor writes it to events.jsonl."""
    path = tmp_path / "events.jsonl"
    path.unlink(missing_ok=True)
    writer = EventWriter(str(path))
    writer.write(line)
    writer.flush()
    return path.read_text()


# Lines as the emitters wrote them before the schema: the keyword arguments, in their order.
STEP_FIELDS = dict(step=12, world_size=3, samples=[704, 768], loss=2.3125, lr=0.0003, grad_norm=1.25, duration_s=0.412,
                   data_s=0.031)
GROUP_FIELDS = dict(world_size=2, step=40, restored_step=40, startup_s={"placement": 1.2, "restore": 0.4},
                    nodes=["n1", "n2"], process_age_s=[95.0, 3.1], warm_standby=True)
EXAMPLES = [
    (Step(**STEP_FIELDS), {"t": 1733400000.5, "ev": "step", **STEP_FIELDS}),
    (Group(**GROUP_FIELDS), {"t": 1733400000.5, "ev": "group", **GROUP_FIELDS}),
    (Group(world_size=3, step=0, restored_step=None, startup_s={}, nodes=["a", "b", "c"]),
     {"t": 1733400000.5, "ev": "group", "world_size": 3, "step": 0, "restored_step": None, "startup_s": {},
      "nodes": ["a", "b", "c"]}),
    (Handoff(reason="preemption", step=7, world_size=3, preempted_ranks=[2], nodes=["n3"]),
     {"t": 1733400000.5, "ev": "handoff", "reason": "preemption", "step": 7, "world_size": 3, "preempted_ranks": [2],
      "nodes": ["n3"]}),
    (CheckpointFailed(step=20, kind="periodic", tier="durable", error="RetryError: 503", retry_in_s=2.0),
     {"t": 1733400000.5, "ev": "checkpoint_failed", "step": 20, "kind": "periodic", "tier": "durable",
      "error": "RetryError: 503", "retry_in_s": 2.0}),
    (CheckpointFailed(step=22, kind="jit", error="OSError: disk full"),
     {"t": 1733400000.5, "ev": "checkpoint_failed", "step": 22, "kind": "jit", "error": "OSError: disk full"}),
    (Alert(t=99.0, alert="durable_upload_failed", action="notify", step=40, reason="checkpoint step 40 did not reach"),
     {"t": 99.0, "ev": "alert", "alert": "durable_upload_failed", "action": "notify", "step": 40,
      "reason": "checkpoint step 40 did not reach"}),
]


@pytest.mark.parametrize("record, old", EXAMPLES, ids=[type(r).__name__ for r, _ in EXAMPLES])
def test_a_record_writes_the_line_its_emitter_wrote_before_the_schema(tmp_path, record, old):
    assert written_line(tmp_path, to_line(record, 1733400000.5)) == written_line(tmp_path, old)


def test_a_samples_record_is_written_packed_and_read_back_as_a_dict(tmp_path):
    line = written_line(tmp_path, to_line(Samples(step=3, rank=1, ids=[5, 9, 9, 300]), 1.0))
    assert json.loads(line) == {"t": 1.0, "ev": "samples", "step": 3, "rank": 1, "ids_packed": "BQQAowI"}
    assert read_events(str(tmp_path / "events.jsonl")) == [
        {"t": 1.0, "ev": Samples.ev, "step": 3, "rank": 1, "ids": [5, 9, 9, 300]}]
