"""Trainable weights are float32 whatever a checkpoint stores; mixed precision is autocast.

Many hub models are stored in float16, and transformers 5 loads the stored dtype: a student
started from such a file used to train half-precision master weights (NaN under bf16 autocast,
"mat1 and mat2 must have the same dtype" without it).
"""

import json
import math

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from mtd.models.student import transformer_subfolder
from mtd.training import pipeline


@pytest.fixture(scope="module")
def float16_checkpoint(tiny_assets, tmp_path_factory):
    """teacher_a's transformer saved in float16, as a plain transformers folder."""
    source = transformer_subfolder(tiny_assets / "teacher_a")
    folder = tmp_path_factory.mktemp("fp16") / "model"
    AutoModel.from_pretrained(source).half().save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    assert AutoModel.from_pretrained(folder).dtype == torch.float16  # what transformers 5 keeps
    return folder


def _pretrained_from(cfg_factory, folder, *overrides):
    return cfg_factory(
        "student.init=pretrained", f"student.path={json.dumps(str(folder))}",
        "student.model_config={}", *overrides)


def test_student_from_a_float16_checkpoint_has_float32_weights(tiny_config, float16_checkpoint):
    student, _ = pipeline.build_student(_pretrained_from(tiny_config, float16_checkpoint), 80)
    dtypes = {p.dtype for p in student.parameters()}
    assert dtypes == {torch.float32}


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one precision per process; these tests use two in one pytest process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_float16_checkpoint_trains_to_finite_falling_loss(tiny_config, float16_checkpoint, precision):
    cfg = _pretrained_from(
        tiny_config, float16_checkpoint, f"train.mixed_precision={precision}",
        "stages=[{name: s1, train: all, heads: {fc1: [cos, sim, resim]}, lr: 3.0e-3, steps: 20, "
        "batch_size: 32}]", "eval.teachers=false")
    run_dir = pipeline.run(cfg)
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
