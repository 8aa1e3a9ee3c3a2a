"""Contrastive fine-tuning on labeled pairs: a pair stage after distillation, with the anchors'
distillation terms kept; the ready DisCo configs on the tiny assets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_trainer import FAST, read_log, train_rows

from mtd.config import ConfigError, load_config
from mtd.models.student import encode, load_student
from mtd.training import pipeline

ROOT = Path(__file__).resolve().parents[1]


def topic_pairs(corpus: Path, out: Path, negatives: bool = False) -> Path:
    """Pairs of corpus texts on one topic (the synthetic corpus's first word): each text with the
    next text of its topic; a hard negative from another topic."""
    texts = corpus.read_text().splitlines()
    by_topic: dict[str, list[str]] = {}
    for t in texts:
        by_topic.setdefault(t.split()[0], []).append(t)
    topics = sorted(by_topic)
    rows = []
    for k, topic in enumerate(topics):
        group = by_topic[topic]
        other = by_topic[topics[(k + 1) % len(topics)]]
        for i in range(0, len(group) - 1, 2):
            row = {"anchor": group[i], "positive": group[i + 1]}
            rows.append(row | ({"negative": other[i % len(other)]} if negatives else {}))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _pair_stage(pairs: Path, terms: str = "[pair, cos, sim, resim]") -> tuple[str, ...]:
    return (f"pairs.jsonl=[{json.dumps(str(pairs))}]", "stages.2.data=pairs", "stages.2.train=all",
            f"stages.2.heads={{fc1: {terms}}}", "stages.2.lr=1.0e-3", "stages.2.steps=60",
            "stages.2.weights.pair=20.0")


def _topic_accuracy(run: Path, corpus: Path) -> float:
    """Share of texts whose nearest other text (fc1 cosine) shares its topic."""
    texts = corpus.read_text().splitlines()[:600]
    student, tok, n = load_student(run / "student")
    v = encode(student, tok, texts, "fc1", n)
    sims = v @ v.T
    np.fill_diagonal(sims, -2)
    topics = np.array([t.split()[0] for t in texts])
    return float((topics[sims.argmax(1)] == topics).mean())


@pytest.mark.parametrize("negatives", [False, True])
def test_pair_stage_after_distillation_trains_and_learns_topics(tiny_config, tiny_assets, tmp_path, negatives,
                                                               monkeypatch):
    import mtd.losses.objective as objective

    corpus = tiny_assets / "corpus.txt"
    pairs = topic_pairs(corpus, tmp_path / "pairs.jsonl", negatives)
    plain = pipeline.run(tiny_config("name=plain", *FAST, "stages.2.steps=60"))
    seen, real = [], objective.Objective.__call__

    def spy(self, outputs, targets, *args, pairs=None, **kwargs):
        if pairs is not None:
            seen.append((len(outputs["fc1"]), pairs.negative is not None, len(pairs.groups)))
        return real(self, outputs, targets, *args, pairs=pairs, **kwargs)

    monkeypatch.setattr(objective.Objective, "__call__", spy)
    tuned = pipeline.run(tiny_config("name=tuned", *FAST, *_pair_stage(pairs)))
    assert set(seen) == {(32, negatives, 32)}  # the global batch, its hard negatives, its groups
    rows = train_rows(read_log(tuned), stage=2)
    assert {"fc1/pair", "fc1/cos", "fc1/sim", "fc1/resim"} <= set(rows[0])
    assert rows[-1]["fc1/pair"] < rows[0]["fc1/pair"]
    # Topic pairs as positives: nearest neighbours share a topic more often than after distillation
    assert _topic_accuracy(tuned, corpus) > _topic_accuracy(plain, corpus) + 0.02
    fingerprint = json.loads(next((tuned / "checkpoints").glob("2-*-end/state.json")).read_text())["data"]
    assert fingerprint["pairs"]["count"] == sum(1 for _ in pairs.open())


def test_pair_term_alone_needs_no_teacher_targets(config, tiny_assets, tmp_path):
    pairs = topic_pairs(tiny_assets / "corpus.txt", tmp_path / "pairs.jsonl")
    first = pipeline.run(config("name=first", *FAST))
    only = config("name=only", "student.init=run", f"student.path={json.dumps(str(first))}",
                  "stages=[{name: tune, data: pairs, train: all, heads: {fc1: [pair]}, steps: 10, "
                  "batch_size: 32}]",
                  f"pairs.jsonl=[{json.dumps(str(pairs))}]", "teachers=[]")
    run = pipeline.run(only)
    assert train_rows(read_log(run))[-1]["fc1/pair"] > 0


@pytest.mark.parametrize("overrides, match", [
    (("stages.0.heads={fc1: [cos, pair]}",), "needs labeled pairs"),
    (("stages.2.data=pairs", "pairs.sts=[x.jsonl]"), "no head has the pair term"),
    (("stages.2.data=pairs", "stages.2.heads={fc1: [pair]}"), "none are given"),
    (("stages.0.queue_size=64",), "no head of this stage has the ckd term"),
    (("stages.0.learn_temperature=true",), "no head of this stage has the ckd term"),
])
def test_contrastive_config_mistakes_are_named(tiny_config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(*overrides)


def _on_tiny_assets(name: str, assets: Path, tmp_path: Path, *overrides: str):
    """configs/NAME.yaml with the tiny teachers, corpus and a tiny scratch student, short stages."""
    q = lambda p: json.dumps(str(p))  # noqa: E731
    model = ("{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, "
             "intermediate_size: 64, max_position_embeddings: 64}")
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    steps = [f"stages.{i}.steps=25" for i in range(len(cfg.stages))]
    batch = [f"stages.{i}.batch_size=32" for i in range(len(cfg.stages))]
    return load_config(ROOT / "configs" / f"{name}.yaml", [
        f"output_dir={q(tmp_path / 'runs')}", f"cache_dir={q(tmp_path / 'cache')}",
        f"teachers=[{{name: a, path: {q(assets / 'teacher_a')}}}, "
        f"{{name: b, path: {q(assets / 'teacher_b')}}}]",
        f"data.corpus=[{q(assets / 'corpus.txt')}]", "data.dev_size=200", "eval.sts_dir=null",
        f"student={{init: scratch, path: {q(assets / 'tokenizer')}, model_config: {model}, "
        "heads: {fc1: target, fc256: 256}, max_length: 32}",
        "train.eval_every=0", *steps, *batch, *overrides])


@pytest.mark.parametrize("name, falling", [("ckd", "fc1/ckd"), ("kl", "fc1/kl")])
def test_ready_distillation_configs_train_with_a_falling_loss(tiny_assets, tmp_path, name, falling):
    small_queue = [f"stages.{i}.queue_size=64" for i in range(3)] if name == "ckd" else []
    cfg = _on_tiny_assets(name, tiny_assets, tmp_path, *small_queue, "train.log_every=5",
                          *(f"stages.{i}.lr=3.0e-3" for i in range(3)))
    log = read_log(pipeline.run(cfg))
    for stage in range(3):
        rows = train_rows(log, stage)
        assert rows[-1]["loss"] < rows[0]["loss"], stage
    rows = train_rows(log, 2)  # the whole student trains; the queue is full from the 2nd row on
    assert rows[-1][falling] < rows[1][falling]


@pytest.mark.parametrize("name", ["finetune", "ckd-finetune"])
def test_ready_finetune_configs_train_with_a_falling_loss(tiny_assets, tmp_path, name):
    q = lambda p: json.dumps(str(p))  # noqa: E731
    first = pipeline.run(_on_tiny_assets("default", tiny_assets, tmp_path, "name=first"))
    pairs = topic_pairs(tiny_assets / "corpus.txt", tmp_path / "pairs.jsonl")
    cfg = _on_tiny_assets(name, tiny_assets, tmp_path,
                          "student={init: run, max_length: 32, path: " + q(first) + "}",
                          f"pairs={{jsonl: [{q(pairs)}]}}", "stages.0.lr=1.0e-3", "stages.0.steps=60",
                          "stages.0.weights={pair: 20.0}", "train.log_every=5")
    assert cfg.stages[0].data == "pairs" and cfg.student.init == "run"
    rows = train_rows(read_log(pipeline.run(cfg)))
    assert rows[-1]["fc1/pair"] < rows[0]["fc1/pair"] and rows[-1]["loss"] < rows[0]["loss"]


def test_ckd_on_a_head_of_another_size_is_refused_before_training(tiny_config):
    from mtd.config import check_dims

    cfg = tiny_config("stages.2.heads={fc1: [cos], fc16: [sim, ckd]}")
    with pytest.raises(ConfigError, match="'ckd' needs equal dims.*fc16"):
        check_dims(cfg, {"fc1": 80, "fc16": 16}, 80)


def test_learned_temperature_is_refused_in_image_stages(tiny_config):
    with pytest.raises(ConfigError, match="image stages train the vision side only"):
        tiny_config("stages.2.data=images", "stages.2.train=vision", "stages.2.heads={fc1: [ckd]}",
                    "stages.2.learn_temperature=true")


@pytest.mark.multiprocess
def test_pair_stage_on_two_processes_matches_one(tiny_config, tiny_assets, tmp_path):
    """Each process holds half the pairs; the negatives and groups are those of the global batch.
    (tiny_config: the anchors' cache stays out of the cache other tests share.)"""
    from test_trainer import _launch, assert_same_rows

    from mtd.config import dump_config

    pairs = topic_pairs(tiny_assets / "corpus.txt", tmp_path / "pairs.jsonl", negatives=True)
    one = pipeline.run(tiny_config("name=one", *FAST, *_pair_stage(pairs)))
    cfg2 = tiny_config("name=two", *FAST, *_pair_stage(pairs))
    (tmp_path / "two.yaml").write_text(dump_config(cfg2))
    proc = _launch(tmp_path / "two.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_same_rows(train_rows(read_log(one)), train_rows(read_log(cfg2.run_dir)), rel=1e-3)


def test_the_cache_step_fills_the_anchors_targets_of_a_pair_stage(tiny_config, tiny_assets, tmp_path,
                                                                  monkeypatch):
    """`python -m mtd.cache` on a pair stage that distills: every anchor encoded by each teacher
    once; the run then encodes nothing."""
    from test_cache_step import Counting

    from mtd.cache import main as cache_main
    from mtd.config import dump_config
    from mtd.targets import teachers

    pairs = topic_pairs(tiny_assets / "corpus.txt", tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in pairs.open()]
    for row in rows[::2]:  # half the anchors are texts the corpus lacks
        row["anchor"] = " ".join(reversed(row["anchor"].split()))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(*FAST, *_pair_stage(pairs), "stages.2.steps=5")
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    counting = Counting()
    monkeypatch.setattr(teachers, "encode", counting)
    assert cache_main([str(tmp_path / "run.yaml")]) == 0
    anchors = [json.loads(line)["anchor"] for line in pairs.open()]
    corpus = pipeline.load_corpus(cfg).texts
    new = list(dict.fromkeys(a for a in anchors if a not in set(corpus)))
    assert len(new) > 100
    assert sorted(counting.texts) == sorted(2 * (corpus + new))  # anchors in the corpus are reused
    counting.texts.clear()
    pipeline.run(cfg)
    assert counting.texts == []
