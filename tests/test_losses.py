"""Tests for mtd.losses.terms: loop references, chunked vs full form, invariants, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtd.losses.terms import cosine_loss, relative_similarity_loss, similarity_loss

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
