"""The trainer's gradient and modes at its first steps, read where AdamW and frozen parts hide them.

AdamW ignores the gradient's overall scale (a gradient 1/2 or 2x too big trains the same weights),
a frozen head cannot show a missing detach, and dropout 0 cannot show a wrong train/eval mode; so
these tests stop a tiny run after its first optimizer step (tests/gradprobe.py) and read `.grad`.
"""

from __future__ import annotations

import copy
import json

import gradprobe
import pytest
import torch
from gradprobe import Probe, launch_two_processes

from mtd.config import dump_config
from mtd.losses.objective import Objective

BOTH_HEADS = "stages.0.heads={fc1: [cos, sim, resim], fc16: [sim, resim]}"


@pytest.fixture
def config(tiny_config, shared_cache):
    """tiny_config, with the target cache shared between tests (building it is the slow part)."""
    return lambda *overrides: tiny_config(f"cache_dir={json.dumps(str(shared_cache))}", *overrides)


@pytest.fixture
def probe(monkeypatch):
    """probe(steps=1) -> a Probe wrapping the trainer until the test ends."""
    return lambda steps=1: Probe(steps).install(monkeypatch.setattr)


def assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float):
    """Every tensor within rtol of the expected one (atol: rtol of its largest element, so that
    elements analytically zero but rounding noise in practice do not count)."""
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        torch.testing.assert_close(got[name], e, rtol=rtol, atol=rtol * float(e.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def batch_gradient(student, objective: Objective, inputs: dict, targets: dict) -> dict[str, torch.Tensor]:
    """`.grad` of every trainable parameter of a copy of `student` after one plain backward."""
    model = copy.deepcopy(student)
    model.zero_grad(set_to_none=True)
    objective(model(**inputs), targets)["loss"].backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_self_distillation_target_sends_no_gradient_to_its_source(config, probe):
    """fc16 learns self:fc1 while fc1 and the encoder train too: fc1's gradient must be that of its
    own terms alone (the self target is detached), while the self term does reach the encoder."""
    plain = ("stages.0.train=all", "stages.0.heads={fc1: [cos, sim]}")
    self_target = ("stages.0.train=all", "stages.0.heads={fc1: [cos, sim], fc16: [sim, resim]}",
                   "stages.0.targets={fc16: 'self:fc1'}")
    ref = probe().run(config("name=plain", *plain)).grads[0]
    got = probe().run(config("name=self", *self_target)).grads[0]
    assert float(got["heads.fc16.weight"].abs().max()) > 0
    emb = "encoder.embeddings.word_embeddings.weight"
    assert not torch.allclose(got[emb], ref[emb])  # the self term trains the encoder ...
    for name in ("heads.fc1.weight", "heads.fc1.bias"):  # ... and leaves its source alone
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("train, dropout_on", [("heads", False), ("all", True)])
def test_encoder_dropout_only_where_the_encoder_trains(config, probe, train, dropout_on):
    """Heads-only stages read frozen features: the encoder in eval mode (no dropout noise) at every
    step, also after a dev evaluation; stages that train the encoder keep its dropout."""
    # The per-step encoder (train.frozen_features computes a heads-only stage's features once,
    # in eval mode too: test_trainer's frozen-features test).
    cfg = config(f"stages.0.train={train}", "stages.0.steps=3", "train.eval_every=1",
                 "train.frozen_features=false", "student.model_config.hidden_dropout_prob=0.3",
                 "student.model_config.attention_probs_dropout_prob=0.3")
    seen = probe(steps=3).run(cfg)
    assert len(seen.students) == 3
    for step, (student, (inputs, _)) in enumerate(zip(seen.students, seen.batches, strict=True)):
        assert student.encoder.training is dropout_on, f"train={train}, step {step + 1}"
        with torch.no_grad():
            first, second = (student.encoder(**inputs).last_hidden_state for _ in range(2))
        assert torch.equal(first, second) is not dropout_on, f"train={train}, step {step + 1}"


@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_gradient(config, probe, tmp_path):
    """2 processes with 16 rows each: the same `.grad` as 1 process with the 32-row batch (the
    in-batch losses see the gathered batch, and their gradient reaches every rank's rows)."""
    over = ("stages.0.train=all", BOTH_HEADS)
    one = probe().run(config("name=one", *over)).grads[0]
    yaml_path, out = tmp_path / "two.yaml", tmp_path / "two-grads.pt"
    yaml_path.write_text(dump_config(config("name=two", *over)))
    proc = launch_two_processes(gradprobe.__file__, str(yaml_path), str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_same_grads(torch.load(out), one, rtol=1e-4)


def test_grad_accum_gives_the_mean_of_its_micro_batch_gradients(config, probe):
    """grad_accum=2: the step's gradient is the mean of the two micro-batches' gradients, each
    computed here with a plain backward (in-batch losses see one micro-batch each)."""
    cfg = config("stages.0.train=all", BOTH_HEADS, "stages.0.batch_size=16", "train.grad_accum=2")
    seen = probe().run(cfg)
    assert len(seen.batches) == 2
    assert not torch.equal(seen.batches[0][1]["teacher"], seen.batches[1][1]["teacher"])
    objective = Objective.from_stage(cfg.stages[0])
    parts = [batch_gradient(seen.students[0], objective, inputs, targets)
             for inputs, targets in seen.batches]
    mean = {name: (parts[0][name] + parts[1][name]) / 2 for name in parts[0]}
    assert_same_grads(seen.grads[0], mean, rtol=1e-5)
