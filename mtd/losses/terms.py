"""Distillation losses of Jasper/Stella (Zhang et al., "Jasper and Stella: distillation of
SOTA embedding models", arXiv:2412.19048, section 2).

All functions take a student batch S of shape (B, D_s) and a target batch T of shape (B, D_t),
L2-normalise both rows-wise themselves (callers may pass raw vectors) and compute in float32
(float64 inputs stay float64 so that gradcheck works). Each returns a scalar tensor.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


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


# Exact relative loss: from this many pairs (B = 25) on, the sort-based form; below it the chunked
# one, about 0.1-0.3 ms faster there on CPU (bench/resim_speed.py).
SORTED_FROM_PAIRS = 300


def _first_not_above(keys: Tensor, queries: Tensor, start: Tensor, end: Tensor, strict: bool, steps: int):
    """Per query i, the first index j in [start[i], end[i]) with not keys[j] > queries[i] (strict)
    or not keys[j] >= queries[i]; end[i] if none. keys must descend within each such segment.
    A binary search of all queries at once, `steps` halvings (enough for segments < 2**steps)."""
    lo, hi = start.clone(), end.clone()
    last = keys.shape[0] - 1
    for _ in range(steps):
        mid = (lo + hi) // 2
        key = keys[mid.clamp_max(last)]
        above = key > queries if strict else key >= queries
        open_ = lo < hi
        lo = torch.where(open_ & above, mid + 1, lo)
        hi = torch.where(open_ & ~above, mid, hi)
    return lo


def _rank_hinge_counts(ss: Tensor, tt: Tensor, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair p, (number of active (a, b) with b = p) - (number with a = p), as int64 (P,);
    the number of active (a, b); N, the number of (a, b) with tt[a] > tt[b].

    (a, b) is active when tt[a] > tt[b] and ss[b] > ss[a] - margin. Pairs are put in order of
    tt (ties by descending ss); a merge-sort-like pass over log2(P) levels then counts, for every
    block of the order split in a left and a right half, the active (a in right, b in left) with
    batched searchsorted on the halves' sorted ss. That counts every (a, b) with a after b in
    the order, tt[a] == tt[b] included; those are counted again inside each group of equal tt
    (where ss descends, so both conditions select a prefix or a suffix) and subtracted.
    """
    p = ss.shape[0]
    order = torch.sort(ss, descending=True, stable=True).indices
    order = order[torch.sort(tt[order], stable=True).indices]
    u, t = ss[order], tt[order]
    w = u - margin  # (a, b) is active iff u[b] > w[a]: every search below makes this comparison

    size = 1 << max(p - 1, 0).bit_length()  # next power of two; padding is +inf, never counted
    # Runs of h values sorted ascending, with each value's place in u and its count so far of
    # active (a, b) where it is b minus those where it is a. Queries go in sorted order too:
    # that searches several times faster than in u's order.
    runs = torch.cat([u, u.new_full((size - p,), math.inf)])
    where = torch.arange(size, device=ss.device)
    net = torch.zeros(size, dtype=torch.int64, device=ss.device)
    active = torch.zeros((), dtype=torch.int64, device=ss.device)
    h = 1
    while h < size:
        blocks = size // (2 * h)
        halves, counts = runs.view(blocks, 2, h), net.view(blocks, 2, h)
        left, right = halves[:, 0].contiguous(), halves[:, 1] - margin
        # a in the right half: left b with u[b] > w[a].
        as_a = h - torch.searchsorted(left, right, right=True)
        counts[:, 1] -= as_a
        active += as_a.sum()
        # b in the left half: right a with w[a] < u[b].
        counts[:, 0] += torch.searchsorted(right, left)
        h *= 2
        if h < size:
            # A stable sort merges the two sorted halves in about linear time.
            runs, merged = runs.view(-1, h).sort(dim=1, stable=True)
            runs = runs.view(-1)
            where = where.view(-1, h).gather(1, merged).view(-1)
            net = net.view(-1, h).gather(1, merged).view(-1)
    diff = torch.zeros(size, dtype=torch.int64, device=ss.device)
    diff[where] = net
    diff = diff[:p]

    _, group_sizes = torch.unique_consecutive(t, return_counts=True)
    ends = group_sizes.cumsum(0)
    start = (ends - group_sizes).repeat_interleave(group_sizes)  # first place of each tt group
    largest = int(group_sizes.max()) if p else 0
    if largest > 1:
        end = ends.repeat_interleave(group_sizes)
        pos = torch.arange(p, device=ss.device)
        steps = largest.bit_length()
        # Within a group u descends: {b: u[b] > w[a]} is a prefix, and so is {b before a}.
        as_a = torch.minimum(_first_not_above(u, w, start, end, True, steps) - start, pos - start)
        # {a: w[a] < u[b]} is a suffix, and so is {a after b}.
        as_b = torch.minimum(end - _first_not_above(w, u, start, end, False, steps), end - 1 - pos)
        diff += as_a - as_b
        active -= as_a.sum()
    out = torch.empty_like(diff)
    out[order] = diff
    return out, active, start.sum()


class _SortedRankHinge(torch.autograd.Function):
    """The loss of _ChunkedRankHinge in O(P log^2 P) time and O(P) memory (_rank_hinge_counts).

    The loss is linear in ss given which (a, b) are active: sum over active of
    ss[b] - ss[a] + margin = ss . diff + margin * active, so forward gets it, and backward its
    gradient diff / N, from the counts alone; diff is saved (P int64), nothing larger.
    """

    @staticmethod
    def forward(ctx, ss: Tensor, tt: Tensor, margin: float) -> Tensor:
        diff, active, n = _rank_hinge_counts(ss, tt, margin)
        ctx.save_for_backward(diff, n)
        # float64 dot: diff sums to 0 and reaches +-P, so float32 would cancel digits away.
        total = torch.dot(ss.double(), diff.double()) + margin * active.double()
        return (total / n.clamp_min(1)).to(ss.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        diff, n = ctx.saved_tensors
        return diff.to(grad_output.dtype) * (grad_output / n.clamp_min(1)), None, None


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
    is no such (a, b). Exact by default: in O(P log^2 P) time and O(P) memory, or for P up to
    SORTED_FROM_PAIRS - 1 (B <= 24), where that is slower, over the whole P x P in row chunks of
    `chunk_size`. With `num_samples`, averages over that many (a, b) drawn uniformly from P x P
    (those with tt[a] > tt[b] kept) instead. The target gets no gradient.
    """
    _check_batch(student, target)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ss = _pair_sims(_normalize(student))
    tt = _pair_sims(_normalize(target.detach()))
    if student.shape[0] < 3:
        # At most one pair: no (a, b) with tt[a] > tt[b]. Keep the graph for backward().
        return ss.sum() * 0
    p = ss.shape[0]
    if num_samples is None and p < SORTED_FROM_PAIRS:
        return _ChunkedRankHinge.apply(ss, tt, margin, chunk_size)
    if num_samples is None:
        return _SortedRankHinge.apply(ss, tt, margin)
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


# ---------------------------------------------------------------------------------------------
# Contrastive terms (DisCo, Wu et al., arXiv:2112.05638; relational KD of similarity distributions)

# Two unit vectors closer than this are the same text (or a duplicate of it): never a negative.
SAME_TEXT = 1e-6


def contrastive_distillation_loss(student: Tensor, target: Tensor, queue: Tensor | None = None,
                                  temperature: float | Tensor = 0.05) -> Tensor:
    """CKD (DisCo, section 3.2): InfoNCE where student vector i must pick its own target i among
    the batch's targets and a queue of earlier targets; (B, D) vs (B, D), queue (Q, D) or None.

    Logits are cosines / temperature (a float, or a learned 0-d tensor). A text is never a
    candidate twice: a queued target equal to one of the batch's (the same text from an earlier
    batch) is left out, and so, for a row, is another batch row with its own target (a duplicate
    text). Mean over rows; the targets get no gradient.
    """
    _check_batch(student, target)
    if student.shape[1] != target.shape[1]:
        raise ValueError(f"ckd needs equal dims, got student {tuple(student.shape)} and target "
                         f"{tuple(target.shape)}; give it a head of the target's size")
    s, t = _normalize(student), _normalize(target.detach())
    candidates = t if queue is None or not len(queue) else torch.cat([t, _normalize(queue.detach())])
    rows = torch.arange(len(s), device=s.device)
    same = (t @ candidates.T) > 1 - SAME_TEXT  # (B, B + Q)
    same[:, len(t):] = same[:, len(t):].any(dim=0)  # a queued copy of any batch text: for every row
    same[rows, rows] = False
    logits = (s @ candidates.T).masked_fill(same, -math.inf) / temperature
    return F.cross_entropy(logits, rows)


def _off_diagonal(x: Tensor) -> Tensor:
    """(B, B) -> (B, B - 1): each row without its diagonal entry."""
    b = x.shape[0]
    return x.flatten()[1:].view(b - 1, b + 1)[:, :-1].reshape(b, b - 1)


def similarity_kl_loss(student: Tensor, target: Tensor, temperature: float = 0.05) -> Tensor:
    """KL(P_T || P_S) between in-batch similarity distributions, averaged over rows: row i of P_S is
    softmax_j(s_i . s_j / temperature) over the other rows j != i, P_T the same from T. (B, D_s) vs
    (B, D_t). The diagonal (always 1) is left out: at temperature 0.05 it would hold nearly all of
    each row's mass and hide the relations between texts."""
    _check_batch(student, target)
    if student.shape[0] < 2:
        return student.sum() * 0
    s, t = _normalize(student), _normalize(target.detach())
    log_p_s = F.log_softmax(_off_diagonal(s @ s.T) / temperature, dim=-1)
    log_p_t = F.log_softmax(_off_diagonal(t @ t.T) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def pair_info_nce_loss(anchor: Tensor, positive: Tensor, negative: Tensor | None = None,
                       groups: Tensor | None = None, temperature: float = 0.05) -> Tensor:
    """In-batch negatives InfoNCE on labeled pairs (sentence-transformers'
    MultipleNegativesRankingLoss, scale 1/temperature): anchor i must pick positive i among all the
    batch's positives and hard negatives; (B, D) each, negative (B, D) or None.

    groups: (B,) ints; the positive of another row in anchor i's group (two captions of one image,
    pairs that share a sentence) is not one of its negatives. Mean over rows.
    """
    _check_batch(anchor, positive)
    a, p = _normalize(anchor), _normalize(positive)
    candidates = p if negative is None else torch.cat([p, _normalize(negative)])
    logits = a @ candidates.T / temperature  # (B, B) or (B, 2B)
    rows = torch.arange(len(a), device=a.device)
    if groups is not None:
        same = torch.zeros(logits.shape, dtype=torch.bool, device=a.device)
        same[:, : len(a)] = groups[:, None] == groups[None, :]
        same[rows, rows] = False
        logits = logits.masked_fill(same, -math.inf)
    return F.cross_entropy(logits, rows)
