"""The collective operations every line-search decision goes through.

A line search branches on loss values and directional derivatives. Under data parallelism the loss a closure
returns is rank-local, so two ranks that compare different numbers take different branches, make different
numbers of closure calls and deadlock in the next collective (see ``torch.optim.LBFGS`` under DDP). Every scalar
that drives a decision therefore passes through :func:`reduce_decision_scalars` before it is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def reduce_decision_scalars(
    means: Tensor,
    sums: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Average ``means`` and add up ``sums`` across ranks in a single collective.

    Without an active multi-rank process group both tensors are returned unchanged.

    Args:
        means: 1-d tensor of rank-local values whose global value is the mean over ranks (losses of data shards).
        sums: optional 1-d tensor of rank-local partial values whose global value is the sum over ranks (dot
            products of parameter shards). Must be on the same device and of the same dtype as ``means``.
        group: the process group; ``None`` means the default group.

    Returns:
        The reduced ``means`` and ``sums``, identical on every rank.

    """
    if not is_distributed(group):
        return means, sums
    world_size = dist.get_world_size(group)
    n_means = means.numel()
    # One all-reduce for both kinds: dividing the means first turns their mean into a sum.
    packed = means.detach().to(torch.float64) / world_size
    if sums is not None:
        packed = torch.cat([packed, sums.detach().to(torch.float64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    reduced_means = packed[:n_means].to(means.dtype)
    reduced_sums = packed[n_means:].to(sums.dtype) if sums is not None else None
    return reduced_means, reduced_sums


def all_reduce_mean_(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average a list of tensors across ranks in place (used for gradients computed outside DDP's hooks)."""
    if not is_distributed(group) or not tensors:
        return
    world_size = dist.get_world_size(group)
    # Flatten into one buffer per dtype/device so that a model with many tensors costs one collective.
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world_size
        torch._foreach_copy_(bucket, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in bucket]), bucket)])
