"""DistributedDataParallel set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    torchrun --nproc_per_node 2 -m trainer train --dataset mnist1d --arch cnn1d ...

gloo on CPU, NCCL on CUDA (one GPU per process: cuda:LOCAL_RANK). Without torchrun's variables
(or with WORLD_SIZE=1) nothing is initialized and the trainer runs as one process.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from snapserve.trainer.errors import ConfigError

__all__ = ["DistContext", "any_failed", "close_distributed", "init_distributed"]

logger = logging.getLogger(__name__)

# Rank 0 evaluates and exports while the others wait at the next collective; big ensembles
# take a while to export, so the default 30 minutes is raised.
_TIMEOUT = dt.timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> DistContext:
    """Joins the process group when started by torchrun; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device_spec!r} requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    logger.info("process %d of %d (%s)", rank, world_size, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def any_failed(context: DistContext, failed: bool, device: torch.device) -> bool:
    """A barrier that also tells every process whether any of them failed, so that an error on
    process 0 (say, a full disk while checkpointing) stops all of them instead of leaving the
    others waiting at the next collective until the timeout."""
    if not context.enabled:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def close_distributed(context: DistContext, wait: bool = True) -> None:
    """Leaves the group; with `wait`, once every process has come this far (process 0 still
    publishes after training).

    The wait goes through the rendezvous store, not a gloo barrier. A gloo worker thread drops
    its last hold on a collective's tensors just after the caller's wait returns; a process that
    has nothing left to do after the barrier could begin interpreter finalization first, and
    that late drop then takes the GIL of a dying interpreter and aborts the process
    ("terminate called without an active exception", SIGABRT in ~AsyncBarrierWork). Through
    the store, the last gloo collective comes before process 0's export, which takes seconds,
    so every worker thread has let go of it by the time a process exits."""
    if context.enabled and dist.is_initialized():
        if wait:
            _store_barrier(context, "snapserve/closing")
        dist.destroy_process_group()


def _store_barrier(context: DistContext, key: str) -> None:
    """All processes meet at `key`: each counts itself in, and the last to arrive opens it."""
    # torchrun makes a fresh store for every restart of the group, so the keys start unset.
    store = dist.distributed_c10d._get_default_store()
    if store.add(f"{key}/arrived", 1) == context.world_size:
        store.set(f"{key}/open", b"1")
    store.wait([f"{key}/open"], _TIMEOUT)
