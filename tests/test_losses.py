"""Tests for mtd.losses.terms: loop references, chunked and sort-based vs full form, invariants,
edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtd.losses.terms import (
    SORTED_FROM_PAIRS,
    _ChunkedRankHinge,
    _pair_sims,
    _SortedRankHinge,
    cosine_loss,
    relative_similarity_loss,
    similarity_loss,
)

MARGIN = 0.015


def _batch(b, d_s=8, d_t=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d_s, generator=g, dtype=dtype)
    return s, torch.randn(b, d_t, generator=g, dtype=dtype)


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v, strict=False))


def _pairs_sims(rows):
    b = len(rows)
    return [_dot(rows[i], rows[j]) for i in range(b) for j in range(i + 1, b)]


def _full_form(student, target, margin=MARGIN):
    """Relative loss building the whole (P, P) matrix at once, with plain autograd."""
    s, t = F.normalize(student, dim=-1), F.normalize(target, dim=-1)
    i, j = torch.triu_indices(len(s), len(s), offset=1)
    ss, tt = (s @ s.T)[i, j], (t @ t.T)[i, j]
    valid = tt[:, None] > tt[None, :]
    hinge = torch.relu(ss[None, :] - ss[:, None] + margin)
    return (hinge * valid).sum() / valid.sum()


def _random_orthogonal(d, seed=1):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


# 1. References with explicit Python loops.


def test_cosine_matches_loop():
    s, t = _batch(5, 8, 8)
    ref = sum(1 - _dot(_unit(a), _unit(b)) for a, b in zip(s.tolist(), t.tolist(), strict=False))
    assert cosine_loss(s, t).item() == pytest.approx(ref, abs=1e-5)


def test_similarity_matches_loop():
    s, t = _batch(6)
    su, tu = [_unit(r) for r in s.tolist()], [_unit(r) for r in t.tolist()]
    ref = sum((_dot(su[i], su[j]) - _dot(tu[i], tu[j])) ** 2 for i in range(6) for j in range(6))
    assert similarity_loss(s, t).item() == pytest.approx(ref / 36, abs=1e-5)


def test_relative_matches_loop():
    s, t = _batch(6)
    ss = _pairs_sims([_unit(r) for r in s.tolist()])
    tt = _pairs_sims([_unit(r) for r in t.tolist()])
    total, n = 0.0, 0
    for a in range(len(ss)):
        for b in range(len(ss)):
            if tt[a] > tt[b]:
                total += max(0.0, ss[b] - ss[a] + MARGIN)
                n += 1
    assert n == len(ss) * (len(ss) - 1) // 2  # no ties among random target sims
    assert relative_similarity_loss(s, t).item() == pytest.approx(total / n, abs=1e-5)


# 2. Chunked exact mode equals the full (P, P) form, value and gradient.


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_relative_chunked_equals_full_form(chunk_size):
    s, t = _batch(10, seed=3)  # P = 45, not a multiple of 3 or 7
    s.requires_grad_(True)
    got = relative_similarity_loss(s, t, chunk_size=chunk_size)
    want = _full_form(s, t)
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert g_want.abs().max() > 1e-3  # the comparison below is not between two zero tensors
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0)


def test_relative_chunked_scales_with_grad_output():
    s, t = _batch(7, seed=4)
    s.requires_grad_(True)
    (g1,) = torch.autograd.grad(relative_similarity_loss(s, t, chunk_size=2), s)
    (g3,) = torch.autograd.grad(3.0 * relative_similarity_loss(s, t, chunk_size=2), s)
    torch.testing.assert_close(g3, 3.0 * g1)


# 3. Invariants.


def test_rotation_invariance_of_sim_and_relative():
    s, t = _batch(8, seed=5)
    q = _random_orthogonal(s.shape[1])
    assert similarity_loss(s, t).item() > 1e-3
    torch.testing.assert_close(similarity_loss(s @ q, t), similarity_loss(s, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        relative_similarity_loss(s @ q, t), relative_similarity_loss(s, t), atol=1e-6, rtol=0
    )


def test_similarity_zero_for_rotated_target():
    _, t = _batch(8, seed=6)
    assert similarity_loss(t @ _random_orthogonal(t.shape[1]), t).item() < 1e-10


def test_cosine_zero_for_same_and_scaled():
    _, t = _batch(8, seed=7)
    assert abs(cosine_loss(t, t).item()) < 1e-5
    assert abs(cosine_loss(3.7 * t, t).item()) < 1e-5
    assert cosine_loss(-t, t).item() == pytest.approx(16.0, abs=1e-4)  # 8 rows * (1 - (-1))


# 4. Sampled mode.


def test_sampled_close_to_exact_and_deterministic():
    s, t = _batch(8, seed=8)
    exact = relative_similarity_loss(s, t).item()
    k = 1_000_000  # ~0.1 s on CPU; 200k would give a 5-SE tolerance of ~5e-3

    def sampled(seed):
        gen = torch.Generator().manual_seed(seed)
        return relative_similarity_loss(s, t, num_samples=k, generator=gen).item()

    # Tolerance: 5 standard errors of a mean over the ~k/2 kept draws (half of P x P has
    # tt[a] > tt[b]), using the hinge std over all valid (a, b): ~0.29 here, so tol ~2e-3.
    sn, tn = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    i, j = torch.triu_indices(8, 8, offset=1)
    ss, tt = (sn @ sn.T)[i, j], (tn @ tn.T)[i, j]
    hinges = torch.relu(ss[None, :] - ss[:, None] + MARGIN)[tt[:, None] > tt[None, :]]
    tol = 5 * hinges.std().item() / math.sqrt(k / 2)
    assert tol < 3e-3  # keeps the check sharp enough to catch a wrong estimator
    assert abs(sampled(0) - exact) < tol
    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)


def test_sampled_has_gradient_and_handles_no_kept():
    s, t = _batch(6, seed=9)
    s.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    loss = relative_similarity_loss(s, t, num_samples=1000, generator=gen)
    (g,) = torch.autograd.grad(loss, s)
    assert g.abs().max() > 0
    flat = torch.eye(6, 12)  # all target sims are exactly 0: every (a, b) ties, none kept
    assert relative_similarity_loss(s, flat, num_samples=100, generator=gen).item() == 0.0


# 5. Edge cases.


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("num_samples", [None, 100])
def test_relative_tiny_batches_are_zero_with_backward(b, num_samples):
    s, t = _batch(b)
    s.requires_grad_(True)
    loss = relative_similarity_loss(s, t, num_samples=num_samples)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_relative_all_ties_is_zero_with_backward():
    s, _ = _batch(5)
    s.requires_grad_(True)
    loss = relative_similarity_loss(s, torch.eye(5, 12))  # all target sims exactly 0
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


def test_similarity_single_row_is_zero():
    s, t = _batch(1)
    assert similarity_loss(s, t).item() == pytest.approx(0.0, abs=1e-7)


def test_cosine_mismatched_dims_raises():
    s, t = _batch(4, 8, 12)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 12\)"):
        cosine_loss(s, t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32(dtype):
    s, t = _batch(6, 8, 8, seed=10)
    for fn in (cosine_loss, similarity_loss, relative_similarity_loss):
        got = fn(s.to(dtype), t.to(dtype))
        assert got.dtype == torch.float32
        # Same as upcasting the rounded inputs first: nothing is computed in low precision.
        want = fn(s.to(dtype).float(), t.to(dtype).float())
        assert got.item() == pytest.approx(want.item(), abs=1e-6)


# 6. gradcheck of the exact relative loss (float64).


def _gradcheck_inputs():
    """Smallest seed whose B=4 batch has every valid hinge argument at least 1e-3 from 0."""
    for seed in range(100):
        s, t = _batch(4, 3, 5, seed=seed, dtype=torch.float64)
        sn, tn = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        i, j = torch.triu_indices(4, 4, offset=1)
        ss, tt = (sn @ sn.T)[i, j], (tn @ tn.T)[i, j]
        args = (ss[None, :] - ss[:, None] + MARGIN)[tt[:, None] > tt[None, :]]
        if args.abs().min() > 1e-3 and (args > 0).any() and (args < 0).any():
            return s, t
    raise AssertionError("no suitable seed")


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_relative_gradcheck(chunk_size):
    s, t = _gradcheck_inputs()
    s.requires_grad_(True)
    assert relative_similarity_loss(s, t).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda x: relative_similarity_loss(x, t, chunk_size=chunk_size), (s,), eps=1e-6, atol=1e-7
    )


# 7. Sort-based exact relative loss (batches of SORTED_FROM_PAIRS pairs and more): equal to the
# (P, P) form and to the chunked one, ties in tt and ss included, in float64 to 1e-10.


def _pairs_full_form(ss, tt, margin):
    """The relative loss on pair similarities from the whole (P, P) matrix, plain autograd."""
    valid = tt[:, None] > tt[None, :]
    hinge = torch.relu(ss[None, :] - ss[:, None] + margin)
    return (hinge * valid).sum() / valid.sum().clamp_min(1)


def _pair_values(p, kind, seed):
    """(ss, tt) of P pairs in [-1, 1], float64. Rounded kinds are multiples of 1/8 or 1/4, so
    differences and margins of 0.25 are exact and ss[b] - ss[a] + margin hits 0 exactly."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.rand(p, generator=g, dtype=torch.float64) * 2 - 1
    tt = torch.rand(p, generator=g, dtype=torch.float64) * 2 - 1
    if kind in ("tt_ties", "both_ties"):
        tt = (tt * 4).round() / 4  # 9 values: large groups of equal tt
    if kind == "both_ties":
        ss = (ss * 8).round() / 8
    if kind == "flat":
        tt = torch.full_like(tt, 0.5)  # no (a, b) with tt[a] > tt[b]: N = 0
    return ss, tt


def _value_and_grad(fn, ss, tt):
    ss = ss.clone().requires_grad_(True)
    loss = fn(ss, tt)
    (grad,) = torch.autograd.grad(loss, ss)
    return loss.detach(), grad


@pytest.mark.parametrize("p", [1, 2, 3, 45, 300, 1025])
@pytest.mark.parametrize("kind", ["distinct", "tt_ties", "both_ties", "flat"])
@pytest.mark.parametrize("margin", [0.0, MARGIN, 0.25])
def test_sorted_equals_full_form_and_chunked(p, kind, margin):
    ss, tt = _pair_values(p, kind, seed=p)
    got = _value_and_grad(lambda s, t: _SortedRankHinge.apply(s, t, margin), ss, tt)
    full = _value_and_grad(lambda s, t: _pairs_full_form(s, t, margin), ss, tt)
    chunked = _value_and_grad(lambda s, t: _ChunkedRankHinge.apply(s, t, margin, 64), ss, tt)
    for want in (full, chunked):
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-15)  # 0 vs rounding
    if kind == "flat" or p < 3:
        assert got[0] == 0 and torch.all(got[1] == 0)
    else:  # the comparisons above are not between two zero results
        assert got[0] > 0.01 and got[1].abs().max() > 0


def test_sorted_counts_hinges_at_exactly_zero_as_inactive():
    # ss[b] - ss[a] + margin == 0 exactly for (a, b) = (pair 1, pair 0): inactive, no gradient;
    # a searchsorted on the wrong side would count it.
    ss = torch.tensor([0.25, 0.5, 0.0, 0.75], dtype=torch.float64)
    tt = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    for margin in (0.25, 0.0):
        got = _value_and_grad(lambda s, t, m=margin: _SortedRankHinge.apply(s, t, m), ss, tt)
        want = _value_and_grad(lambda s, t, m=margin: _pairs_full_form(s, t, m), ss, tt)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("b", [24, 25, 40])
def test_relative_with_duplicate_rows_equals_full_form(b):
    # B = 24 is the last chunked batch, 25 the first sort-based one; duplicated rows give
    # exactly equal pair similarities.
    assert (b * (b - 1) // 2 >= SORTED_FROM_PAIRS) == (b >= 25)
    s, t = _batch(b, seed=11, dtype=torch.float64)
    t[1::3] = t[0::3][: len(t[1::3])]  # ties in tt
    s[b // 2 :: 4] = s[b // 2]  # ties in ss
    got = _value_and_grad(lambda x, y: relative_similarity_loss(x, y), s, t)
    want = _value_and_grad(_full_form, s, t)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
    assert want[1].abs().max() > 1e-3


def test_relative_sorted_path_all_equal_targets_is_zero_with_backward():
    s, _ = _batch(30)
    s.requires_grad_(True)
    loss = relative_similarity_loss(s, torch.ones(30, 12))  # every target sim is the same
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


def test_sorted_float32_matches_chunked():
    s, t = _batch(64, seed=12)
    ss, tt = _pair_sims(F.normalize(s, dim=-1)), _pair_sims(F.normalize(t, dim=-1))
    got = _value_and_grad(lambda x, y: _SortedRankHinge.apply(x, y, MARGIN), ss, tt)
    want = _value_and_grad(lambda x, y: _ChunkedRankHinge.apply(x, y, MARGIN, 1024), ss, tt)
    assert got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1])


def test_sorted_scales_with_grad_output():
    ss, tt = _pair_values(50, "tt_ties", seed=13)
    g1 = _value_and_grad(lambda s, t: _SortedRankHinge.apply(s, t, MARGIN), ss, tt)[1]
    g3 = _value_and_grad(lambda s, t: 3.0 * _SortedRankHinge.apply(s, t, MARGIN), ss, tt)[1]
    torch.testing.assert_close(g3, 3.0 * g1)


def test_sorted_gradcheck():
    s, t = _gradcheck_inputs()
    tt = _pair_sims(F.normalize(t, dim=-1))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: _SortedRankHinge.apply(_pair_sims(F.normalize(x, dim=-1)), tt, MARGIN),
        (s,), eps=1e-6, atol=1e-7,
    )
