"""Warm standbys on a real embedded cluster: the next actor of the run starts in a prestarted,
preloaded process. Pins Ray's PrestartWorkers call and its preload setting (Ray-internal)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raytrain_spot.config.schema import ClusterConfig, Config, ElasticConfig, TrainerConfig
from raytrain_spot.cluster.embedded import connect
from raytrain_spot.elastic.standby import (STANDBY_MARKER, NoticeStandbys, claim_standby, decide_standbys,
                                           idle_standbys, nodes_share_cores, top_up, warm_nodes, warm_standbys)


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", "/tmp")
        with connect(ClusterConfig(num_worker_nodes=1)) as running:
            yield running


@ray.remote(num_cpus=1, runtime_env={"env_vars": {STANDBY_MARKER: "standby-test"}})
class TrainWorkerStandIn:
    def process(self):
        """This process, and whether it imported the training stack in its preload thread at idle priority."""
        from raytrain_spot.elastic import preload

        return os.getpid(), preload.done.wait(120) and "torch" in sys.modules and preload.at_idle_priority

    def top_up(self, wanted: int):
        return top_up("standby-test", ray.get_runtime_context().get_node_id(), wanted)

    def idle_standbys(self):
        return idle_standbys("standby-test")


@pytest.mark.cluster
def test_the_next_worker_starts_in_a_preloaded_standby(cluster):
    assert nodes_share_cores(), "the embedded head and worker node run on this one machine"
    node_id = cluster.workers[0].node_id
    on_node = NodeAffinitySchedulingStrategy(node_id, soft=False)
    first = TrainWorkerStandIn.options(scheduling_strategy=on_node).remote()
    first_pid, preloaded = ray.get(first.process.remote())
    assert preloaded, "a worker node's processes import torch at idle priority, from before they take work"
    deadline = time.time() + 30
    while node_id not in warm_nodes():  # announced by the preload thread just after its imports
        assert time.time() < deadline, "a preloaded process must announce its node warm"
        time.sleep(0.2)

    assert ray.get(first.top_up.remote(1)) == 1
    deadline = time.time() + 120
    while ray.get(first.idle_standbys.remote()) < 1:
        assert time.time() < deadline, "the prestarted standby never became idle"
        time.sleep(0.5)
    assert ray.get(first.top_up.remote(1)) == 0, "a node with its standby gets no second one"

    ray.kill(first)
    started = time.time()
    second = TrainWorkerStandIn.options(scheduling_strategy=on_node).remote()
    second_pid, preloaded = ray.get(second.process.remote())
    assert psutil.Process(second_pid).create_time() < started, "the new actor must take the standby process"
    assert second_pid != first_pid and preloaded


@ray.remote(num_cpus=1, runtime_env={"env_vars": {STANDBY_MARKER: "warmup-test"}})
class NoticedRankZero:
    """Rank 0 of a group without standbys (``warmup-test``), hearing a notice."""

    def start_group(self):
        claim_standby("warmup-test")
        return os.getpid()

    def warm_up(self, outside_node: str):
        """The notice leaves no rank of the group staying; the restarted group's one worker goes to ``outside_node``."""
        global warmup
        warmup = NoticeStandbys("warmup-test", group_keeps_standbys=False, hurry_s=60, max_workers=1,
                              room_outside=lambda most: {outside_node: most})
        warmup.start({})

    def missing(self):
        return warmup.missing({})

    def process(self):
        from raytrain_spot.elastic import preload

        return os.getpid(), preload.done.wait(120) and preload.at_idle_priority


@pytest.mark.cluster
def test_a_notice_warmup_starts_a_standby_that_imports_at_once_and_the_restart_takes_it(cluster):
    node_id = cluster.workers[0].node_id
    on_node = NodeAffinitySchedulingStrategy(node_id, soft=False)
    rank_zero = NoticedRankZero.options(scheduling_strategy=on_node).remote()
    first_pid = ray.get(rank_zero.start_group.remote())
    assert warm_standbys("warmup-test")[node_id] == 0, "a Train worker's own process is no standby"
    ray.get(rank_zero.warm_up.remote(node_id))
    deadline = time.time() + 120
    while ray.get(rank_zero.missing.remote()) > 0:
        assert time.time() < deadline, "the warm-up's standby never said it was warm"
        time.sleep(0.2)
    assert warm_standbys("warmup-test")[node_id] == 1

    ray.kill(rank_zero)  # the handoff: the next group's worker on this node
    started = time.time()
    restarted = NoticedRankZero.options(scheduling_strategy=on_node).remote()
    pid, at_idle_priority = ray.get(restarted.process.remote())
    assert pid != first_pid and psutil.Process(pid).create_time() < started, "it starts in the warm standby"
    assert not at_idle_priority, "a warm-up's standby imports at normal priority: the group waits for it"
    ray.get(restarted.start_group.remote())
    assert warm_standbys("warmup-test")[node_id] == 0, "taken, it is no standby any more"


def test_the_preload_import_returns_once_the_stack_is_imported_and_its_packages_are_complete():
    """Another thread must never see a module imported whose parent lacks its attribute yet (the
    idle-priority thread can be starved right there): the import returns only when it is done."""
    probe = ("import sys, os; import raytrain_spot.elastic.preload as p; import ray.train; "
             "print(p.done.is_set(), hasattr(ray.train, 'v2'), 'torch._dynamo' in sys.modules, "
             "os.sched_getscheduler(0) == os.SCHED_OTHER)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "True"], out


def test_a_process_that_needs_no_stack_preloads_nothing():
    from raytrain_spot.elastic.standby import NO_PRELOAD

    probe = "import sys; import raytrain_spot.elastic.preload as p; print(p.done.is_set(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, NO_PRELOAD: "1"}).stdout
    assert out.split() == ["True", "False"], "the controller's copy-on starts beside a restarting group"


def test_a_runs_processes_preload_its_tasks_modules_too():
    from raytrain_spot.elastic.standby import TASK_MODULES
    from raytrain_spot.loop.ray_trainer import task_modules

    modules = task_modules("raytrain_spot.tasks.hf_vlm.task.HuggingFaceVLMTask")
    assert modules == "raytrain_spot.tasks.hf_vlm.task,transformers.modeling_utils,peft"
    probe = ("import sys; import raytrain_spot.elastic.preload; "
             f"print(all(m in sys.modules for m in {modules.split(',')!r}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, TASK_MODULES: modules}).stdout
    assert out.split() == ["True"], out


@pytest.mark.parametrize("setting, gpu, shared, expected", [
    (None, True, False, True),  # a GCP GPU cluster: the imports take the node's idle cores
    (None, True, True, False),  # nodes on one machine share its cores
    (None, False, False, False),  # CPU training keeps the node's cores busy
    (True, False, True, True), (False, True, False, False)])  # a setting decides everywhere
def test_standbys_default_to_on_only_where_their_imports_take_idle_cores(setting, gpu, shared, expected):
    reads = []
    decision = decide_standbys(Config(trainer=TrainerConfig(use_gpu=gpu), elastic=ElasticConfig(warm_standby=setting)),
                               spot_aware=True,
                               nodes_share_cores=lambda: reads.append(1) or shared)
    assert decision.enabled is expected
    assert bool(reads) is (setting is None and gpu), "the node table is read only where it decides"
    assert ("elastic.warm_standby=true" in decision.reason) is (setting is None and not expected), \
        "a default that turns standbys off names the setting that turns them on"
    plain = Config(elastic=ElasticConfig(warm_standby=True))
    assert not decide_standbys(plain, spot_aware=False, nodes_share_cores=lambda: False).enabled
