"""configs/full.yaml, the one-GPU full-scale recipe: it loads, validates and fits its data, without
training (its size is checked here; its time needs a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtd.config import check_batch_sizes, check_dims, load_config

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "configs" / "full.yaml"
CORPORA = ROOT.parent / "shared" / "data" / "corpus"
THREE_LAYERS = ["name=full-l3", "student.layers=[0,3,5]"]  # the override full.yaml documents

needs_shared = pytest.mark.skipif(not CORPORA.is_dir(), reason=f"needs the shared corpora at {CORPORA}")


def test_full_recipe_is_the_documented_one():
    cfg = load_config(FULL)
    assert [(t.name, t.path) for t in cfg.teachers] == [
        ("minilm", "models/all-MiniLM-L6-v2"), ("mpnet", "models/all-mpnet-base-v2")]
    s = cfg.student
    assert (s.init, s.path, s.layers) == ("teacher", "models/all-MiniLM-L6-v2", None)  # all layers
    assert s.heads == {"fc1": "target", "fc256": 256}
    assert [(st.steps, st.epochs, st.batch_size) for st in cfg.stages] == [
        (None, 0.5, 256), (None, 1.0, 256), (None, 2.0, 256)]
    assert [st.train for st in cfg.stages] == ["heads", "last:2", "all"]
    assert cfg.train.mixed_precision == "bf16" and cfg.train.num_workers > 0
    assert cfg.data.max_texts is None and cfg.eval.sts_dir == "../shared/data/sts"
    check_dims(cfg, {"fc1": 384 + 768, "fc256": 256}, 384 + 768)  # cos only where dims agree


@needs_shared
def test_full_recipe_reads_every_corpus_and_its_batches_fit(monkeypatch):
    from mtd.training.pipeline import check_model_paths, load_corpus
    from mtd.training.trainer import stage_steps

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the project root
    cfg = load_config(FULL)
    assert sorted(Path(p).name for p in cfg.data.corpus) == sorted(p.name for p in CORPORA.glob("*.txt"))
    check_model_paths(cfg)  # both teachers and the student folder are installed
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 211_540 - 2_000
    for processes in (1, 2, 4, 8):  # one GPU, or a node of them (batch sizes are global)
        check_batch_sizes(cfg, {"text": len(corpus.train)}, processes)
    # The steps full.yaml's comment budgets for: 0.5 / 1 / 2 epochs of 818 batches of 256.
    assert [stage_steps(st, len(corpus.train), cfg.train.grad_accum) for st in cfg.stages] == [409, 818, 1636]


@needs_shared
@pytest.mark.parametrize("overrides, layers", [([], 6), (THREE_LAYERS, 3)], ids=["full", "full-l3"])
def test_students_of_the_recipe_build(monkeypatch, overrides, layers):
    from mtd.training.pipeline import build_student

    monkeypatch.chdir(ROOT)
    cfg = load_config(FULL, overrides)
    student, _ = build_student(cfg, 384 + 768)
    assert student.encoder.config.num_hidden_layers == layers
    assert student.head_dims == {"fc1": 1152, "fc256": 256}
