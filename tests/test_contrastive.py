"""Contrastive terms (DisCo's CKD, similarity-distribution KL, pair InfoNCE) against explicit
computations, and the CKD queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mtd.config import StageConfig
from mtd.io import WeightsError
from mtd.losses.objective import Objective, PairOutputs
from mtd.losses.terms import contrastive_distillation_loss, pair_info_nce_loss, similarity_kl_loss
from mtd.models.student import LOGIT_SCALE
from mtd.training.queue import QUEUE_FILE, TargetQueue, load_queues, save_queues


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(rows):
    return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows.tolist()]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True))


def _log_softmax_at(logits, i):
    top = max(logits)
    return logits[i] - top - math.log(sum(math.exp(x - top) for x in logits))


# ---------------------------------------------------------------------------------------------
# CKD


def _ckd_reference(s, t, q, tau):
    """-log softmax of s_i . t_i among {t_j}: other rows not equal to t_i, queued vectors equal to
    no batch target."""
    s, t, q = _unit(s), _unit(t), _unit(q) if q is not None else []
    q = [c for c in q if all(_dot(c, tj) <= 1 - 1e-6 for tj in t)]
    total = 0.0
    for i, si in enumerate(s):
        candidates = [t[i]] + [c for j, c in enumerate(t) if j != i and _dot(c, t[i]) <= 1 - 1e-6] + q
        total -= _log_softmax_at([_dot(si, c) / tau for c in candidates], 0)
    return total / len(s)


def test_ckd_equals_explicit_computation_with_queue():
    s, t, q = _rand(5, 7, seed=1), _rand(5, 7, seed=2), _rand(11, 7, seed=3)
    got = contrastive_distillation_loss(s, t, q, temperature=0.1)
    assert got.item() == pytest.approx(_ckd_reference(s, t, q, 0.1), rel=1e-10)


def test_ckd_without_queue_is_cross_entropy_over_the_batch_targets():
    s, t = _rand(6, 4, seed=4), _rand(6, 4, seed=5)
    logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / 0.05
    want = F.cross_entropy(logits, torch.arange(6))
    assert contrastive_distillation_loss(s, t, None, 0.05).item() == pytest.approx(want.item(), rel=1e-12)
    assert contrastive_distillation_loss(s, t, t[:0], 0.05).item() == pytest.approx(want.item(), rel=1e-12)


def test_ckd_never_counts_a_text_twice():
    """The same text queued from an earlier batch is left out; a duplicate in the batch is not its
    copy's negative."""
    s, t, q = _rand(4, 6, seed=6), _rand(4, 6, seed=7), _rand(5, 6, seed=8)
    plain = contrastive_distillation_loss(s, t, q, 0.05)
    with_copies = contrastive_distillation_loss(s, t, torch.cat([q, 3 * t[[2, 0]]]), 0.05)
    assert with_copies.item() == pytest.approx(plain.item(), rel=1e-12)
    # A duplicate row in the batch: each copy is not the other's negative.
    s2, t2 = torch.cat([s, s[:1]]), torch.cat([t, t[:1]])
    assert contrastive_distillation_loss(s2, t2, q, 0.05).item() == pytest.approx(
        _ckd_reference(s2, t2, q, 0.05), rel=1e-10)


def test_ckd_gives_the_target_no_gradient_and_a_learned_temperature_one():
    s = _rand(4, 5, seed=9).requires_grad_()
    t = _rand(4, 5, seed=10).requires_grad_()
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    contrastive_distillation_loss(s, t, _rand(3, 5, seed=11), 1 / scale).backward()
    assert t.grad is None and s.grad.abs().sum() > 0 and scale.grad.abs() > 0


def test_ckd_refuses_other_dims():
    with pytest.raises(ValueError, match="equal dims"):
        contrastive_distillation_loss(_rand(3, 4), _rand(3, 5))


# ---------------------------------------------------------------------------------------------
# Similarity-distribution KL


def _kl_reference(s, t, tau):
    s, t = _unit(s), _unit(t)
    total = 0.0
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        ls = [_dot(s[i], s[j]) / tau for j in others]
        lt = [_dot(t[i], t[j]) / tau for j in others]
        for k in range(len(others)):
            p_t = math.exp(_log_softmax_at(lt, k))
            total += p_t * (_log_softmax_at(lt, k) - _log_softmax_at(ls, k))
    return total / len(s)


def test_kl_equals_explicit_computation():
    s, t = _rand(6, 5, seed=12), _rand(6, 9, seed=13)
    assert similarity_kl_loss(s, t, 0.1).item() == pytest.approx(_kl_reference(s, t, 0.1), rel=1e-10)


def test_kl_is_zero_for_a_rotated_target_and_positive_otherwise():
    s = _rand(5, 6, seed=14)
    q, _ = torch.linalg.qr(_rand(6, 6, seed=15))
    assert similarity_kl_loss(s, s @ q, 0.05).item() == pytest.approx(0.0, abs=1e-12)
    assert similarity_kl_loss(s, _rand(5, 6, seed=16), 0.05).item() > 0.01


# ---------------------------------------------------------------------------------------------
# Pair InfoNCE (MultipleNegativesRankingLoss)


def _pair_reference(a, p, n, groups, tau):
    a, p = _unit(a), _unit(p)
    n = _unit(n) if n is not None else []
    total = 0.0
    for i in range(len(a)):
        others = [j for j in range(len(p)) if j != i and (groups is None or groups[j] != groups[i])]
        positives = [p[i]] + [p[j] for j in others]
        total -= _log_softmax_at([_dot(a[i], c) / tau for c in positives + n], 0)
    return total / len(a)


@pytest.mark.parametrize("negatives", [False, True])
@pytest.mark.parametrize("groups", [None, [0, 1, 0, 2, 1]])
def test_pair_loss_equals_explicit_computation(negatives, groups):
    a, p = _rand(5, 6, seed=17), _rand(5, 6, seed=18)
    n = _rand(5, 6, seed=19) if negatives else None
    g = None if groups is None else torch.tensor(groups)
    got = pair_info_nce_loss(a, p, n, g, temperature=0.05)
    assert got.item() == pytest.approx(_pair_reference(a, p, n, groups, 0.05), rel=1e-10)


def test_pair_loss_is_sentence_transformers_mnrl():
    """scale 20 = temperature 0.05: the same as sentence-transformers' MultipleNegativesRankingLoss."""
    from sentence_transformers import util

    a, p, n = _rand(4, 6, seed=20), _rand(4, 6, seed=21), _rand(4, 6, seed=22)
    scores = util.cos_sim(a, torch.cat([p, n])) * 20.0
    want = F.cross_entropy(scores, torch.arange(4))
    assert pair_info_nce_loss(a, p, n, None, 0.05).item() == pytest.approx(want.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# The queue


def test_queue_holds_the_latest_targets_in_order():
    q = TargetQueue(5, 2)
    batches = [_rand(2, 2, seed=i).float() for i in range(4)]  # 8 vectors pushed into 5 places
    for b in batches[:2]:
        q.push(b)
    assert torch.allclose(q.contents(), F.normalize(torch.cat(batches[:2]), dim=-1))
    for b in batches[2:]:
        q.push(b)
    want = F.normalize(torch.cat(batches), dim=-1)[-5:]
    assert q.count == 5 and torch.allclose(q.contents(), want)
    assert sorted(map(tuple, q.negatives().tolist())) == sorted(map(tuple, want.tolist()))
    q.push(_rand(7, 2, seed=9).float())  # a batch larger than the queue: its last 5 rows
    assert torch.allclose(q.contents(), F.normalize(_rand(7, 2, seed=9).float(), dim=-1)[-5:])


def test_queue_round_trips_through_a_checkpoint_file(tmp_path):
    q = TargetQueue(6, 3)
    for i in range(3):
        q.push(_rand(4, 3, seed=i).float())  # wrapped around: start is mid-buffer
    save_queues({"teacher": q}, tmp_path)
    again = load_queues(tmp_path, {"teacher"}, 6, "cpu", "fix")
    assert torch.equal(again["teacher"].contents(), q.contents())
    nxt = _rand(2, 3, seed=7).float()
    q.push(nxt)
    again["teacher"].push(nxt)
    assert torch.equal(again["teacher"].contents(), q.contents())
    assert sorted(load_file(tmp_path / QUEUE_FILE)) == ["teacher", "teacher.start"]
    assert torch.equal(again["teacher"].negatives(), q.negatives())  # same order: bit-equal losses
    with pytest.raises(WeightsError, match="self:fc1"):
        load_queues(tmp_path, {"self:fc1"}, 6, "cpu", "fix")


# ---------------------------------------------------------------------------------------------
# In the objective


def test_objective_ckd_uses_the_queue_of_its_target_source_and_a_learned_scale():
    stage = StageConfig(name="s", heads={"fc1": ["ckd", "kl"]}, weights={"ckd": 2.0, "kl": 3.0},
                        temperature=0.1, queue_size=8, steps=1)
    obj = Objective.from_stage(stage)
    s, t, q = _rand(4, 6, seed=30).float(), _rand(4, 6, seed=31).float(), _rand(8, 6, seed=32).float()
    terms = obj({"fc1": s}, t, queues={"teacher": q})
    want = contrastive_distillation_loss(s, t, q, 0.1).item()
    assert terms["fc1/ckd"].item() == pytest.approx(want, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(2 * want + 3 * terms["fc1/kl"].item(), rel=1e-6)
    assert obj.queue_sources == {"teacher"}
    assert torch.equal(obj.queue_batch({"fc1": s}, {"teacher": t})["teacher"], t)
    learned = obj({"fc1": s, LOGIT_SCALE + "fc1": torch.tensor(4.0)}, t, queues={"teacher": q})
    want = contrastive_distillation_loss(s, t, q, 0.25).item()
    assert learned["fc1/ckd"].item() == pytest.approx(want, rel=1e-6)
    assert learned["fc1/temperature"].item() == pytest.approx(0.25)


def test_objective_pair_term_reads_the_positives_and_distills_the_anchors():
    stage = StageConfig(name="s", data="pairs", heads={"fc1": ["pair", "cos"]}, steps=1)
    obj = Objective.from_stage(stage)
    a, p, t = _rand(4, 6, seed=33).float(), _rand(4, 6, seed=34).float(), _rand(4, 6, seed=35).float()
    groups = torch.tensor([0, 0, 1, 2])
    terms = obj({"fc1": a}, t, pairs=PairOutputs({"fc1": p}, None, groups))
    assert terms["fc1/pair"].item() == pytest.approx(pair_info_nce_loss(a, p, None, groups).item(), rel=1e-6)
    assert terms["fc1/cos"].item() > 0
