"""The Spot simulator: preemptions and returning capacity on the embedded cluster.

A preemption goes through the same path as on GCE. The node's metadata turns ``TRUE``
(a real HTTP metadata emulator, one port per virtual node), the node's watcher process
drains its Ray node, and ``notice_s`` later the VM powers off: its processes freeze where they
are, its sockets fall silent (no reset reaches a peer) and its local disk is gone, until Ray's
health checks declare the node dead. 30 s before that power-off (at the notice, when
``notice_s`` is 30 or less, as with GCE's default notice) comes the ACPI soft-off: the VM's
systemd stops its units, and every process of the virtual VM gets SIGTERM unless the node's
start commands put it in a service that signals only its main process
(raytrain_spot/simulator/shutdown.py). Capacity coming back adds a node after a
provisioning delay, with a watcher of its own.

Scripts read like sentences::

    [preempt(node=2, at_s=40, notice_s=30), restore(after_s=20), no_notice(node=0, at_step=90)]

or come from a Spot trace (``../shared/traces/``), with one trace tick compressed to ``tick_s``
wall seconds, and the trace's nodes mapped onto the embedded cluster's slots (``scale_trace``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from raytrain_spot.config.schema import ChaosConfig, ChaosEvent
from raytrain_spot.observe.events import EventLog
from raytrain_spot.observe.records import Chaos, Notice, SoftOff
from raytrain_spot.simulator.shutdown import node_start, read_start_commands, shutdown_times
from raytrain_spot.simulator.trace_file import read_trace

logger = logging.getLogger(__name__)


def preempt(node: int = 0, at_s: Optional[float] = None, at_step: Optional[int] = None,
            notice_s: Optional[float] = None, rank: Optional[int] = None, metadata_delay_s: float = 0.0) -> ChaosEvent:
    return ChaosEvent(action="preempt", node=node, rank=rank, at_s=at_s, at_step=at_step, notice_s=notice_s,
                      metadata_delay_s=metadata_delay_s)


def no_notice(node: int = 0, at_s: Optional[float] = None, at_step: Optional[int] = None,
              rank: Optional[int] = None) -> ChaosEvent:
    return ChaosEvent(action="preempt", node=node, rank=rank, at_s=at_s, at_step=at_step, no_notice=True)


def restore(after_s: float = 20.0) -> ChaosEvent:
    return ChaosEvent(action="restore", after_s=after_s)


@dataclass(order=True)
class Action:
    """Something the simulator does at a wall time (seconds after the first step)."""

    at_s: float
    kind: str = field(compare=False)  # notice | soft_off | unit_timeout | kill | add
    node: Optional[int] = field(default=None, compare=False)
    notice_s: float = field(default=0.0, compare=False)


@dataclass
class PoweredOff:
    """A node whose VM lost power: its processes frozen, waiting for Ray to declare it dead."""

    slot: int
    node: object
    helpers: List[subprocess.Popen]
    """Its watcher and Ray service processes, frozen with it."""
    at: float


REAP_AFTER_S = 120.0
"""Longest a powered-off node's frozen processes are kept when Ray has not declared it dead."""


def ray_reports_dead(node_id: str) -> bool:
    """Whether Ray's node table lists the node as dead (its health checks gave up on it)."""
    import ray

    return any(node["NodeID"] == node_id and not node["Alive"] for node in ray.nodes())


def trace_fleet(data: Sequence[int]) -> int:
    """The trace's node count N: its largest count (preemption traces count nodes alive out of a
    fixed request of N, availability traces nodes obtainable up to N; the file names say N too)."""
    return max(max(data, default=0), 1)


def trace_node_streams(data: Sequence[int], fleet: int, rng: random.Random) -> List[List[bool]]:
    """One alive/dead stream per trace node, consistent with the counts: a drop of d takes d of the
    alive nodes, a rise of r brings back r of the dead ones, each chosen uniformly (the trace does
    not say which), so the N streams are exchangeable."""
    alive = set(rng.sample(range(fleet), min(data[0], fleet))) if data else set()
    streams = [[] for _ in range(fleet)]
    for count in data:
        count = min(count, fleet)
        if count < len(alive):
            alive -= set(rng.sample(sorted(alive), len(alive) - count))
        elif count > len(alive):
            alive |= set(rng.sample(sorted(set(range(fleet)) - alive), count - len(alive)))
        for node in range(fleet):
            streams[node].append(node in alive)
    return streams


def scale_trace(data: Sequence[int], num_nodes: int, rng: random.Random, fleet: Optional[int] = None) -> List[int]:
    """Nodes alive per tick on a cluster of ``num_nodes`` slots, from a trace of ``fleet`` nodes.

    The rule (docs/preemption.md, "Replaying a trace on fewer or more nodes"): split the counts
    into per-node streams (``trace_node_streams``) and give each slot one of them.

    - ``num_nodes < fleet``: the slots follow ``num_nodes`` distinct streams sampled at random.
      Each slot is one trace node, so the preemption rate per node is the trace's, and a tick on
      which the trace lost d of its A alive nodes costs the slots d/A of their alive capacity on
      average (hypergeometric), all of it when the whole trace fleet went at once.
    - ``num_nodes > fleet``: every stream drives ``num_nodes // fleet`` slots, and ``num_nodes % fleet``
      streams (at random) one slot more; a multiple of the fleet is an exact multiple of the counts.
    - ``num_nodes == fleet``: the counts themselves.
    """
    fleet = fleet or trace_fleet(data)
    if num_nodes == fleet or not data:
        return [min(count, fleet) for count in data]
    streams = trace_node_streams(data, fleet, rng)
    if num_nodes < fleet:
        copies = dict.fromkeys(rng.sample(range(fleet), num_nodes), 1)
    else:
        extra = set(rng.sample(range(fleet), num_nodes % fleet))
        copies = {node: num_nodes // fleet + (node in extra) for node in range(fleet)}
    return [sum(n for node, n in copies.items() if streams[node][tick]) for tick in range(len(data))]


def trace_targets(data: List[int], num_nodes: int, rng: Optional[random.Random] = None,
                  fleet: Optional[int] = None) -> List[int]:
    """Nodes alive per tick, scaled from the trace's fleet to ``num_nodes`` by ``scale_trace``."""
    return scale_trace(data, num_nodes, rng or random.Random(0), fleet)


def trace_actions(targets: List[int], tick_s: float, notice_s: float, provisioning_s: float,
                  pick: Callable[[List[int], int], List[int]]) -> List[Action]:
    """Notices, kills and adds that make the alive count follow ``targets`` tick by tick.

    ``pick(alive, k)`` chooses which k of the alive node slots a drop takes.
    """
    actions: List[Action] = []
    alive = list(range(targets[0]))
    next_slot = len(alive)
    for tick, target in enumerate(targets[1:], start=1):
        now = tick * tick_s
        if target < len(alive):
            for slot in pick(alive, len(alive) - target):
                alive.remove(slot)
                if notice_s > 0:
                    actions.append(Action(now, "notice", slot, notice_s))
                    actions.append(Action(now + shutdown_times(notice_s).soft_off_s, "soft_off", slot, notice_s))
                actions.append(Action(now + notice_s, "kill", slot))
        for _ in range(target - len(alive)):
            alive.append(next_slot)
            actions.append(Action(now + provisioning_s, "add", next_slot))
            next_slot += 1
    return sorted(actions)


def load_trace(path: str, start_tick: int, max_ticks: Optional[int]) -> List[int]:
    data = read_trace(path)[0][start_tick:]
    return data[:max_ticks] if max_ticks else data


def ray_node_processes(node) -> list:
    """Every process of a virtual node: those Ray started for it and all their descendants
    (psutil.Process objects; a process that is gone is left out)."""
    import ray  # noqa: F401  puts Ray's bundled psutil on sys.path
    import psutil

    found = {}
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                for process in (root, *root.children(recursive=True)):
                    found[process.pid] = process
            except psutil.NoSuchProcess:
                continue
    return list(found.values())


def freeze(node) -> None:
    """Stop every process of a virtual node where it is (SIGSTOP), as a VM that loses power: its
    sockets stay open and silent, so no peer hears a reset."""
    _signal_all(ray_node_processes(node), signal.SIGSTOP)


def _signal_all(processes, sig: signal.Signals) -> None:
    import psutil

    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            continue


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def spawn_tied(command: List[str], env: Dict[str, str], log, hold_sigterm: bool = False) -> subprocess.Popen:
    """Start a helper process that the kernel kills when this process dies, however it dies
    (a SIGKILLed driver included), so no simulator process polls on forever.

    The signal is SIGKILL: SIGTERM would be a preemption notice to a watcher. ``hold_sigterm``
    starts it with SIGTERM blocked, so one sent while it starts waits for its ``sigwait``."""
    parent = os.getpid()

    def die_with_parent() -> None:
        if hold_sigterm:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


class SpotSimulator:
    """Drives preemptions on an EmbeddedCluster. Call ``tick()`` from the main thread.

    Node slots: the cluster's worker nodes at start are slots 0..N-1; every node added later
    takes the next slot. Scripted ``preempt(node=i)`` means the i-th alive node.
    """

    def __init__(self, cfg: ChaosConfig, cluster, events: EventLog, current_step: Callable[[], Optional[int]],
                 on_kill: Callable[[str, bool], None], log_dir: str, rank_nodes: Callable[[], List[str]] = list,
                 node_local_root: Optional[str] = None, clock: Callable[[], float] = time.time,
                 ray_reports_dead: Callable[[str], bool] = ray_reports_dead):
        from raytrain_spot.simulator.metadata_server import MetadataEmulator

        self.cfg = cfg
        self.cluster = cluster
        self.events = events
        self.current_step = current_step
        self.rank_nodes = rank_nodes  # node id of each rank of the current worker group
        self.node_local_root = node_local_root
        self.clock = clock
        self.on_kill = on_kill  # logs the kill (the cluster monitor, so it is logged once)
        self.ray_reports_dead = ray_reports_dead
        self._powered_off: List[PoweredOff] = []
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.metadata = MetadataEmulator()
        self.node_start = node_start(read_start_commands(cfg.node_start))
        logger.info("Each virtual VM as its start commands leave it at the soft-off: %s", self.node_start.describe())
        self.nodes: Dict[int, object] = {}  # slot -> Ray node handle of the alive ones
        self.watchers: Dict[int, subprocess.Popen] = {}
        self.ray_services: Dict[int, subprocess.Popen] = {}  # `ray start --block` of each node in a service
        self._noticed: set[int] = set()
        self._next_slot = 0
        for node in list(cluster.workers):
            self._track(node)
        self._started_at: Optional[float] = None
        self._pending: List[Action] = []
        self._script: List[ChaosEvent] = list(cfg.events) if cfg.mode == "events" else []
        self._ticks = None
        if cfg.mode == "trace":
            rng = random.Random(cfg.seed)
            fleet = trace_fleet(read_trace(cfg.trace)[0])  # of the whole trace, not of the window
            targets = trace_targets(load_trace(cfg.trace, cfg.start_tick, cfg.max_ticks), len(self.nodes), rng,
                                    fleet)
            self._ticks = len(targets)
            self._pending = trace_actions(targets, cfg.tick_s, 0.0 if cfg.no_notice else cfg.notice_s,
                                          cfg.provisioning_s, lambda alive, k: rng.sample(alive, k))
            logger.info("Replaying %s: %d ticks of %.1f s, a %d-node trace on %d slots (%s), %d node losses",
                        cfg.trace, len(targets), cfg.tick_s, fleet, len(self.nodes),
                        "its counts" if fleet == len(self.nodes) else
                        f"{len(self.nodes)} of its node streams sampled" if fleet > len(self.nodes) else
                        "each node stream driving several slots", sum(a.kind == "kill" for a in self._pending))

    # -- nodes ---------------------------------------------------------------------------

    def _track(self, node) -> int:
        slot = self._next_slot
        self._next_slot += 1
        self.nodes[slot] = node
        name = f"worker-{slot}"
        self.metadata.add_node(name)
        if self.node_start.ray.main_only:
            self._start_ray_service(slot, node)
        if not self.cfg.watchers:
            return slot
        with open(os.path.join(self.log_dir, f"watcher-{name}.log"), "ab") as log:
            self.watchers[slot] = spawn_tied(
                [sys.executable, "-m", "raytrain_spot.preemption.watcher", "--node-id", node.node_id,
                 "--address", self.cluster.address, "--notice-s", str(self.cfg.notice_s),
                 "--margin-s", str(self.cfg.margin_s)],
                env={**os.environ, **self.metadata.env(name)}, log=log,
            )
        return slot

    def _start_ray_service(self, slot: int, node) -> None:
        """The service's main process, `ray start --block` (raytrain_spot/simulator/ray_service.py): the
        embedded cluster starts raylets from the driver. Its drain timeout shrinks with a compressed
        window, taken from chaos.notice_s as the watchers' deadlines are."""
        from raytrain_spot._ray import ray_constants

        pids = {kind: [info.process.pid for info in infos] for kind, infos in node.all_processes.items()}
        [raylet] = pids.pop(ray_constants.PROCESS_TYPE_RAYLET)
        others = [pid for group in pids.values() for pid in group]
        drain_s = self.node_start.ray_drain_timeout_s * shutdown_times(self.cfg.notice_s).scale
        command = [sys.executable, "-m", "raytrain_spot.simulator.ray_service", "--address", self.cluster.address,
                   "--node-id", node.node_id, "--drain-timeout-s", f"{drain_s:.3f}", "--raylet-pid", str(raylet)]
        for pid in others:
            command += ["--pid", str(pid)]
        with open(os.path.join(self.log_dir, f"ray-service-worker-{slot}.log"), "ab") as log:
            self.ray_services[slot] = spawn_tied(command, env=dict(os.environ), log=log, hold_sigterm=True)

    def alive_slots(self) -> List[int]:
        return sorted(self.nodes)

    def _notice(self, slot: int, notice_s: float, metadata_delay_s: float = 0.0) -> None:
        self._noticed.add(slot)
        if metadata_delay_s:
            self.metadata.stall(metadata_delay_s, node=f"worker-{slot}")
        self.metadata.preempt(f"worker-{slot}")
        self.events.emit(Notice(node=self.nodes[slot].node_id, notice_s=notice_s))
        logger.info("Preemption notice to worker-%d (%s); killing it in %.1f s", slot, self.nodes[slot].node_id,
                    notice_s)
        if self.cfg.watchers and notice_s != self.cfg.notice_s:
            # The node's watcher was started with --notice-s chaos.notice_s, as a VM's is with its own notice.
            logger.warning("worker-%d is killed %.1f s after its notice, but its watcher's drain deadline assumes "
                           "chaos.notice_s=%.1f (minus chaos.margin_s=%.1f): set chaos.notice_s instead of the "
                           "event's notice_s to keep them together", slot, notice_s, self.cfg.notice_s,
                           self.cfg.margin_s)

    def _soft_off(self, slot: int, notice_s: float, elapsed: float) -> None:
        """GCE's ACPI soft-off: the VM's systemd stops every unit, signalling the node's processes
        where its start commands put them; the power-off (``_power_off``) follows."""
        times = shutdown_times(notice_s)
        node, ray_unit = self.nodes[slot], self.node_start.ray
        if ray_unit.main_only:
            # Only the main process hears it; the units' seconds shrink with a compressed window.
            self.ray_services[slot].send_signal(signal.SIGTERM)
            self._pending.append(Action(elapsed + ray_unit.stop_timeout_s * times.scale, "unit_timeout", slot))
            self._pending.sort()
        else:
            _signal_all(ray_node_processes(node), signal.SIGTERM)
        watcher = self.watchers.get(slot)
        if watcher is not None and watcher.poll() is None:
            watcher.send_signal(signal.SIGTERM)  # a watcher stops with its unit, service or session scope
        self.events.emit(SoftOff(node=node.node_id, ray_unit=ray_unit.unit,
                                 sigterm="ray start --block" if ray_unit.main_only else "every process of Ray's node"))
        logger.info("Soft-off of worker-%d (%s): SIGTERM to %s; power-off in %.1f s", slot, node.node_id,
                    "its Ray service's main process" if ray_unit.main_only else "every process of its Ray node",
                    times.power_off_s - times.soft_off_s)

    def _stop_ray_node(self, slot: int, sig: signal.Signals) -> None:
        _signal_all(ray_node_processes(self.nodes[slot]), sig)

    def _power_off(self, slot: int) -> None:
        """GCE's power-off, at the end of a notice or without one: the VM stops dead. Every process
        of the virtual VM (Ray's, the training's, its watcher) is frozen where it is (SIGSTOP), so
        its sockets stay open and silent: no connection reset reaches a peer, whose collectives
        with it hang as they do on GCE, until Ray's health checks declare the node dead. Then
        ``_reap`` removes the frozen processes; the local disk goes now."""
        node = self.nodes.pop(slot)
        helpers = [helper for helper in (self.watchers.pop(slot, None), self.ray_services.pop(slot, None))
                   if helper is not None and helper.poll() is None]
        for helper in helpers:
            helper.send_signal(signal.SIGSTOP)
        freeze(node)
        self._powered_off.append(PoweredOff(slot, node, helpers, self.clock()))
        self.on_kill(node.node_id, self.cfg.watchers and slot in self._noticed)
        if self.node_local_root:
            shutil.rmtree(os.path.join(self.node_local_root, node.node_id), ignore_errors=True)
        logger.info("Powered off worker-%d (%s): its processes are frozen until Ray declares the node dead", slot,
                    node.node_id)

    def _reap(self) -> None:
        """Remove the powered-off nodes Ray has declared dead (or that it has not declared dead
        ``REAP_AFTER_S`` after their power-off: a wait that long is Ray's, not the simulator's)."""
        for off in list(self._powered_off):
            waited_s = self.clock() - off.at
            if not self.ray_reports_dead(off.node.node_id) and waited_s < REAP_AFTER_S:
                continue
            self._remove(off)
            logger.info("Ray declared worker-%d (%s) dead %.1f s after its power-off%s", off.slot, off.node.node_id,
                        waited_s, "" if waited_s < REAP_AFTER_S else " (not yet: removed anyway)")

    def _remove(self, off: PoweredOff) -> None:
        for helper in off.helpers:
            helper.kill()  # SIGKILL ends a stopped process
        self.cluster.remove_worker_node(off.node)
        self._powered_off.remove(off)

    def _add(self) -> None:
        slot = self._track(self.cluster.add_worker_node())
        logger.info("Capacity back: worker-%d (%s) joined", slot, self.nodes[slot].node_id)

    # -- the clock -----------------------------------------------------------------------

    def tick(self) -> None:
        step = self.current_step()
        if step is None:
            return
        now = self.clock()
        if self._started_at is None:
            self._started_at = now
            self.events.emit(Chaos(mode=self.cfg.mode, trace=self.cfg.trace, tick_s=self.cfg.tick_s,
                                   ticks=self._ticks, notice_s=self.cfg.notice_s, watchers=self.cfg.watchers))
        elapsed = now - self._started_at
        self._schedule_script(elapsed, step)
        while self._pending and self._pending[0].at_s <= elapsed:
            action = self._pending.pop(0)
            if action.kind == "add":
                self._add()
            elif action.node not in self.nodes:
                continue  # already gone
            elif action.kind == "notice":
                self._notice(action.node, action.notice_s)
            elif action.kind == "soft_off":
                self._soft_off(action.node, action.notice_s, action.at_s)
            elif action.kind == "unit_timeout":
                self._stop_ray_node(action.node, signal.SIGKILL)  # systemd: TimeoutStopSec passed
            else:
                self._power_off(action.node)
        self._reap()

    def _schedule_script(self, elapsed: float, step: int) -> None:
        while self._script:
            event = self._script[0]
            if event.action == "restore":
                last_kill = max((a.at_s for a in self._pending if a.kind == "kill"), default=elapsed)
                self._pending.append(Action(max(last_kill, elapsed) + event.after_s, "add"))
            elif (event.at_s is not None and elapsed >= event.at_s) or (
                    event.at_step is not None and step >= event.at_step):
                slot = self._target(event)
                notice_s = 0.0 if event.no_notice else (event.notice_s if event.notice_s is not None
                                                       else self.cfg.notice_s)
                if not event.no_notice:
                    self._notice(slot, notice_s, event.metadata_delay_s)
                    self._pending.append(Action(elapsed + shutdown_times(notice_s).soft_off_s, "soft_off", slot,
                                                notice_s))
                self._pending.append(Action(elapsed + notice_s, "kill", slot))
            else:
                return
            self._script.pop(0)
            self._pending.sort()

    def _target(self, event: ChaosEvent) -> int:
        if event.rank is not None:
            nodes = self.rank_nodes()
            slot = next((s for s, n in self.nodes.items() if event.rank < len(nodes) and n.node_id == nodes[event.rank]),
                        None)
            if slot is None:
                raise ValueError(f"chaos: preempt(rank={event.rank}) but no alive node runs rank {event.rank}")
            return slot
        alive = self.alive_slots()
        if event.node >= len(alive):
            raise ValueError(f"chaos: preempt(node={event.node}) but only {len(alive)} worker nodes are alive")
        return alive[event.node]

    @property
    def done(self) -> bool:
        return not self._script and not self._pending

    def close(self) -> None:
        for off in list(self._powered_off):
            self._remove(off)
        helpers = [*self.watchers.values(), *self.ray_services.values()]
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()  # not SIGTERM: to a watcher or a Ray service that is the soft-off
        for helper in helpers:
            helper.wait(timeout=10)
        self.metadata.close()
