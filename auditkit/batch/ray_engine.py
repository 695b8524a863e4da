"""The dynamic stage on Ray: one actor per GPU (or per CPU worker), each holding a loaded pipeline.

The first actor renders each group's shared configurations into the batch folder (``--out``, which every
node must see at the same path: a shared filesystem), then every actor scans tasks from the queue, most
suspicious first. An actor that dies mid-scan (its node lost, killed, out of memory) is replaced and its
adapter retried, up to ``max_attempts`` times. Ray is imported only here, when ``--engine ray`` is chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from auditkit.batch.engines import Result, died, with_shared
from auditkit.batch.worker import SharedSpec, Task, Worker
from auditkit.errors import BadInput


def import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput(None, "--engine ray needs Ray: pip install 'auditkit[ray]' (or pip install ray)") from None
    return ray


class _Actor:
    """A :class:`Worker` as a Ray actor (made remote lazily, so that this module imports without Ray)."""

    def __init__(self, device: str | None, worker=Worker):
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.worker = worker(device)

    def render_shared(self, spec: SharedSpec) -> str | None:
        return self.worker.render_shared(spec)

    def scan(self, task: Task) -> dict:
        return self.worker.scan(task)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayEngine:
    """``address``: a running cluster (``auto``: the one this machine belongs to); None starts a local Ray
    with ``num_cpus`` CPUs. ``workers``: actors (default: one per GPU of the cluster, else one per CPU)."""

    def __init__(self, address: str | None = None, workers: int | None = None, num_cpus: int | None = None,
                 max_attempts: int = 3, worker=Worker):
        self.address, self.workers, self.num_cpus, self.max_attempts = address, workers, num_cpus, max_attempts
        self.worker = worker  # the worker class each actor holds
        self.actor_pids: list[int] = []

    @contextlib.contextmanager
    def connected(self) -> Iterator[None]:
        """Ray connected (started, or joined at ``address``) for the ``with`` block, and shut down after if this
        call started it; a cluster that cannot be reached is a one-line BadInput, before any work."""
        ray = import_ray()
        if ray.is_initialized():
            yield
            return
        # no address: a local Ray of its own ("local"), never one Ray would find by itself (RAY_ADDRESS, or the
        # latest cluster started on this machine: another user's, or another batch's)
        kwargs = {"address": self.address} if self.address else {"address": "local", "num_cpus": self.num_cpus}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise BadInput(None, f"--engine ray: cannot start or reach {where} ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})") from None
        try:
            yield
        finally:
            ray.shutdown()

    def run(self, specs: list[SharedSpec], tasks: list[Task]) -> Iterator[Result]:
        with self.connected():
            yield from self._run(import_ray(), specs, tasks)

    def _actors(self, ray):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(**options)(_Actor)
        device = "cuda" if gpus else "cpu"
        return [remote.remote(device, self.worker) for _ in range(count)], remote, device

    def _run(self, ray, specs: list[SharedSpec], tasks: list[Task]) -> Iterator[Result]:
        from ray.exceptions import RayActorError

        actors, remote, device = self._actors(ray)
        self.actor_pids = ray.get([a.pid.remote() for a in actors])
        failed = set()
        for spec in specs:
            try:
                if ray.get(actors[0].render_shared.remote(spec)) is not None:
                    failed.add(spec.run_dir)
            except RayActorError:
                failed.add(spec.run_dir)
                actors[0] = remote.remote(device, self.worker)
        queue = list(reversed(with_shared(tasks, failed)))
        idle, running = list(actors), {}
        while queue or running:
            while queue and idle:
                actor, task = idle.pop(), queue.pop()
                running[actor.scan.remote(task)] = (task, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task, actor = running.pop(ref)
                try:
                    row = ray.get(ref)
                except RayActorError:  # the actor died with the task: a fresh actor, the task again
                    ray.kill(actor, no_restart=True)
                    idle.append(remote.remote(device, self.worker))
                    retry = dataclasses.replace(task, attempt=task.attempt + 1)
                    if retry.attempt > self.max_attempts:
                        yield task, died(task, self.max_attempts)
                    else:
                        queue.append(retry)
                    continue
                idle.append(actor)
                yield task, row
