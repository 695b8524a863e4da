"""Several processes, one run: probe batches split across ranks (``accelerate launch``), one run log.

* Launched by ``accelerate launch --num_processes N -m auditkit scan ...`` (or any torchrun-style
  launcher that sets ``WORLD_SIZE``/``RANK``): :func:`init` starts accelerate's ``PartialState``
  (NCCL on GPUs, gloo on CPU), and every rank renders on its own device. Without GPUs, pass
  ``--multi_gpu`` to get N processes: accelerate's ``--cpu`` starts a single process (unless MPI).
* The work is the single-process run's list of batches (same configurations, same batches, same
  order); rank ``r`` takes batches ``r, r + N, r + 2N, ...`` (:func:`shard`), so every image is
  rendered in the very batch it would be in a one-process run and its record is the same.
* Each rank appends its records to its own shard log ``run.rank<r>.jsonl`` (same format, no
  header). After a barrier, rank 0 merges the shards into ``run.jsonl`` (:func:`auditkit.runlog.merge_shards`:
  deduplicated by (configuration, key), written atomically) and removes them. A killed run's shards
  are merged when the run is started again, before the remaining work is split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launch: rank, world size, device and a barrier (one process: 0, 1)."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    barrier: Callable[[], None] = field(default=_nothing, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _launch_env() -> tuple[int, int] | None:
    """(rank, world size) when a launcher (torchrun, accelerate) set all of its variables, else None:
    a stray ``RANK=1`` in a user's environment must not silence the scan."""
    env = {k: os.environ.get(k, "").strip() for k in LAUNCHER_VARIABLES}
    if not all(env.values()):
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        return None
    return (rank, world) if 0 <= rank < world else None


def launched() -> bool:
    """True in a process started by a distributed launcher with more than one process."""
    env = _launch_env()
    return env is not None and env[1] > 1


def is_main_process() -> bool:
    """Rank 0, or no distributed launch at all (read from the environment; starts nothing)."""
    env = _launch_env()
    return env is None or env[0] == 0


def init(device: str | None = None) -> Ranks:
    """The process group of a distributed launch (``Ranks()`` when there is none).

    On a machine without CUDA, or with ``device`` set to cpu, the ranks talk over gloo and render on
    the CPU; otherwise each rank gets its own GPU (``cuda:<local rank>``) and NCCL.
    """
    if not launched():
        return Ranks()
    import torch
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return Ranks(state.process_index, state.num_processes, str(state.device), state.wait_for_everyone)


def shard(units: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of ``units``: every ``world``-th one, starting at ``rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return list(units[rank::world])
