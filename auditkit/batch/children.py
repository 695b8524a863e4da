"""Worker processes that end with the batch: a batch killed outright (``kill -9``, out of memory) leaves none behind.

A pool's spawned workers wait on their task queue; when the batch process dies without shutting the pool down they
would wait forever (holding a loaded pipeline, and the resource tracker with them). Each worker therefore watches
its parent from a daemon thread and exits as soon as it is gone (its parent id changes when it is re-parented).
Every local pool of the batch (triage, scan workers) is made here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

WATCH_SECONDS = 0.5  # how often a worker checks its parent: its longest life as an orphan


def process_pool(workers: int, initializer: Callable | None = None, initargs: tuple = (),
                 context=None) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes (not forked: the caller may hold threads that a fork would copy
    locked) that exit when this process dies, then run ``initializer(*initargs)``."""
    import multiprocessing

    context = context or multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                               initargs=(os.getpid(), initializer, initargs))


def _start(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    exit_with(parent)
    if initializer is not None:
        initializer(*initargs)


def exit_with(parent: int) -> None:
    """End this process (at once, without clean-up: its parent is gone) when process ``parent`` is no longer its
    parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="auditkit-exit-with-parent", daemon=True).start()
