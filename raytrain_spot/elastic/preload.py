"""What every worker process on a worker node imports before it takes work (``RAY_preload_python_modules``).

It imports the training stack in a thread at idle priority (Linux ``SCHED_IDLE``) and waits
for it, so the imports mostly yield the CPU to anything else that wants it, and the process's main
thread, the one that later runs the training function, keeps its normal priority (an
unprivileged thread cannot return from idle priority). Idle priority is not free where nodes
share cores, as the embedded cluster's share this machine's: the scheduler still gives an
idle-priority thread a small weight against Ray's nice-15 workers (3 against 36), and a group's
standbys were measured taking 0.4 of the machine's 2 cores while they imported, the
Train workers' share falling by a fifth (``python bench/bench_hf_vlm.py --modes plain-ray-train
raytrain-spot raytrain-spot-warm``, its cores by process kind; docs/benchmarks.md), which is why
standbys default to off there (elastic/standby.py's ``decide_standbys``). On a cluster each
node's own idle cores pay.

A standby started for a notice warm-up imports at normal priority instead (elastic/standby.py's
``standbys_hurried``): the group waits for it, training on, and pays for its imports once.

Once the stack is in, the process announces its node warm (elastic/standby.py's ``announce_warm``).

A process that needs none of the stack (the controller's copy-on, checkpoint/copy_on.py) has
``NO_PRELOAD`` in its runtime environment and imports nothing here.

The main thread waits instead of going on to take work because Python's imports are not safe
to race against an idle-priority thread: a module counts as imported a moment before its
parent package gets the attribute for it, and a starved thread can hold that moment for
seconds (seen: Ray Train's logging setup failing with "module 'ray.train' has no attribute
'v2'"). Ray starts the worker's task loop after this import, so the process takes no work
until the stack is in. Kept free of heavy imports itself: it runs in every worker process.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import List

from raytrain_spot.elastic.standby import NO_PRELOAD

MODULES = ("torch", "torch._dynamo", "raytrain_spot.loop.worker", "ray.train.torch")
"""torch._dynamo is imported by the first optimizer a process builds; raytrain_spot.loop.worker
pulls in Ray Train, ray.train.torch its torch backend. Then, in a run's processes, its task's
modules (elastic/standby.py's ``TASK_MODULES``, set in their runtime environment)."""

logger = logging.getLogger(__name__)
done = threading.Event()
"""Set once the thread has imported ``MODULES`` (or given up on one); importing this module returns then."""
at_idle_priority = False
"""Whether the imports ran at idle priority (False where the OS has no SCHED_IDLE)."""


def _import_at_idle_priority() -> None:
    global at_idle_priority
    task_modules: List[str] = []
    try:
        from raytrain_spot.elastic.standby import standbys_hurried, this_runs_task_modules

        task_modules = this_runs_task_modules()
        hurried = standbys_hurried()
    except Exception:  # noqa: BLE001 - unread, the imports take the usual idle priority
        logger.warning("Could not read whether this run's standbys are wanted now", exc_info=True)
        hurried = False
    try:
        if not hurried:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread (Linux)
            at_idle_priority = True
    except (AttributeError, OSError):
        pass  # imports at normal priority
    try:
        for module in MODULES:
            importlib.import_module(module)
        # The task's own, in a standby kept ahead of a restart; not in one a notice hold waits for (its
        # training function imports them), so the hold is no longer than the stack's imports.
        for module in () if hurried else task_modules:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - the training function imports it again and meets the error there
                logger.warning("Preloading the task's %s failed", module, exc_info=True)
    except Exception:  # noqa: BLE001 - the main thread imports it again and meets the error where it matters
        logger.warning("Preloading %s failed", module, exc_info=True)
        return
    finally:
        done.set()
    try:
        from raytrain_spot.elastic.standby import announce_warm

        announce_warm()
    except Exception:  # noqa: BLE001 - unannounced, a joined node counts for a regrow later (elastic/capacity.py)
        logger.warning("Could not announce this node warm", exc_info=True)


if os.environ.get(NO_PRELOAD):
    done.set()
else:
    threading.Thread(target=_import_at_idle_priority, name="preload-at-idle-priority", daemon=True).start()
    done.wait()
