"""How many BLAS/OpenMP threads the worker processes of a local pool get: the cores shared out among them.

Numerical libraries read the thread count from the environment when they are imported, so a worker sets it
first thing (:func:`limit_own_threads`, in the pool's initializer), or the parent sets it around a pool whose
processes all start inside (:func:`children_threads`). A count the user set is kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def share(workers: int, cores: int | None = None) -> int:
    """Threads per worker: the machine's cores divided among ``workers`` (at least one)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def _set_unless_set(threads: int) -> None:
    """``threads`` in every thread-count variable, and passive waiting, where the user set none."""
    for k in THREAD_VARIABLES:
        os.environ.setdefault(k, str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def limit_own_threads(threads: int) -> None:
    """In a freshly spawned worker, before it imports torch: ``threads`` BLAS/OpenMP threads, unless the user
    set a count (torch already imported: its intra-op threads too)."""
    import sys

    _set_unless_set(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@contextlib.contextmanager
def children_threads(threads: int) -> Iterator[None]:
    """The environment spawned workers inherit: ``threads`` each (passive waiting), unless the user set a count;
    restored after."""
    saved = {k: os.environ.get(k) for k in (*THREAD_VARIABLES, "OMP_WAIT_POLICY")}
    try:
        _set_unless_set(threads)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
