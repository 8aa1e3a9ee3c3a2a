"""Collectives used by the objective and the run's decisions. Everything is a no-op in a single
process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from mtd.errors import MtdError


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


T = TypeVar("T")


def main_decides(decide: Callable[[], T]) -> T:
    """decide() on the main process only; every process returns its result, or raises its error.

    For decisions that write (setting a damaged checkpoint aside) or that must be the same
    everywhere. The main process re-raises its own error; the others an MtdError with its message
    (a bad-input error, or an environment OSError), so no process waits forever for the others.
    """
    if world_size() == 1:
        return decide()
    answer: list = [None, None]
    failure = None
    if dist.get_rank() == 0:
        try:
            answer[0] = decide()
        except (MtdError, OSError) as e:
            failure, answer[1] = e, str(e)
    dist.broadcast_object_list(answer, src=0)
    if failure is not None:
        raise failure
    if answer[1] is not None:
        raise MtdError(f"The main process stopped: {answer[1]}")
    return answer[0]


def all_succeed(do: Callable[[], T]) -> T:
    """do() on every process, then an exchange of how it went: where it raised (an MtdError or an
    environment OSError) on any process, every process raises, so none waits forever in the next
    collective for a process that has stopped. The failed process re-raises its own error, the
    others an MtdError naming it."""
    if world_size() == 1:
        return do()
    failure, result = None, None
    try:
        result = do()
    except (MtdError, OSError) as e:
        failure = e
    said: list = [None] * world_size()
    dist.all_gather_object(said, None if failure is None else str(failure))
    if failure is not None:
        raise failure
    stopped = [(rank, message) for rank, message in enumerate(said) if message is not None]
    if stopped:
        rank, message = stopped[0]
        raise MtdError(f"Process {rank} stopped: {message}")
    return result
