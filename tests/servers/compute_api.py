"""A local Compute Engine v1 REST API: the subset Ray's GCP node provider calls, on 127.0.0.1.

Speaks the real paths and JSON shapes (``/compute/v1/projects/{project}/zones/{zone}/...``)
so that a ``googleapiclient`` client built from the static discovery document, with its
endpoint pointed here, runs exactly the code Ray runs against Google:

    instances: insert, get, list (with the filter expressions Ray builds), delete,
               setLabels (label fingerprints enforced), stop, start
    zoneOperations: get, wait

Inserts are validated the way GCE does for the mistakes a cluster YAML can make: zone URLs
that name another zone, a ``scheduling`` that is not an object, Spot with automatic restart,
GPUs with live migration. Capacity faults read like sentences::

    api.exhaust(zone="us-central1-a")           # inserts end in ZONE_RESOURCE_POOL_EXHAUSTED
    api.quota_exceeded(region="us-central1")    # inserts answer 403 QUOTA_EXCEEDED
    api.restore(zone="us-central1-a")           # capacity is back
    api.preempt("ray-worker-1")                 # GCE preempts a Spot VM (DELETE: it is gone)

Operations come back RUNNING from the insert and DONE (or failed) on the first poll, so
Ray's pollers never sleep. Authorization headers are accepted and never recorded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"
API_PREFIX = "/compute/v1/"
# Machine series whose GPUs come with the machine type (no guestAccelerators).
_ACCELERATOR_OPTIMIZED_PREFIXES = ("a2-", "a3-", "a4-", "g2-", "g4-")
_INSTANCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE_IN_URL = re.compile(r"(?:^|/)zones/([^/]+)/")


class ApiError(Exception):
    """An HTTP error answer, in the JSON shape googleapiclient's HttpError parses."""

    def __init__(self, status: int, reason: str, message: str, domain: str = "global"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"code": status, "message": message,
                               "errors": [{"message": message, "domain": domain, "reason": reason}]}}


@dataclass
class _ZoneFault:
    """What an insert into a zone meets instead of capacity."""

    operation_error: Optional[dict] = None
    """Error the insert's operation ends with (stockouts surface this way)."""
    http_error: Optional[Callable[[], ApiError]] = None
    """Error the insert call itself answers with (quota surfaces this way)."""


@dataclass
class InsertRecord:
    """One instances.insert request as received."""

    zone: str
    body: dict
    accepted: bool
    """False when validation or a fault rejected it (no instance was created)."""


@dataclass
class DeleteRecord:
    """One instances.delete request as received."""

    zone: str
    name: str
    found: bool
    """False when the instance was already gone (answered 404 notFound)."""


@dataclass
class _State:
    project: str
    instances: Dict[Tuple[str, str], dict] = field(default_factory=dict)
    operations: Dict[Tuple[str, str], dict] = field(default_factory=dict)
    faults: Dict[str, _ZoneFault] = field(default_factory=dict)
    inserts: List[InsertRecord] = field(default_factory=list)
    deletes: List[DeleteRecord] = field(default_factory=list)
    preempt_after_list: Set[Tuple[str, str]] = field(default_factory=set)
    """Instances (zone, name) that GCE preempts right after a list answer includes them."""


def _region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def _fingerprint(labels: dict) -> str:
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# List filters: the AIP-160 subset Ray's GCPCompute.list_instances produces, e.g.
# ((labels.ray-node-kind = worker)) AND ((status = RUNNING) OR (status = STAGING))
#   AND (labels.ray-cluster-name = c) AND (NOT labels.tpu_cores:*)
# As in AIP-160, OR binds tighter than AND.
# ---------------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s*(\(|\)|!=|=|:\*|"[^"]*"|[^\s()=!:"]+)')


def _tokenize(text: str) -> List[str]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise ApiError(400, "invalid", f"Invalid list filter expression {text!r} at {position}")
        tokens.append(match.group(1))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return tokens


def _field_value(instance: dict, name: str) -> Optional[str]:
    if name.startswith("labels."):
        return instance.get("labels", {}).get(name[len("labels."):])
    if name in ("status", "name"):
        return instance.get(name)
    raise ApiError(400, "invalid", f"Invalid list filter field {name!r}")


def compile_filter(text: str) -> Callable[[dict], bool]:
    """Parse a list filter into a predicate over instance resources."""
    tokens = _tokenize(text) if text and text.strip() else []
    position = 0

    def peek() -> Optional[str]:
        return tokens[position] if position < len(tokens) else None

    def take(expected: Optional[str] = None) -> str:
        nonlocal position
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise ApiError(400, "invalid", f"Invalid list filter {text!r}: expected {expected or 'a term'}")
        position += 1
        return token

    def conjunction():
        parts = [disjunction()]
        while peek() == "AND":
            take("AND")
            parts.append(disjunction())
        return lambda inst: all(part(inst) for part in parts)

    def disjunction():
        parts = [term()]
        while peek() == "OR":
            take("OR")
            parts.append(term())
        return lambda inst: any(part(inst) for part in parts)

    def term():
        if peek() == "NOT":
            take("NOT")
            inner = term()
            return lambda inst: not inner(inst)
        if peek() == "(":
            take("(")
            inner = conjunction()
            take(")")
            return inner
        name = take()
        operator = take()
        if operator == ":*":
            return lambda inst: _field_value(inst, name) is not None
        value = take().strip('"')
        if operator == "=":
            return lambda inst: _field_value(inst, name) == value
        if operator == "!=":
            return lambda inst: _field_value(inst, name) != value
        raise ApiError(400, "invalid", f"Invalid list filter operator {operator!r}")

    if not tokens:
        return lambda inst: True
    predicate = conjunction()
    if peek() is not None:
        raise ApiError(400, "invalid", f"Invalid list filter {text!r}: unexpected {peek()!r}")
    return predicate


class ComputeEngineEmulator:
    """A Compute Engine REST API on 127.0.0.1 for one project. Use as a context manager."""

    def __init__(self, project: str = "emulated-project"):
        self._state = _State(project=project)
        self._lock = threading.Lock()
        self._ids = itertools.count(1000)
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "ComputeEngineEmulator":
        handler = type("Handler", (_Handler,), {"emulator": self})
        self._server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="compute-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ComputeEngineEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def project(self) -> str:
        return self._state.project

    @property
    def endpoint(self) -> str:
        """Value for googleapiclient's ``client_options={"api_endpoint": ...}``."""
        assert self._server is not None, "start() the emulator first"
        return f"http://{LOOPBACK}:{self._server.server_address[1]}{API_PREFIX}"

    # -- fault injection -----------------------------------------------------------------
    def exhaust(self, zone: str, *, with_details: bool = False) -> None:
        """Inserts into ``zone`` end in a stockout, as GCE reports it: a failed operation."""
        code = "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS" if with_details else "ZONE_RESOURCE_POOL_EXHAUSTED"
        message = (f"The zone 'projects/{self.project}/zones/{zone}' does not have enough resources "
                   "available to fulfill the request.  Try a different zone, or try again later.")
        with self._lock:
            self._state.faults[zone] = _ZoneFault(operation_error={"errors": [{"code": code, "message": message}]})

    def quota_exceeded(self, *, region: Optional[str] = None, zone: Optional[str] = None,
                       metric: str = "PREEMPTIBLE_NVIDIA_A100_GPUS", limit: float = 0.0) -> None:
        """Inserts answer HTTP 403 QUOTA_EXCEEDED, as GCE does for regional quota.

        ``region`` fails every zone of the region (quota is regional, so the message names the
        region); ``zone`` alone fails just that zone, with the same regional message.
        """
        if (region is None) == (zone is None):
            raise ValueError("name exactly one of region= or zone=")
        scope_region = region or _region_of(zone)
        message = f"Quota '{metric}' exceeded.  Limit: {limit:.1f} in region {scope_region}."

        def error() -> ApiError:
            return ApiError(403, "quotaExceeded", message, domain="usageLimits")

        with self._lock:
            if zone is not None:
                self._state.faults[zone] = _ZoneFault(http_error=error)
            else:
                self._state.faults[f"region:{region}"] = _ZoneFault(http_error=error)

    def restore(self, *, zone: Optional[str] = None, region: Optional[str] = None) -> None:
        """Capacity and quota are back in ``zone`` (or ``region``; neither: everywhere)."""
        with self._lock:
            if zone is None and region is None:
                self._state.faults.clear()
            if zone is not None:
                self._state.faults.pop(zone, None)
            if region is not None:
                self._state.faults.pop(f"region:{region}", None)

    def preempt(self, name: str, *, after_next_list: bool = False) -> None:
        """GCE preempts the Spot VM ``name``, acting on its ``scheduling.instanceTerminationAction``.

        DELETE: the VM deletes itself; from then on a get or delete of it answers 404 notFound,
        as GCE does. STOP (GCE's default): it stays, TERMINATED. ``after_next_list``: the
        preemption lands right after the next list answer that includes the VM, i.e. while the
        caller (the autoscaler) is between its list and its own delete of that VM.
        """
        with self._lock:
            keys = [k for k in self._state.instances if k[1] == name]
            if not keys:
                raise ValueError(f"no instance {name!r} to preempt")
            for key in keys:
                if self._state.instances[key].get("scheduling", {}).get("provisioningModel") != "SPOT":
                    raise ValueError(f"{name!r} is not a Spot VM: GCE does not preempt it")
                if after_next_list:
                    self._state.preempt_after_list.add(key)
                else:
                    self._preempt(key)

    def _preempt(self, key: Tuple[str, str]) -> None:
        action = self._state.instances[key].get("scheduling", {}).get("instanceTerminationAction", "STOP")
        if action == "DELETE":
            del self._state.instances[key]
        else:
            self._state.instances[key]["status"] = "TERMINATED"

    # -- inspection ----------------------------------------------------------------------
    def inserts(self, *, zone: Optional[str] = None) -> List[InsertRecord]:
        """Every instances.insert received, in order (accepted or not)."""
        with self._lock:
            return [r for r in self._state.inserts if zone is None or r.zone == zone]

    def deletes(self) -> List[DeleteRecord]:
        """Every instances.delete received, in order (found or not)."""
        with self._lock:
            return list(self._state.deletes)

    def instances(self, *, zone: Optional[str] = None) -> List[dict]:
        """The instances that exist now."""
        with self._lock:
            return [json.loads(json.dumps(i)) for (z, _), i in sorted(self._state.instances.items())
                    if zone is None or z == zone]

    # -- request handling (called from the HTTP handler) ---------------------------------
    def _url(self, path: str) -> str:
        return f"{self.endpoint}projects/{self.project}/{path}"

    def _fault_for(self, zone: str) -> Optional[_ZoneFault]:
        return self._state.faults.get(zone) or self._state.faults.get(f"region:{_region_of(zone)}")

    def _new_operation(self, zone: str, kind: str, target: str, error: Optional[dict] = None) -> dict:
        name = f"operation-{next(self._ids)}"
        operation = {
            "kind": "compute#operation", "id": str(next(self._ids)), "name": name,
            "zone": self._url(f"zones/{zone}"), "operationType": kind, "targetLink": target,
            "status": "RUNNING", "progress": 0, "selfLink": self._url(f"zones/{zone}/operations/{name}"),
        }
        done = dict(operation, status="DONE", progress=100)
        if error is not None:
            done.update(error=error, httpErrorStatusCode=503, httpErrorMessage="SERVICE UNAVAILABLE")
        self._state.operations[(zone, name)] = done
        return operation

    def _check_zone_urls(self, zone: str, body: dict) -> None:
        def check(key: str, value: str) -> None:
            match = _ZONE_IN_URL.search(value)
            if not match:
                raise ApiError(400, "invalid", f"Invalid value for field '{key}': '{value}'. The URL is malformed.")
            if match.group(1) != zone:
                raise ApiError(400, "invalid", f"Invalid value for field '{key}': '{value}'. "
                                               f"Resource must be in zone '{zone}'.")

        check("resource.machineType", str(body.get("machineType", "")))
        for index, accelerator in enumerate(body.get("guestAccelerators", []) or []):
            check(f"resource.guestAccelerators[{index}].acceleratorType", str(accelerator.get("acceleratorType", "")))
        for index, disk in enumerate(body.get("disks", []) or []):
            disk_type = (disk.get("initializeParams") or {}).get("diskType")
            if disk_type is not None:
                check(f"resource.disks[{index}].initializeParams.diskType", str(disk_type))

    def _check_scheduling(self, body: dict) -> None:
        scheduling = body.get("scheduling", {})
        if not isinstance(scheduling, dict):
            raise ApiError(400, "invalid", "Invalid value at 'resource.scheduling' "
                                           "(type.googleapis.com/google.cloud.compute.v1.Scheduling), expected an object")
        machine = str(body.get("machineType", "")).rsplit("/", 1)[-1]
        has_gpus = bool(body.get("guestAccelerators")) or machine.startswith(_ACCELERATOR_OPTIMIZED_PREFIXES)
        if has_gpus and scheduling.get("onHostMaintenance", "MIGRATE") != "TERMINATE":
            raise ApiError(400, "invalid", "Instances with guest accelerators do not support live migration. "
                                           "Set scheduling.onHostMaintenance to TERMINATE.")
        if scheduling.get("provisioningModel") == "SPOT" and scheduling.get("automaticRestart", False):
            raise ApiError(400, "invalid", "Invalid value for field 'resource.scheduling.automaticRestart': 'true'. "
                                           "Spot instances cannot be restarted automatically.")

    def insert(self, zone: str, body: dict) -> dict:
        with self._lock:
            record = InsertRecord(zone=zone, body=json.loads(json.dumps(body)), accepted=False)
            self._state.inserts.append(record)
            name = str(body.get("name", ""))
            if not _INSTANCE_NAME.fullmatch(name):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
            if (zone, name) in self._state.instances:
                raise ApiError(409, "alreadyExists", f"The resource 'projects/{self.project}/zones/{zone}/instances/"
                                                     f"{name}' already exists")
            self._check_zone_urls(zone, body)
            self._check_scheduling(body)
            target = self._url(f"zones/{zone}/instances/{name}")
            fault = self._fault_for(zone)
            if fault is not None and fault.http_error is not None:
                raise fault.http_error()
            if fault is not None and fault.operation_error is not None:
                return self._new_operation(zone, "insert", target, error=fault.operation_error)
            record.accepted = True
            serial = next(self._ids)
            interfaces = json.loads(json.dumps(body.get("networkInterfaces") or [{}]))
            for interface in interfaces:
                # Documentation ranges: nothing here routes anywhere.
                interface["networkIP"] = f"10.128.{serial // 250 % 250}.{serial % 250 + 2}"
                for access in interface.get("accessConfigs", []):
                    access["natIP"] = f"203.0.113.{serial % 250 + 2}"
            labels = dict(body.get("labels", {}))
            instance = dict(json.loads(json.dumps(body)), kind="compute#instance", id=str(serial),
                            zone=self._url(f"zones/{zone}"), status="RUNNING", labels=labels,
                            labelFingerprint=_fingerprint(labels), networkInterfaces=interfaces,
                            selfLink=target)
            self._state.instances[(zone, name)] = instance
            return self._new_operation(zone, "insert", target)

    def _instance(self, zone: str, name: str) -> dict:
        instance = self._state.instances.get((zone, name))
        if instance is None:
            raise ApiError(404, "notFound",
                           f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found")
        return instance

    def get(self, zone: str, name: str) -> dict:
        with self._lock:
            return self._instance(zone, name)

    def list(self, zone: str, filter_text: str) -> dict:
        predicate = compile_filter(filter_text)
        with self._lock:
            listed = [(k, i) for k, i in sorted(self._state.instances.items()) if k[0] == zone and predicate(i)]
            items = [json.loads(json.dumps(i)) for _, i in listed]
            for key in [k for k, _ in listed if k in self._state.preempt_after_list]:
                self._state.preempt_after_list.discard(key)
                self._preempt(key)
        response = {"kind": "compute#instanceList", "id": f"projects/{self.project}/zones/{zone}/instances",
                    "selfLink": self._url(f"zones/{zone}/instances")}
        if items:  # GCE leaves "items" out of an empty list, and Ray copes with that
            response["items"] = items
        return response

    def delete(self, zone: str, name: str) -> dict:
        with self._lock:
            record = DeleteRecord(zone=zone, name=name, found=(zone, name) in self._state.instances)
            self._state.deletes.append(record)
            self._instance(zone, name)
            del self._state.instances[(zone, name)]
            return self._new_operation(zone, "delete", self._url(f"zones/{zone}/instances/{name}"))

    def set_labels(self, zone: str, name: str, body: dict) -> dict:
        with self._lock:
            instance = self._instance(zone, name)
            if body.get("labelFingerprint") != instance["labelFingerprint"]:
                raise ApiError(412, "conditionNotMet", "Labels fingerprint either invalid or resource labels have changed")
            instance["labels"] = dict(body.get("labels", {}))
            instance["labelFingerprint"] = _fingerprint(instance["labels"])
            return self._new_operation(zone, "setLabels", instance["selfLink"])

    def set_status(self, zone: str, name: str, kind: str) -> dict:
        with self._lock:
            instance = self._instance(zone, name)
            instance["status"] = "TERMINATED" if kind == "stop" else "RUNNING"
            return self._new_operation(zone, kind, instance["selfLink"])

    def operation(self, zone: str, name: str) -> dict:
        with self._lock:
            operation = self._state.operations.get((zone, name))
            if operation is None:
                raise ApiError(404, "notFound",
                               f"The resource 'projects/{self.project}/zones/{zone}/operations/{name}' was not found")
            return operation


_ROUTES = [
    ("POST", re.compile(r"zones/([^/]+)/instances"), "insert"),
    ("GET", re.compile(r"zones/([^/]+)/instances"), "list"),
    ("GET", re.compile(r"zones/([^/]+)/instances/([^/]+)"), "get"),
    ("DELETE", re.compile(r"zones/([^/]+)/instances/([^/]+)"), "delete"),
    ("POST", re.compile(r"zones/([^/]+)/instances/([^/]+)/setLabels"), "setLabels"),
    ("POST", re.compile(r"zones/([^/]+)/instances/([^/]+)/(stop|start)"), "stopStart"),
    ("GET", re.compile(r"zones/([^/]+)/operations/([^/]+)"), "operation"),
    ("POST", re.compile(r"zones/([^/]+)/operations/([^/]+)/wait"), "operation"),
]


class _Handler(BaseHTTPRequestHandler):
    emulator: ComputeEngineEmulator
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; with Nagle on, each answer waits ~40 ms
    # for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # keep test output clean; requests are inspectable through the emulator

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        emulator = self.emulator
        try:
            prefix = f"{API_PREFIX}projects/{emulator.project}/"
            if not url.path.startswith(prefix):
                raise ApiError(404, "notFound", f"Unknown project or path {url.path}")
            rest = url.path[len(prefix):]
            body = json.loads(raw) if raw else {}
            for route_method, pattern, action in _ROUTES:
                match = pattern.fullmatch(rest)
                if route_method != method or not match:
                    continue
                groups = match.groups()
                if action == "insert":
                    result = emulator.insert(groups[0], body)
                elif action == "list":
                    result = emulator.list(groups[0], query.get("filter", [""])[0])
                elif action == "get":
                    result = emulator.get(*groups)
                elif action == "delete":
                    result = emulator.delete(*groups)
                elif action == "setLabels":
                    result = emulator.set_labels(groups[0], groups[1], body)
                elif action == "stopStart":
                    result = emulator.set_status(*groups)
                else:
                    result = emulator.operation(*groups)
                self._answer(200, result)
                return
            raise ApiError(404, "notFound", f"No such method: {method} {shlex.quote(rest)}")
        except ApiError as error:
            self._answer(error.status, error.body)
        except json.JSONDecodeError:
            self._answer(400, ApiError(400, "parseError", "Parse Error").body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

