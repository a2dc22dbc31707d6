"""Check a cluster YAML before ``ray up``, and say what it will cost.

    python -m raytrain_spot.cluster.check cluster/gcp-spot.yaml

Loads the file through Ray's own preparation and schema validation (``prepare_config``, the
provider's ``fillout_available_node_types_resources``, ``validate_config``: what ``ray up``
does before it calls the cloud; nothing here calls GCP), then reviews what Ray's schema
cannot know: a Spot head, a list-form ``scheduling``, Spot workers that GCE would stop
instead of delete, GPUs on machine types that do not take them, a head with training
resources, an on-demand GPU type that can grow, labels the framework reads that disagree
with the node config, zone URLs for another zone, a missing preemption watcher, an advance
preemption notice (``scheduling.preemptionNoticeDuration``) GCE would refuse or the watcher's
``--notice-s`` does not match, values still to fill in. Every
problem names the node type, the key and the fix. Exit status: 0 fine, 1 problems, 2 the
file does not load.

The summary and its prices: ``yaml_summary``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from raytrain_spot.cluster.cluster_yaml import ON_DEMAND, SPOT, ClusterConfigError, Problem, is_gcp, load, pricing_of
from raytrain_spot.cluster.gcp.machines import gpus_of
from raytrain_spot.cluster.gcp_checks import (check_gcp_node, check_installs, check_on_demand_growth, check_provider,
                                              check_zones, warnings)
from raytrain_spot.cluster.gpu_checks import check_gpu_stack
from raytrain_spot.cluster.token_auth import TOKEN_PATH, check_local_token, check_token_auth, new_token
from raytrain_spot.cluster.watcher_checks import check_watcher
from raytrain_spot.cluster.yaml_summary import catalog_lookup, format_summary, summarize
from raytrain_spot.cost.pricing import PriceCatalog
from raytrain_spot.preemption.node_events import NODE_TYPE_LABEL, PRICING_LABEL

PLACEHOLDER = "FILL-IN"


def review(config: dict) -> List[Problem]:
    """Every problem in a prepared config (see ``prepare``); empty when it is fine."""
    gcp = is_gcp(config)
    problems: List[Problem] = []
    head_name = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        is_head = name == head_name
        problems += _check_labels(name, node_type, gcp)
        if is_head:
            problems += _check_head(name, node_type, gcp)
        if gcp:
            problems += check_gcp_node(name, node_type, is_head)
            if not is_head:
                problems += check_on_demand_growth(name, node_type)
    if gcp:
        problems += check_provider(config)
        problems += check_zones(config)
        problems += check_watcher(config)
        problems += check_token_auth(config)
        problems += check_gpu_stack(config)
        problems += check_installs(config)
    problems += _check_placeholders(config)
    return problems


def _check_placeholders(config: dict) -> List[Problem]:
    problems = []

    def visit(value, path: List[str]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, path + [str(key)])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, path[:-1] + [f"{path[-1]}[{index}]"] if path else [f"[{index}]"])
        elif isinstance(value, str) and PLACEHOLDER in value:
            in_node_type = len(path) > 2 and path[0] == "available_node_types"
            problems.append(Problem(path[1] if in_node_type else "cluster", ".".join(path[2:] if in_node_type else path),
                                    f"still holds the placeholder {value!r}",
                                    "replace it with your value (the comment beside it says which)"))

    visit(config, [])
    return problems


def _check_labels(name: str, node_type: dict, gcp: bool) -> List[Problem]:
    labels = node_type.get("labels") or {}
    problems = []
    if labels.get(NODE_TYPE_LABEL) != name:
        problems.append(Problem(name, f"labels.{NODE_TYPE_LABEL}",
                                f"is {labels.get(NODE_TYPE_LABEL)!r}; the framework tells node types apart by it",
                                f"set labels: {{{NODE_TYPE_LABEL}: {name}}}"))
    expected = pricing_of(node_type, gcp)
    label = labels.get(PRICING_LABEL)
    if label not in (SPOT, ON_DEMAND):
        problems.append(Problem(name, f"labels.{PRICING_LABEL}", f"is {label!r}; the ledger prices nodes by it",
                                f"set labels: {{{PRICING_LABEL}: {expected}}}"))
    elif gcp and label != expected:
        meant = ("meant as the on-demand fallback of a hybrid cluster, but it would run as Spot"
                 if label == ON_DEMAND else "labelled Spot, but it would run on demand")
        problems.append(Problem(name, "node_config.scheduling.provisioningModel", meant,
                                "set provisioningModel: STANDARD for an on-demand fallback"
                                if label == ON_DEMAND else f"set labels: {{{PRICING_LABEL}: {expected}}} "
                                                          "or make the type Spot"))
    return problems


def _check_head(name: str, node_type: dict, gcp: bool) -> List[Problem]:
    problems = []
    resources = node_type.get("resources") or {}
    for resource in ("CPU", "GPU"):
        if resources.get(resource, 0) > 0:
            problems.append(Problem(name, f"resources.{resource}",
                                    f"is {resources[resource]}: the head would run training work and be busy "
                                    "when it must coordinate", "set resources: {CPU: 0} on the head"))
    if "CPU" not in resources:
        problems.append(Problem(name, "resources", "has no CPU entry, so Ray counts the machine's cores and "
                                "schedules training work on the head", "set resources: {CPU: 0} on the head"))
    if gcp and pricing_of(node_type, gcp) == SPOT:
        problems.append(Problem(name, "node_config.scheduling",
                                "makes the head Spot: a preemption would take GCS, the Train controller and "
                                "the driver with it", "set scheduling: {provisioningModel: STANDARD} on the head"))
    if gcp and gpus_of(node_type.get("node_config", {})):
        problems.append(Problem(name, "node_config.machineType",
                                f"{gpus_of(node_type['node_config'])} on the head pay for GPUs that never train",
                                "use a CPU machine type such as n2-standard-8 for the head"))
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_spot.cluster.check", description=__doc__.split("\n")[0])
    parser.add_argument("yaml", nargs="*", help="cluster YAML file(s)")
    parser.add_argument("--prices", default=None, help="user price file (JSON or YAML) merged over the catalog")
    parser.add_argument("--new-token", action="store_true",
                        help=f"create the cluster's Ray token at {TOKEN_PATH} (mode 600) if there is none; "
                             "the GCP YAMLs copy it to every node")
    args = parser.parse_args(argv)
    if args.new_token:
        created = new_token()
        print(f"{'created' if created else 'kept the existing'} {os.path.expanduser(TOKEN_PATH)} (mode 600)")
    elif not args.yaml:
        parser.error("name a cluster YAML, or pass --new-token")
    # Ray's config preparation logs defaults it fills in; the summary says what matters.
    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)
    status = 0
    for path in args.yaml:
        try:
            config = load(path)
        except ClusterConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        catalog = PriceCatalog.load(args.prices)
        print(format_summary(summarize(config, catalog_lookup(catalog))))
        for warning in warnings(config, catalog):
            print(f"  warning: {warning}", file=sys.stderr)
        problems = review(config) + check_local_token(config)
        for problem in problems:
            print(f"  problem: {problem}", file=sys.stderr)
        if problems:
            print(f"{path}: {len(problems)} problem(s); fix them before `ray up`.", file=sys.stderr)
            status = max(status, 1)
        else:
            print(f"{path}: ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
