"""bench/stage_sts.py scores a run's student as it stood at the end of each stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mtd.errors import MtdError
from mtd.evaluation.sts import evaluate_sts, load_sts
from mtd.models.student import encode, load_student
from mtd.training import pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ("stages.0.steps=6", "stages.1.steps=6", "stages.2.steps=6", "train.save_every=100")


@pytest.fixture(scope="module")
def stage_sts():
    spec = importlib.util.spec_from_file_location("bench_stage_sts", ROOT / "bench" / "stage_sts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sts_file(texts: list[str], path: Path) -> Path:
    rows = [{"sentence1": a, "sentence2": b, "score": (i * 7) % 6}
            for i, (a, b) in enumerate(zip(texts[0:80:2], texts[1:80:2], strict=True))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_stage_end_is_scored_with_the_heads_trained_so_far(stage_sts, config, tmp_path):
    cfg = config(*FAST)
    run_dir = pipeline.run(cfg)
    sts = _sts_file(pipeline.load_corpus(cfg).texts, tmp_path / "pairs.jsonl")

    rows = stage_sts.score_run(run_dir, [str(sts)])

    assert [(r["stage"], r["head"]) for r in rows] == [
        ("1 stage1", "fc1"), ("2 stage2", "fc1"), ("3 stage3", "fc1"), ("3 stage3", "fc16")]
    # The last stage's end is the saved student: the same scores as scoring that student directly.
    student, tokenizer, max_length = load_student(run_dir / "student")
    pairs = load_sts(sts)
    for head in ("fc1", "fc16"):
        final = evaluate_sts(lambda t, h=head: encode(student, tokenizer, t, h, max_length), pairs, None)
        assert rows[2 if head == "fc1" else 3][pairs.name] == pytest.approx(final["spearman"], abs=0.01)
    # Earlier stages are scored with their own weights, not the final ones.
    assert len({r[pairs.name] for r in rows[:3]}) > 1


def test_a_run_without_stage_ends_is_refused_with_the_fix(stage_sts, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(MtdError, match="finished at least one stage"):
        stage_sts.score_run(tmp_path, [])


def test_stage_ends_are_listed_in_stage_order(stage_sts, tmp_path):
    for name in ("10-late-end", "2-mid-end", "0-first-end", "1-x-step0000004"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "model.safetensors").write_bytes(b"")
    assert [i for i, _ in stage_sts.stage_ends(tmp_path)] == [0, 2, 10]
