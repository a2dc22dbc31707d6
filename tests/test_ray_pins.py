"""raytrain-spot extends private Ray Train 2.60 classes; this fails loudly if an upgrade moves them."""

import inspect

import ray
from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def test_ray_version_is_the_pinned_one():
    assert ray.__version__ == "2.60.0", "re-check raytrain_spot/elastic/policy.py against the new Ray, then update this pin"


def test_controller_is_built_with_replaceable_policies():
    source = inspect.getsource(DataParallelTrainer.fit)
    assert "scaling_policy=create_scaling_policy(" in source and "failure_policy=create_failure_policy(" in source
    assert "**controller_init_kwargs" in inspect.getsource(DataParallelTrainer._initialize_and_run_controller)


def test_policy_hooks_still_exist_with_the_same_signatures():
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(ElasticScalingPolicy.make_decision_for_non_running_worker_group) == ["self"]
    assert params(ElasticScalingPolicy.make_decision_for_running_worker_group) == [
        "self", "worker_group_state", "worker_group_status"]
    assert params(ElasticScalingPolicy._maybe_send_resource_request) == ["self"]
    assert params(DefaultFailurePolicy.make_decision) == ["self", "training_failed_error"]


def test_worker_local_preemption_signal_is_where_we_read_it():
    from ray.train.v2._internal.execution.context import TrainContext, get_train_context  # noqa: F401
    from ray.train.v2._internal.execution.preemption import PreemptionContext

    assert "preemption_context" in TrainContext.__dataclass_fields__
    assert "preemption_info" in PreemptionContext.__dataclass_fields__


def test_restart_states_carry_the_error_that_caused_them():
    from ray.train.v2._internal.execution.controller.state import ReschedulingState, RestartingState

    for state_cls in (RestartingState, ReschedulingState):
        assert list(inspect.signature(state_cls.__init__).parameters) == ["self", "training_failed_error"]
    assert "after_controller_state_update" in dir(ElasticScalingPolicy)


def test_drain_state_is_readable_from_the_gcs_accessor():
    assert hasattr(ray._private.state.GlobalState, "get_draining_nodes")
