"""Data-parallel head training over several processes (``torchrun --nproc_per_node N cli.py train-head ...``).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init_from_env`
joins the process group (``nccl`` on CUDA, ``gloo`` on CPU) and picks ``cuda:LOCAL_RANK``. Every rank
runs the same seeded epoch order (:class:`pipeline.batches.EpochSampler`) and takes its contiguous
share of each *global* batch (:class:`RankBatches`), so the config's ``train.batch_size`` is the
global batch whatever the number of ranks. The loss of a rank is normalised by the global number of
matched instances and the gradients are summed over ranks (:func:`sum_gradients`, one flat
all-reduce after backward, as DDP's buckets do, without its compute/communication overlap), which
makes a step the single-process step on the same global batch up to float rounding. Only rank 0
logs, checkpoints and evaluates; the checkpoint holds nothing per rank, so ``--resume`` works with
another number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 = not distributed), its ``device``,
    and whether :func:`init_from_env` created the process group (then :meth:`close` destroys it)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and evaluates."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def local_device(device: torch.device) -> torch.device:
    """``device``, or under torchrun with CUDA this process's GPU ``cuda:LOCAL_RANK``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device) -> DistContext:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1, else a single-process context.

    Args:
        device: the resolved ``--device``; under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 with CUDA asked but fewer visible GPUs than local ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are "
                             "visible: lower --nproc_per_node")
        device = local_device(device)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, device=device, owns_group=owns)


def all_reduce_sum(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``x`` over ranks (``x`` itself when not distributed); ``x`` is on ``ctx.device``."""
    if ctx.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def sum_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Replace every parameter's gradient by its sum over ranks (missing gradients count as zero).

    One flat all-reduce of all gradients (float32 or the parameters' dtype), in place.
    """
    if ctx.world_size <= 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if ctx.world_size > 1:
        dist.barrier()


class RankBatches(Sampler[list[int]]):
    """This rank's share of each global batch of a seeded epoch order.

    The global batches are ``order[g*B : (g+1)*B]`` of ``order`` = the epoch's
    :class:`~pipeline.batches.EpochSampler` sequence; rank ``r`` of ``W`` gets the ``r``-th of ``W``
    contiguous, nearly equal slices of each (``torch.tensor_split``), possibly empty when a batch
    has fewer than ``W`` images. Every rank yields the same number of batches, one per global step.

    Args:
        order: dataset positions in epoch order (from the resume offset on).
        batch_size: B, the global batch; rank, world_size: this process and the number of ranks.

    Raises:
        ValueError: ``batch_size < 1`` or ``rank`` outside ``0..world_size-1``.
    """

    def __init__(self, order, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RankBatches: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.order, self.batch_size, self.rank, self.world_size = list(order), batch_size, rank, world_size

    def __iter__(self):
        for g in range(0, len(self.order), self.batch_size):
            batch = torch.tensor(self.order[g:g + self.batch_size], dtype=torch.long)
            yield torch.tensor_split(batch, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)
