"""Every private Ray 2.60 name raytrain-spot uses, and only here.

Ray's public API has no hook for what a Spot run needs (a scaling policy that counts live
capacity, a failure policy that knows a handoff, a drain at the preemption notice, a raylet
asked to prestart workers, the autoscaler's GCP provider spread over zones, which autoscaler
runs). Those names are private and move between Ray releases, so they are imported only through
this module, lazily (importing it costs nothing; the cluster tools do not pull in Ray Train),
and each one is pinned by tests/test_ray_pins.py, which exercises the behaviour raytrain-spot
relies on. Upgrading Ray means: bump the pin in pyproject.toml, run those tests, fix this module.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

RAY_VERSION = "2.60.0"

PRIVATE: Dict[str, Tuple[str, str]] = {
    # name: (module, attribute of it; "" for the module itself)
    # Ray Train v2's controller: the policies extended in elastic/policy.py, their decisions, its states.
    "ElasticScalingPolicy": ("ray.train.v2._internal.execution.scaling_policy.elastic", "ElasticScalingPolicy"),
    "ScalingDecision": ("ray.train.v2._internal.execution.scaling_policy", "ScalingDecision"),
    "NoopDecision": ("ray.train.v2._internal.execution.scaling_policy", "NoopDecision"),
    "ResizeDecision": ("ray.train.v2._internal.execution.scaling_policy", "ResizeDecision"),
    "DefaultFailurePolicy": ("ray.train.v2._internal.execution.failure_handling.default", "DefaultFailurePolicy"),
    "FailureDecision": ("ray.train.v2._internal.execution.failure_handling.failure_policy", "FailureDecision"),
    "RestartingState": ("ray.train.v2._internal.execution.controller.state", "RestartingState"),
    "ReschedulingState": ("ray.train.v2._internal.execution.controller.state", "ReschedulingState"),
    "RunningState": ("ray.train.v2._internal.execution.controller.state", "RunningState"),
    # A new group's placement timed out: the cluster, not the training code (elastic/policy.py).
    "WorkerGroupStartupTimeoutError": ("ray.train.v2._internal.exceptions", "WorkerGroupStartupTimeoutError"),
    # Ray Train's torch backend, extended with a store-first process group setup (distributed/process_group.py).
    "TorchBackend": ("ray.train.torch.config", "_TorchBackend"),
    "set_torch_distributed_env_vars": ("ray.train.torch.config", "_set_torch_distributed_env_vars"),
    # A worker whose process or node is gone: its survivors may be committing (elastic/survivors.py).
    "WorkerHealthCheckFailedError": ("ray.train.v2._internal.exceptions", "WorkerHealthCheckFailedError"),
    "WorkerHealthCheckTimeoutError": ("ray.train.v2._internal.exceptions", "WorkerHealthCheckTimeoutError"),
    # A worker's copy of the preemption signal, read without Ray Train's barrier (elastic/capacity.py).
    "get_train_context": ("ray.train.v2._internal.execution.context", "get_train_context"),
    # The GCS: drain state, node table, drain requests (elastic/capacity.py, preemption/).
    "GlobalState": ("ray._private.state", "GlobalState"),
    "GcsClient": ("ray._raylet", "GcsClient"),
    "GcsNodeInfo": ("ray.core.generated.gcs_pb2", "GcsNodeInfo"),
    "DrainNodeReason": ("ray.core.generated.autoscaler_pb2", "DrainNodeReason"),
    "canonicalize_bootstrap_address_or_die": ("ray._private.services", "canonicalize_bootstrap_address_or_die"),
    "get_node_ip_address": ("ray._private.services", "get_node_ip_address"),
    "maybe_enable_token_auth_if_token_available": (
        "ray._private.authentication.authentication_token_setup", "maybe_enable_token_auth_if_token_available"),
    # Token mode for this process even after Ray was imported (Ray caches its config at import), and
    # the token re-read once made (cluster/embedded.py).
    "enable_token_auth": ("ray._private.authentication.authentication_token_setup", "_enable_token_auth"),
    "AuthenticationTokenLoader": ("ray._raylet", "AuthenticationTokenLoader"),
    # A raylet asked to prestart idle workers (elastic/standby.py).
    "init_grpc_channel": ("ray._private.grpc_utils", "init_grpc_channel"),
    "common_pb2": ("ray.core.generated.common_pb2", ""),
    "node_manager_pb2": ("ray.core.generated.node_manager_pb2", ""),
    "node_manager_pb2_grpc": ("ray.core.generated.node_manager_pb2_grpc", ""),
    "runtime_environment_pb2": ("ray.core.generated.runtime_environment_pb2", ""),
    # The GCS key-value store: a preloaded process announces its node warm (elastic/standby.py).
    "internal_kv_initialized": ("ray.experimental.internal_kv", "_internal_kv_initialized"),
    "internal_kv_put": ("ray.experimental.internal_kv", "_internal_kv_put"),
    "internal_kv_list": ("ray.experimental.internal_kv", "_internal_kv_list"),
    "internal_kv_get": ("ray.experimental.internal_kv", "_internal_kv_get"),
    "internal_kv_del": ("ray.experimental.internal_kv", "_internal_kv_del"),
    # Process types and environment names of a Ray node (cluster/embedded.py, cluster/local_provider.py).
    "ray_constants": ("ray._private.ray_constants", ""),
    # The autoscaler: the YAML preparation `ray up` does, its providers (cluster/).
    "get_node_provider_cls": ("ray.autoscaler._private.providers", "_get_node_provider_cls"),
    "prepare_config": ("ray.autoscaler._private.util", "prepare_config"),
    "validate_config": ("ray.autoscaler._private.util", "validate_config"),
    "FakeMultiNodeProvider": ("ray.autoscaler._private.fake_multi_node.node_provider", "FakeMultiNodeProvider"),
    "with_environment_variables": ("ray.autoscaler._private.command_runner", "_with_environment_variables"),
    "ProcessRunnerError": ("ray.autoscaler._private.subprocess_output_util", "ProcessRunnerError"),
    "GCPNodeProvider": ("ray.autoscaler._private.gcp.node_provider", "GCPNodeProvider"),
    "gcp_retry": ("ray.autoscaler._private.gcp.node_provider", "_retry"),
    "build_request": ("ray.autoscaler._private.gcp.config", "build_request"),
    "construct_clients_from_provider_config": ("ray.autoscaler._private.gcp.config",
                                               "construct_clients_from_provider_config"),
    "get_node_type": ("ray.autoscaler._private.gcp.config", "get_node_type"),
    "GCPCompute": ("ray.autoscaler._private.gcp.node", "GCPCompute"),
    "GCPTPU": ("ray.autoscaler._private.gcp.node", "GCPTPU"),
    "GCPNodeType": ("ray.autoscaler._private.gcp.node", "GCPNodeType"),
    "GCPResource": ("ray.autoscaler._private.gcp.node", "GCPResource"),
    # Which autoscaler runs: v1 counts a draining VM until GCE stops it, v2 does not (preemption/replacements.py).
    "is_autoscaler_v2": ("ray.autoscaler.v2.utils", "is_autoscaler_v2"),
}

TRAIN_UTIL_LOGGER = "ray.train.v2._internal.util"
"""The logger through which Ray Train logs an exception leaving the training function."""


def __getattr__(name: str) -> Any:
    try:
        module, attribute = PRIVATE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attribute:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def draining_nodes() -> Dict[str, int]:
    """Node id (hex) -> drain deadline (unix ms, 0: none) of every draining node, from the GCS."""
    import ray._private.state

    return ray._private.state.state.get_draining_nodes()


def preempted_node_to_ranks():
    """This worker's copy of Ray Train's preemption signal: {node id: ranks}, or None."""
    info = __getattr__("get_train_context")().preemption_context.preemption_info
    return None if info is None else info.preempted_node_to_ranks


def session_logs_dir() -> str:
    """The logs directory of the Ray session this process is connected to."""
    import ray._private.worker

    return ray._private.worker._global_node.get_logs_dir_path()
