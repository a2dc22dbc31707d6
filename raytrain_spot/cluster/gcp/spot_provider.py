"""Ray's GCP node provider, made to survive Spot VMs that delete themselves.

A Spot VM with ``instanceTerminationAction: DELETE`` deletes itself when GCE preempts it, so
the autoscaler's own delete of that VM can answer HTTP 404. Ray 2.60's
``GCPNodeProvider.terminate_node`` logs the 404 and then returns a variable it never set
(``UnboundLocalError``); the autoscaler counts every such error and never forgets one, and after
``AUTOSCALER_MAX_NUM_FAILURES`` (5) of them the monitor exits: no preempted worker is replaced
again. This subclass treats "already gone" as done. Everything else is Ray's.

Use it from a cluster YAML (the package must be installed where ``ray up`` runs and on the
head, whose autoscaler loads it); the keys are Ray's ``type: gcp`` ones::

    provider:
      type: external
      module: raytrain_spot.cluster.gcp.spot_provider.SpotGCPNodeProvider
      project_id: my-project
      region: us-central1
      availability_zone: us-central1-a
      compute_api_endpoint: https://...    # optional: another Compute API base URL
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from googleapiclient import discovery
from googleapiclient.errors import HttpError

from raytrain_spot._ray import GCPCompute, GCPNodeProvider, GCPNodeType, build_request, gcp_retry

logger = logging.getLogger(__name__)

ENDPOINT_KEY = "compute_api_endpoint"
"""Provider key: Compute API base URL, e.g. a Private Service Connect endpoint; unset: Google's."""


def build_compute_client(credentials: Any = None, endpoint: Optional[str] = None) -> Any:
    """A Compute v1 client built as Ray builds it (static discovery, Ray's request builder).

    ``credentials`` None means Application Default Credentials, as in Ray; ``endpoint``
    replaces Google's base URL (``.../compute/v1/``).
    """
    return discovery.build("compute", "v1", credentials=credentials, requestBuilder=build_request,
                           cache_discovery=False, static_discovery=True,
                           client_options={"api_endpoint": endpoint} if endpoint else None)


class SpotGCPNodeProvider(GCPNodeProvider):
    """``GCPNodeProvider`` for which a VM that is already gone is a VM terminated."""

    def _construct_clients(self) -> None:
        super()._construct_clients()  # Ray's credential handling (gcp_credentials, else ADC)
        endpoint = self.provider_config.get(ENDPOINT_KEY)
        if endpoint:
            ray_compute = self.resources[GCPNodeType.COMPUTE]
            self.resources[GCPNodeType.COMPUTE] = GCPCompute(
                build_compute_client(ray_compute.resource._http.credentials, endpoint), ray_compute.project_id,
                ray_compute.availability_zone, self.cluster_name)

    @gcp_retry
    def terminate_node(self, node_id: str):
        with self.lock:
            resource = self._get_resource_depending_on_node_name(node_id)
            try:
                if not self.cache_stopped_nodes:
                    return resource.delete_instance(node_id=node_id)
                if self._get_cached_node(node_id).is_running():
                    return resource.stop_instance(node_id=node_id)
                return None
            except HttpError as error:
                if error.resp.status != 404:
                    raise
                # GCE deleted it first: a Spot VM with instanceTerminationAction DELETE, preempted.
                logger.info("node %s is already gone (GCE deleted it); nothing to terminate", node_id)
                return None
