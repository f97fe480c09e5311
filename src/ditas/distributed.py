"""The ``torch.distributed`` lifecycle of a multi-process command (``torchrun -m ditas ...``).

One place for joining the group (:func:`init_from_env`), waiting (:func:`barrier`), leaving it
(:func:`leave_together` on success, :func:`shutdown` on failure) and sharing what one process
made with the others (:func:`broadcast_object`, :func:`all_gather_object`). Outside ``torchrun`` every function is the
one-process identity: rank 0 of a world of 1, nothing to wait for, nothing to send.

Anything whose value depends on float rounding (a quantized model, a calibration run) is made
once, on process 0, and sent to the others: processes with other thread counts, or GPUs with
non-deterministic reductions, would otherwise each make a slightly different one.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, TypeVar

import torch

from .errors import DitasError

T = TypeVar("T")


def _dist():
    """``torch.distributed`` when a group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def barrier() -> None:
    """Waits until every process of the group is here (nothing outside a group)."""
    dist = _dist()
    if dist is None:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Process ``src``'s ``obj`` on every process (pickled; the others pass anything, e.g. None).
    Outside a group, ``obj`` itself."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (pickled). Outside a group, ``[obj]``."""
    dist = _dist()
    if dist is None:
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def init_from_env(device: torch.device) -> tuple[int, int, torch.device]:
    """Joins the ``torchrun`` process group when the environment says so (``WORLD_SIZE`` > 1).

    gloo on the CPU, nccl on CUDA (each process then takes ``cuda:LOCAL_RANK``). Returns
    (rank, world size, this process's device); (0, 1, device) outside torchrun.
    """
    import torch.distributed as dist

    from .validate import world_env_problem

    problem = world_env_problem(os.environ)  # a stray WORLD_SIZE would wait for peers forever
    if problem:
        raise DitasError(problem)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DitasError(f"process {local} of torchrun has no GPU: {torch.cuda.device_count()} CUDA device(s) "
                             "here; use --nproc_per_node at most that")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(hours=12), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), device


def shutdown() -> None:
    """Tears the group down (the failure path; a successful command uses :func:`leave_together`)."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def leave_together(result: Any) -> Any:
    """Ends a successful multi-process command: every process waits for the others, then tears the
    group down, and returns ``result``. A process that destroyed its gloo group while a peer was
    still working (process 0 scoring and publishing) was seen to abort in C++ ("terminate called
    without an active exception") in one CI run; on failure paths ``shutdown`` alone is used."""
    barrier()
    shutdown()
    return result
