"""The stage objective: named terms, weights, self-distillation targets, float32 under autocast."""

from __future__ import annotations

import pytest
import torch

from mtd.losses.objective import Objective
from mtd.losses.terms import cosine_loss, relative_similarity_loss, similarity_loss


def _objective(**kw) -> Objective:
    return Objective(heads={"fc1": ("cos", "sim", "resim"), "fc8": ("sim", "resim")},
                     targets={"fc8": "self:fc1"}, weights={"cos": 10.0, "sim": 200.0, "resim": 20.0}, **kw)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"fc1": torch.randn(16, 24, generator=g), "fc8": torch.randn(16, 8, generator=g)}, \
        torch.randn(16, 24, generator=g)


def test_terms_weights_and_self_target():
    outputs, teacher = _batch()
    terms = _objective()(outputs, teacher)
    assert set(terms) == {"fc1/cos", "fc1/sim", "fc1/resim", "fc8/sim", "fc8/resim", "loss"}
    assert terms["fc8/sim"] == pytest.approx(similarity_loss(outputs["fc8"], outputs["fc1"]).item())
    expected = (10 * cosine_loss(outputs["fc1"], teacher) + 200 * similarity_loss(outputs["fc1"], teacher)
                + 20 * relative_similarity_loss(outputs["fc1"], teacher)
                + 200 * terms["fc8/sim"] + 20 * terms["fc8/resim"])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_float32_under_autocast():
    """Mixed precision must not reach the losses: their margin is a few bf16 steps wide."""
    outputs, teacher = _batch(1)
    reference = _objective()(outputs, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _objective()(outputs, teacher)
    for name, value in reference.items():
        assert under[name].dtype == torch.float32
        assert under[name].item() == pytest.approx(value.item(), rel=1e-6), name


def test_unknown_term_is_refused():
    outputs, teacher = _batch()
    bad = Objective(heads={"fc1": ("cosine",)}, targets={}, weights={"cosine": 1.0})
    with pytest.raises(ValueError, match="Unknown loss term 'cosine'"):
        bad(outputs, teacher)


def test_cos_mean_is_the_sum_over_the_batch_size():
    outputs, teacher = _batch()
    assert cosine_loss(outputs["fc1"], teacher, "mean").item() == pytest.approx(
        cosine_loss(outputs["fc1"], teacher).item() / 16, rel=1e-6)
    with pytest.raises(ValueError, match="sum or mean"):
        cosine_loss(outputs["fc1"], teacher, "avg")


def test_gradient_shares_are_each_terms_part_of_the_output_gradient():
    outputs, teacher = _batch()
    shares = _objective().gradient_shares(outputs, teacher)
    assert set(shares) == {"fc1/cos", "fc1/sim", "fc1/resim", "fc8/sim", "fc8/resim"}
    assert sum(shares.values()) == pytest.approx(1.0)
    s = outputs["fc1"].clone().requires_grad_()
    (g_cos,) = torch.autograd.grad(10 * cosine_loss(s, teacher), s)
    (g_sim,) = torch.autograd.grad(200 * similarity_loss(s, teacher), s)
    ratio = float(g_cos.norm() / g_sim.norm())
    assert shares["fc1/cos"] / shares["fc1/sim"] == pytest.approx(ratio, rel=1e-5)
    # Averaging cos over the batch divides its gradient by B: its share drops accordingly.
    mean_shares = _objective(cos_reduction="mean").gradient_shares(outputs, teacher)
    assert mean_shares["fc1/cos"] < shares["fc1/cos"] / 4
    assert not any(v.requires_grad for v in outputs.values())  # measured on copies


def test_a_self_target_teaches_without_learning():
    """A self-distilled head (fc8 <- self:fc1) sends no gradient into the head that teaches it."""
    outputs, teacher = _batch(2)
    outputs = {h: v.clone().requires_grad_() for h, v in outputs.items()}
    only_fc8 = Objective(heads={"fc8": ("sim", "resim")}, targets={"fc8": "self:fc1"},
                         weights={"sim": 200.0, "resim": 20.0})
    only_fc8(outputs, teacher)["loss"].backward()
    assert outputs["fc8"].grad.abs().sum() > 0
    assert outputs["fc1"].grad is None
