"""The run's console shows the product's lines; everything else written to it goes to ``run.log``.

Ray writes to the driver's stdout and stderr from many places that no setting of its own
silences: error messages relayed from the GCS (a dead worker, with its raylet's last log
lines), log deduplication notices, C++ log lines and stack traces from the core worker at
shutdown. For the duration of training, ``console_for_run`` points file descriptors 1 and 2
at the run's log, so those lines (and any other stray output, from any library or child
process) land there, and hands back streams to the real terminal for the progress lines,
events, summary and the product's own log records.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator, TextIO, Tuple


@contextmanager
def console_for_run(log_path: str, quiet: bool = True) -> Iterator[Tuple[TextIO, TextIO]]:
    """(stdout, stderr) of the terminal; with ``quiet``, all other output goes to ``log_path``."""
    if not quiet:
        yield sys.stdout, sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    # The handlers that print log records (Hydra's console handler) keep writing to the terminal.
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)]
    streams = [h.setStream(err if h.stream is sys.stderr else out) for h in handlers]
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # run.log appends: lines interleave
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield out, err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
        out.close()
        err.close()
