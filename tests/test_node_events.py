"""The driver's watch on the cluster turns node changes into the run's events."""

from raytrain_spot.observe.records import Add, Drain, Kill, Remove
from raytrain_spot.preemption.node_events import NodeState, node_changes


def state(node_id, alive=True, deadline=None, node_type="t", pricing="spot"):
    return NodeState(node_id, alive, deadline, node_type, pricing, 0.0)


def test_node_changes_become_events():
    before = {"a": state("a"), "b": state("b"), "c": state("c")}
    after = {"a": state("a", deadline=5000), "b": state("b", alive=False), "d": state("d", pricing="on_demand")}
    records = sorted(node_changes(before, after), key=lambda r: (r.ev, r.node))
    assert records == [
        Add(node="d", node_type="t", pricing="on_demand", gpus=0.0),
        Drain(node="a", deadline=5.0),
        Kill(node="b", with_notice=False),
        Remove(node="c"),
    ]
    drained_then_dead = node_changes({"a": state("a", deadline=0)}, {"a": state("a", alive=False)})
    assert drained_then_dead == [Kill(node="a", with_notice=True)]
    assert node_changes(after, after) == []
