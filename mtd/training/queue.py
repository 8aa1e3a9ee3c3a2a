"""The CKD queue: the most recent targets, kept as extra negatives (DisCo, arXiv:2112.05638, after
MoCo's queue of keys).

Every process holds the whole queue and pushes the same gathered global batch after each
micro-step's loss, so all queues stay identical without a collective of their own, and the batch a
loss sees is never also in its queue. Checkpoints save it (queue.safetensors), so a resumed stage
goes on with the queue it stopped with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mtd.io import WeightsError, load_safetensors

QUEUE_FILE = "queue.safetensors"
START = ".start"  # key suffix of a queue's oldest row


class TargetQueue:
    """A ring buffer of up to `size` unit vectors of `dim` dims (float32, on `device`)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"a queue holds at least 1 vector, got size {size}")
        self.vectors = torch.zeros(size, dim, device=device)
        self.start = 0  # the oldest vector's row once the buffer is full; where the next goes until then
        self.count = 0

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    def negatives(self) -> torch.Tensor:
        """(count, dim): the vectors held, in storage order (a loss does not need them in order)."""
        return self.vectors[: self.count]

    def contents(self) -> torch.Tensor:
        """(count, dim): the vectors held, oldest first."""
        if self.count < self.size:
            return self.vectors[: self.count]
        return torch.cat([self.vectors[self.start:], self.vectors[: self.start]])

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        """Add a (B, dim) batch (normalized and detached here), dropping the oldest vectors."""
        batch = F.normalize(batch.detach().float(), dim=-1)[-self.size:]
        n = len(batch)
        rows = (self.start + torch.arange(n, device=self.vectors.device)) % self.size
        self.vectors[rows] = batch.to(self.vectors.device)
        self.start = (self.start + n) % self.size
        self.count = min(self.count + n, self.size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The vectors in storage order and where the oldest is: a loaded queue then gives its
        loss the same negatives in the same order, so a resumed run matches to the bit."""
        return {"vectors": self.negatives().contiguous().cpu(), "start": torch.tensor([self.start])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        vectors, start = state["vectors"], int(state["start"][0])
        if (vectors.ndim != 2 or vectors.shape[1] != self.vectors.shape[1] or len(vectors) > self.size
                or not 0 <= start < self.size):
            raise ValueError(f"a saved queue of shape {tuple(vectors.shape)} (start {start}) does not "
                             f"fit this one ({self.size} x {self.vectors.shape[1]})")
        self.vectors.zero_()
        self.vectors[: len(vectors)] = vectors.to(self.vectors.device)
        self.count, self.start = len(vectors), start


def save_queues(queues: dict[str, TargetQueue], folder: Path) -> None:
    """Every queue, by target source, into folder/queue.safetensors (nothing when there are none)."""
    if queues:
        tensors = {}
        for source, queue in queues.items():
            state = queue.state_dict()
            tensors[source], tensors[source + START] = state["vectors"], state["start"]
        save_file(tensors, str(folder / QUEUE_FILE))


def load_queues(folder: Path, sources: set[str], size: int, device, fix: str) -> dict[str, TargetQueue]:
    """The queues of target `sources` saved in a checkpoint folder, each of `size` vectors."""
    if not sources:
        return {}
    saved = load_safetensors(folder / QUEUE_FILE, fix)
    missing = sorted(sources - set(saved))
    if missing:
        raise WeightsError(f"{folder / QUEUE_FILE} holds no queue of {missing} (it has "
                           f"{sorted(k for k in saved if not k.endswith(START))}). To fix, {fix}.")
    queues = {}
    for source in sorted(sources):
        queues[source] = TargetQueue(size, saved[source].shape[1], device)
        queues[source].load_state_dict({"vectors": saved[source], "start": saved[source + START]})
    return queues
