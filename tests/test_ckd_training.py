"""CKD and KL in training: the queue in checkpoints, resume, two processes, a learned temperature."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import (
    FAST,
    _launch,
    assert_same_rows,
    assert_same_weights,
    read_log,
    student_weights,
    train_rows,
)

from mtd.config import dump_config
from mtd.models.student import load_student
from mtd.training import pipeline
from mtd.training.queue import QUEUE_FILE

# Stage 3 adds ckd (queue of 48 = 1.5 batches: it wraps around within 10 steps) and kl to fc1.
CKD = ("stages.2.heads.fc1=[cos, sim, resim, ckd, kl]", "stages.2.queue_size=48",
       "stages.2.weights.ckd=2.0")


def _queue(run_dir, step):
    return load_file(next((run_dir / "checkpoints").glob(f"2-stage3-step{step:07d}")) / QUEUE_FILE)["teacher"]


def test_ckd_queue_is_checkpointed_and_a_resumed_run_equals_an_uninterrupted_one(config):
    a = pipeline.run(config("name=a", *FAST, *CKD, "train.keep_checkpoints=5"))
    rows = train_rows(read_log(a), stage=2)
    assert all("fc1/ckd" in r and "fc1/kl" in r for r in rows)
    queue = _queue(a, 5)  # in storage order
    assert queue.shape == (48, 80)  # full after 1.5 batches of 32 (targets: 32 + 48 dims)
    assert torch.allclose(queue.norm(dim=1), torch.ones(48))
    b = pipeline.run(config("name=b", *FAST, *CKD, "train.max_steps_per_job=25"))
    assert not (b / "student").exists()
    pipeline.run(config("name=b", *FAST, *CKD), resume=True)
    assert torch.equal(_queue(b, 5), queue)
    assert_same_weights(student_weights(a), student_weights(b))
    assert_same_rows(train_rows(read_log(a)), train_rows(read_log(b)))


def test_learned_temperature_trains_and_is_saved(config):
    run = pipeline.run(config(*FAST, *CKD, "stages.2.learn_temperature=true"))
    rows = train_rows(read_log(run), stage=2)
    temps = [r["fc1/temperature"] for r in rows]
    assert temps[0] != temps[-1] and all(0.01 <= t < 1 for t in temps)
    student, _, _ = load_student(run / "student")
    assert abs(1 / float(student.log_scales["fc1"].detach().exp()) - temps[-1]) < 0.01
    assert "log_scales" in json.loads((run / "student" / "student.json").read_text())
    assert "temperature" not in json.dumps(json.loads((run / "final" / "modules.json").read_text()))


@pytest.mark.multiprocess
def test_two_processes_hold_the_queue_one_process_holds(config, tmp_path):
    one = pipeline.run(config("name=one", *FAST, *CKD, "train.keep_checkpoints=5"))
    cfg2 = config("name=two", *FAST, *CKD, "train.keep_checkpoints=5")
    yaml_path = tmp_path / "two.yaml"
    yaml_path.write_text(dump_config(cfg2))
    proc = _launch(yaml_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = cfg2.run_dir
    # Both ranks' queues were checked equal at each save; the saved one is the 1-process queue.
    mid = next((two / "checkpoints").glob("2-*step0000005"))
    assert sorted(p.name for p in mid.glob("random_states_*")) == [f"random_states_{r}.pkl" for r in (0, 1)]
    torch.testing.assert_close(_queue(two, 5), _queue(one, 5), rtol=0, atol=1e-6)
    assert_same_rows(train_rows(read_log(one)), train_rows(read_log(two)), rel=1e-3)


def test_the_loss_never_sees_its_own_batch_in_the_queue(config, monkeypatch):
    """Each batch is queued after its loss: no queued vector is one of the batch's targets (the
    corpus has no duplicate texts, and 10 steps of 32 never come round to a text again)."""
    import mtd.losses.objective as objective

    seen = []
    real = objective.Objective.__call__

    def spy(self, outputs, targets, *args, queues=None, **kwargs):
        if queues:
            t = torch.nn.functional.normalize(targets["teacher"].float(), dim=-1)
            seen.append(float((t @ queues["teacher"].T).max()))
        return real(self, outputs, targets, *args, queues=queues, **kwargs)

    monkeypatch.setattr(objective.Objective, "__call__", spy)
    pipeline.run(config(*FAST, *CKD))
    assert len(seen) >= 9 and max(seen) < 0.9999
