"""Collectives used by the objective. Everything is a no-op in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B_local, D) -> (B_global, D) in rank order, differentiable.

    The backward sums every rank's gradient for this rank's rows; the DDP average over ranks then
    gives exactly the gradient of one process holding the global batch (as open_clip's
    gather_with_grad, local_loss=False).
    """
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)
