"""raytrain-spot uses private Ray 2.60 names, all through raytrain_spot/_ray.py. Each is pinned here by
the behaviour relied on, so a Ray upgrade that moves or changes one fails here, not in a Spot run."""

import inspect
import re
from unittest import mock

import pytest
import ray
from ray.train import RunConfig, ScalingConfig

from raytrain_spot import _ray
from tests.conftest import REPO


def test_ray_is_the_pinned_version_everywhere():
    pinned = re.search(r'"ray\[default,train\]==([\d.]+)"', open(f"{REPO}/pyproject.toml").read()).group(1)
    assert ray.__version__ == pinned == _ray.RAY_VERSION, "re-run these pins against the new Ray, then bump all three"


@pytest.mark.parametrize("name", sorted(_ray.PRIVATE))
def test_every_private_name_resolves(name):
    assert getattr(_ray, name) is not None


def test_no_private_ray_import_outside_the_one_module():
    import ast
    import os

    offenders = []
    for root, _, files in os.walk(f"{REPO}/raytrain_spot"):
        for file in files:
            path = os.path.join(root, file)
            if not file.endswith(".py") or path.endswith("raytrain_spot/_ray.py"):
                continue
            for node in ast.walk(ast.parse(open(path).read())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray":
                    names = [f"ray.{node.attr}"]
                offenders += [f"{path}:{node.lineno} {n}" for n in names
                              if (n == "ray" or n.startswith("ray.")) and re.search(r"\._|\.core\.generated", n)]
    assert offenders == []


def test_the_trainer_hands_the_controller_our_policies():
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raytrain_spot.elastic.policy import SpotFailurePolicy, SpotScalingPolicy, SpotTorchTrainer

    given = {}

    class Finished:
        error = None

    trainer = SpotTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=(1, 2)),
                               run_config=RunConfig(name="pins", storage_path="/tmp/raytrain-spot-pins"))
    with mock.patch.object(DataParallelTrainer, "_initialize_and_run_controller",
                           lambda self, **kwargs: given.update(kwargs) or Finished()), \
            mock.patch("ray.train.v2.api.data_parallel_trainer.ObjectRefWrapper", lambda fn: fn):
        trainer.fit()
    assert isinstance(given["scaling_policy"], SpotScalingPolicy)
    assert isinstance(given["failure_policy"], SpotFailurePolicy)
    assert given["scaling_policy"]._capacity.per_worker == {"CPU": 1}, "sized from the trainer's ScalingConfig"


def test_the_controller_calls_the_policy_hooks_we_override_with_these_arguments():
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(_ray.ElasticScalingPolicy.make_decision_for_non_running_worker_group) == ["self"]
    assert params(_ray.ElasticScalingPolicy.make_decision_for_running_worker_group) == [
        "self", "worker_group_state", "worker_group_status"]
    assert params(_ray.ElasticScalingPolicy.after_controller_state_update) == ["self", "previous_state",
                                                                              "current_state"]
    assert params(_ray.DefaultFailurePolicy.make_decision) == ["self", "training_failed_error"]


def test_decisions_and_states_carry_what_the_policies_read():
    error = RuntimeError("boom")
    for state in (_ray.RestartingState(training_failed_error=error), _ray.ReschedulingState(training_failed_error=error)):
        assert state.training_failed_error is error
    resize = _ray.ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})
    assert isinstance(resize, _ray.ScalingDecision) and resize.num_workers == 2
    assert isinstance(_ray.NoopDecision(), _ray.ScalingDecision)
    assert {_ray.FailureDecision.RETRY, _ray.FailureDecision.RAISE} <= set(_ray.FailureDecision)
    assert ScalingConfig(num_workers=(1, 2))._resources_per_worker_not_none == {"CPU": 1}


def test_the_base_scaling_policy_sends_resource_requests_we_keep():
    policy = _ray.ElasticScalingPolicy(ScalingConfig(num_workers=(1, 2)))
    assert callable(policy._maybe_send_resource_request)


def test_a_workers_preemption_signal_is_where_we_read_it():
    from ray.train.v2._internal.execution.context import TrainContext  # noqa: F401 - the pin itself
    from ray.train.v2._internal.execution.preemption import PreemptionContext

    assert "preemption_context" in TrainContext.__dataclass_fields__
    assert "preemption_info" in PreemptionContext.__dataclass_fields__


def test_gcs_accessors_we_call_take_these_arguments():
    assert list(inspect.signature(_ray.GlobalState.get_draining_nodes).parameters) == ["self"]
    assert _ray.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION") > 0
    assert _ray.GcsNodeInfo.GcsNodeState.Value("ALIVE") == _ray.GcsNodeInfo.GcsNodeState.ALIVE
    # GcsClient is a Cython class with no Python signature: tests/test_watcher.py and
    # tests/test_gcp_token_auth.py call it (node table, drain) against real GCSes.
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", _ray.get_node_ip_address())


def test_the_prestart_request_has_the_fields_standbys_send():
    request = _ray.node_manager_pb2.PrestartWorkersRequest(
        language=_ray.common_pb2.PYTHON, job_id=b"\x01\x00\x00\x00",
        runtime_env_info=_ray.runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env="{}"),
        keep_alive_duration_secs=60, num_workers=2)
    assert request.num_workers == 2 and hasattr(_ray.node_manager_pb2_grpc, "NodeManagerServiceStub")


def test_node_constants_and_the_command_runner_env_wrapper():
    for name in ("PROCESS_TYPE_RAYLET", "RESOURCES_ENVIRONMENT_VARIABLE", "LABELS_ENVIRONMENT_VARIABLE"):
        assert isinstance(getattr(_ray.ray_constants, name), str)
    wrapped = _ray.with_environment_variables("echo hi", {"RAY_AUTH_MODE": "token"})
    assert "RAY_AUTH_MODE" in wrapped and "echo hi" in wrapped


def test_ray_up_prepares_our_local_yaml_through_these_functions():
    import yaml

    config = _ray.prepare_config(yaml.safe_load(open(f"{REPO}/cluster/local.yaml")))
    provider = _ray.get_node_provider_cls(config["provider"])
    assert issubclass(provider, _ray.FakeMultiNodeProvider)
    _ray.validate_config(provider.fillout_available_node_types_resources(config))


def test_the_gcp_provider_pieces_the_spot_and_multizone_providers_build_on():
    for method in ("_get_resource_depending_on_node_name", "non_terminated_nodes", "terminate_node", "create_node",
                   "_construct_clients", "_get_cached_node"):
        assert callable(getattr(_ray.GCPNodeProvider, method)), method
    # SpotGCPNodeProvider.terminate_node reads these, as Ray's own does.
    init = inspect.getsource(_ray.GCPNodeProvider.__init__)
    assert "self.lock = " in init and "self.cache_stopped_nodes = " in init
    assert list(inspect.signature(_ray.GCPNodeProvider.terminate_node).parameters) == ["self", "node_id"]
    for method in ("delete_instance", "stop_instance"):
        assert list(inspect.signature(getattr(_ray.GCPCompute, method)).parameters) == [
            "self", "node_id", "wait_for_operation"], method
    assert list(inspect.signature(_ray.GCPResource.__init__).parameters) == [
        "self", "resource", "project_id", "availability_zone", "cluster_name"]
    assert issubclass(_ray.GCPCompute, _ray.GCPResource) and issubclass(_ray.GCPTPU, _ray.GCPResource)
    assert {"COMPUTE", "TPU"} <= {t.name for t in _ray.GCPNodeType}
    calls = []
    retried = _ray.gcp_retry(lambda self: calls.append(1) or "ok")
    assert retried(None) == "ok" and calls == [1]


def test_ray_train_logs_a_failed_training_function_through_the_logger_we_filter():
    import importlib

    module = importlib.import_module(_ray.TRAIN_UTIL_LOGGER)
    assert "logger" in vars(module) and module.logger.name == _ray.TRAIN_UTIL_LOGGER


def test_a_worker_group_that_fails_after_its_state_is_built_keeps_its_placement_group():
    """The premise of elastic/policy.py's remove_orphaned_placement_groups: Ray Train 2.60 cleans up a
    failed start only if the group's state was never built. If this fails, Ray cleans up itself now."""
    import inspect

    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    start, start_impl = inspect.getsource(WorkerGroup._start), inspect.getsource(WorkerGroup._start_impl)
    assert "if not self.has_started():" in start and "worker_group_state_builder.shutdown()" in start
    assert start_impl.index("self._worker_group_state = worker_group_state_builder.build()") < \
        start_impl.index("callback.after_worker_group_start(self)") < \
        start_impl.index("raise WorkerGroupStartupFailedError(error_msg)")
