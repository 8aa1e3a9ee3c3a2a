"""Distillation losses of Jasper/Stella (Zhang et al., "Jasper and Stella: distillation of
SOTA embedding models", arXiv:2412.19048, section 2).

All functions take a student batch S of shape (B, D_s) and a target batch T of shape (B, D_t),
L2-normalise both rows-wise themselves (callers may pass raw vectors) and compute in float32
(float64 inputs stay float64 so that gradcheck works). Each returns a scalar tensor.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalize(x: Tensor) -> Tensor:
    # fp16/bf16 (autocast) outputs are upcast: the losses compare values close to each other.
    x = x if x.dtype == torch.float64 else x.float()
    return F.normalize(x, dim=-1)


def _check_batch(student: Tensor, target: Tensor) -> None:
    if student.dim() != 2 or target.dim() != 2 or student.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected student (B, D_s) and target (B, D_t) with the same B, "
            f"got {tuple(student.shape)} and {tuple(target.shape)}"
        )


def cosine_loss(student: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """1 - cos(s_x, t_x) summed over the batch (the paper's formula) or averaged (reduction="mean",
    as the public Jasper code does); student and target are (B, D), same D."""
    _check_batch(student, target)
    if student.shape[1] != target.shape[1]:
        raise ValueError(
            f"cosine needs equal dims, got student {tuple(student.shape)} and target "
            f"{tuple(target.shape)}; use only sim/resim for heads of another size"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    s, t = _normalize(student), _normalize(target)
    per_row = 1.0 - (s * t).sum(dim=-1)
    return per_row.sum() if reduction == "sum" else per_row.mean()


def similarity_loss(student: Tensor, target: Tensor) -> Tensor:
    """MSE between the (B, B) similarity matrices S S^T and T T^T; (B, D_s) vs (B, D_t)."""
    _check_batch(student, target)
    s, t = _normalize(student), _normalize(target)
    return F.mse_loss(s @ s.T, t @ t.T)


def _pair_sims(x: Tensor) -> Tensor:
    """(B, D) normalised -> (P,) dot products of the pairs i < j, P = B(B-1)/2."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    # Gather from the (B, B) Gram matrix rather than from x[i] * x[j], which would be (P, D).
    return (x @ x.T)[i, j]


def _hinge_rows(ss: Tensor, tt: Tensor, start: int, stop: int, margin: float):
    """Hinge arguments and validity for rows a in [start, stop) against all b: (rows, P)."""
    diff = ss[None, :] - ss[start:stop, None] + margin
    valid = tt[start:stop, None] > tt[None, :]
    return diff, valid


class _ChunkedRankHinge(torch.autograd.Function):
    """mean over {(a, b): tt[a] > tt[b]} of max(0, ss[b] - ss[a] + margin), in row chunks.

    Neither pass holds more than a (chunk_size, P) block, so memory is O(chunk_size * P);
    backward recomputes the blocks instead of saving them.
    """

    @staticmethod
    def forward(ctx, ss: Tensor, tt: Tensor, margin: float, chunk_size: int) -> Tensor:
        total = ss.new_zeros(())
        count = torch.zeros((), dtype=torch.int64, device=ss.device)
        for start in range(0, ss.shape[0], chunk_size):
            diff, valid = _hinge_rows(ss, tt, start, start + chunk_size, margin)
            total += torch.where(valid, diff.clamp_min(0), 0).sum()
            count += valid.sum()
        ctx.save_for_backward(ss, tt, count)
        ctx.margin, ctx.chunk_size = margin, chunk_size
        # count == 0 gives total == 0, so the loss is 0 without a host sync.
        return total / count.clamp_min(1)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        ss, tt, count = ctx.saved_tensors
        grad = torch.zeros_like(ss)
        for start in range(0, ss.shape[0], ctx.chunk_size):
            diff, valid = _hinge_rows(ss, tt, start, start + ctx.chunk_size, ctx.margin)
            active = (valid & (diff > 0)).to(ss.dtype)
            grad += active.sum(dim=0)  # d/d ss[b]: +1 per active a
            grad[start : start + ctx.chunk_size] -= active.sum(dim=1)  # d/d ss[a]: -1 per b
        return grad * (grad_output / count.clamp_min(1)), None, None, None


def relative_similarity_loss(
    student: Tensor,
    target: Tensor,
    margin: float = 0.015,
    chunk_size: int = 1024,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pairwise ranking loss on in-batch pair similarities; (B, D_s) vs (B, D_t).

    With ss[p], tt[p] the student/target similarities of the P = B(B-1)/2 pairs i < j, it is
    the mean over all (a, b) with tt[a] > tt[b] of max(0, ss[b] - ss[a] + margin); 0 if there
    is no such (a, b). Exact by default, in row chunks of `chunk_size`. With `num_samples`,
    averages over that many (a, b) drawn uniformly from P x P (those with tt[a] > tt[b]
    kept) instead, for batches where P^2 is too much compute. The target gets no gradient.
    """
    _check_batch(student, target)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ss = _pair_sims(_normalize(student))
    tt = _pair_sims(_normalize(target.detach()))
    if student.shape[0] < 3:
        # At most one pair: no (a, b) with tt[a] > tt[b]. Keep the graph for backward().
        return ss.sum() * 0
    if num_samples is None:
        return _ChunkedRankHinge.apply(ss, tt, margin, chunk_size)
    p = ss.shape[0]
    a = torch.randint(p, (num_samples,), generator=generator, device=ss.device)
    b = torch.randint(p, (num_samples,), generator=generator, device=ss.device)
    keep = tt[a] > tt[b]
    hinge = torch.where(keep, (ss[b] - ss[a] + margin).clamp_min(0), 0)
    return hinge.sum() / keep.sum().clamp_min(1)


def info_nce_loss(student: Tensor, target: Tensor, temperature: float = 0.05) -> Tensor:
    """Symmetric InfoNCE (CLIP-style) between rows: student i must pick target i among the batch's
    targets, and target i student i. Logits are cosines / temperature; needs equal dims."""
    _check_batch(student, target)
    s, t = _normalize(student), _normalize(target)
    logits = s @ t.T / temperature  # (B, B)
    labels = torch.arange(len(s), device=s.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
