"""Where the scans run: in this process, in a local process pool, or on Ray (:mod:`auditkit.batch.ray_engine`).

An engine takes the groups' shared renders (:class:`~auditkit.batch.worker.SharedSpec`) and the tasks, and
yields (task, row) as adapters finish. Each worker keeps its pipeline loaded across tasks. A worker that
dies mid-scan (killed, out of memory) has its tasks retried on a fresh worker, up to ``max_attempts``
times; after that the adapter is an error row saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from auditkit.batch.children import process_pool
from auditkit.batch.threads import limit_own_threads, share
from auditkit.batch.worker import SharedSpec, Task, Worker, error_row

Result = tuple[Task, dict]


def died(task: Task, max_attempts: int) -> dict:
    return error_row(task, f"the worker scanning it died {max_attempts} times (killed, or out of memory)")


def with_shared(tasks: list[Task], failed: set) -> list[Task]:
    """Tasks of a group whose shared renders failed are scanned on their own (each names the problem)."""
    return [dataclasses.replace(t, shared=None) if t.shared is not None and t.shared.run_dir in failed else t
            for t in tasks]


class LocalEngine:
    """``workers`` 1: everything in this process. More: a pool of spawned processes, each with its own
    pipeline (``devices``: one per worker, e.g. ``cuda:0``, ``cuda:1``; default: the scan's device)."""

    def __init__(self, workers: int = 1, devices: tuple[str, ...] = (), max_attempts: int = 3, worker=Worker):
        self.workers, self.devices, self.max_attempts = max(1, workers), devices, max_attempts
        self.worker = worker  # the worker class (importable: spawned processes import it by name)

    def connected(self) -> contextlib.AbstractContextManager:
        """Nothing to connect to on this machine (the Ray engine's connects before the batch writes anything)."""
        return contextlib.nullcontext()

    def run(self, specs: list[SharedSpec], tasks: list[Task]) -> Iterator[Result]:
        if self.workers == 1:
            worker = self.worker(self.devices[0] if self.devices else None)
            failed = {s.run_dir for s in specs if worker.render_shared(s) is not None}
            for task in with_shared(tasks, failed):
                yield task, worker.scan(task)
            return
        yield from _pool(self, specs, tasks)


_WORKER: Worker | None = None


def _init(worker, devices, counter, threads: int = 1) -> None:
    global _WORKER
    limit_own_threads(threads)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER = worker(devices[index % len(devices)] if devices else None)


def _render(spec: SharedSpec) -> str | None:
    return _WORKER.render_shared(spec)


def _scan(task: Task) -> dict:
    return _WORKER.scan(task)


def _pool(engine: LocalEngine, specs: list[SharedSpec], tasks: list[Task]) -> Iterator[Result]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)

    def new_pool():
        # the cores shared out among the workers (each renders with its own BLAS/OpenMP threads; every worker
        # spinning on every core slowed triage ~12x, measured), set by each worker before it loads anything
        return process_pool(engine.workers, _init, (engine.worker, engine.devices, counter, share(engine.workers)),
                            context)

    pool = new_pool()
    try:
        failed = set()
        for spec in specs:  # once per group, before its candidates (a death here: the candidates render it)
            try:
                if pool.submit(_render, spec).result() is not None:
                    failed.add(spec.run_dir)
            except BrokenProcessPool:
                failed.add(spec.run_dir)
                pool.shutdown(cancel_futures=True)
                pool = new_pool()
        queue = list(reversed(with_shared(tasks, failed)))  # popped from the end: queue order kept
        running: dict = {}
        suspects: set[str] = set()  # in flight when a worker died: each runs alone next, to find the culprit
        while queue or running:
            while queue and len(running) < engine.workers and not (running and queue[-1].id in suspects) \
                    and not any(t.id in suspects for t in running.values()):
                task = queue.pop()
                running[pool.submit(_scan, task)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = []
            for future in done:
                task = running.pop(future)
                try:
                    row = future.result()
                except BrokenProcessPool:
                    broken.append(task)
                    continue
                suspects.discard(task.id)
                yield task, row
            if not broken:
                continue
            broken += list(running.values())  # a dead worker breaks the whole pool: every task in it stops
            for future in running:
                future.cancel()
            running.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            pool = new_pool()
            if len(broken) > 1:  # which one killed it is unknown: none is counted, each runs alone next
                suspects.update(t.id for t in broken)
                queue += broken
                continue
            retry = dataclasses.replace(broken[0], attempt=broken[0].attempt + 1)
            if retry.attempt > engine.max_attempts:
                suspects.discard(retry.id)
                yield broken[0], died(broken[0], engine.max_attempts)
            else:
                queue.append(retry)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
