"""mtd.evaluation.analysis: what notebooks/analysis.ipynb shows of a run (the notebook itself runs
in test_notebooks.py)."""

from __future__ import annotations

import json
import logging
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mtd.data.corpus import multi_teacher_target
from mtd.evaluation import analysis
from mtd.evaluation.specs import TeacherEncoder

# A run's log as the trainer writes it: steps restart in every stage; stage3 adds a head.
LOG = [
    {"stage": 0, "stage_name": "s1", "step": 5, "fc1/cos": 9.0, "fc1/sim": 0.5, "loss": 100.0, "lr": 1e-3},
    {"stage": 0, "stage_name": "s1", "step": 10, "fc1/cos": 6.0, "fc1/sim": 0.4, "loss": 70.0, "lr": 1e-4},
    {"stage": 0, "stage_name": "s1", "step": 10, "dev/fc1/cos": 6.5, "dev/fc1/sim": 0.45, "dev/loss": 75.0,
     "dev/share/fc1/cos": 0.9, "dev/share/fc1/sim": 0.1},
    {"stage": 1, "stage_name": "s3", "step": 4, "fc1/cos": 5.0, "fc1/sim": 0.3, "fc16/sim": 0.2,
     "loss": 60.0, "lr": 1e-4},
    {"stage": 1, "stage_name": "s3", "step": 4, "dev/fc1/cos": 5.5, "dev/fc1/sim": 0.35, "dev/fc16/sim": 0.25,
     "dev/loss": 65.0, "dev/share/fc1/cos": 0.7, "dev/share/fc1/sim": 0.3, "dev/share/fc16/sim": 1.0},
]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def write_log(folder, rows, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


# --- the log -----------------------------------------------------------------------------------


def test_log_rows_are_read_and_a_torn_last_row_is_skipped(tmp_path, caplog):
    run = write_log(tmp_path / "run", LOG, tail='{"stage": 1, "stage_name": "s3", "st')
    with caplog.at_level(logging.WARNING):
        assert analysis.read_log(run) == LOG
    assert "line 6: skipped an incomplete last row" in caplog.text


def test_a_damaged_log_row_is_named_with_its_line(tmp_path):
    run = write_log(tmp_path / "run", LOG)
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(analysis.LogFormatError, match=r"log.jsonl, line 2: invalid JSON.*Repair or delete"):
        analysis.read_log(run)


def test_a_folder_without_a_log_says_how_to_make_one(tmp_path):
    with pytest.raises(analysis.AnalysisError, match=r"not a run with a training log\. Train one"):
        analysis.read_log(tmp_path)
    write_log(tmp_path, [])
    with pytest.raises(analysis.AnalysisError, match="holds no rows yet"):
        analysis.read_log(tmp_path)


def test_stages_are_laid_end_to_end():
    segments = analysis.stage_segments(LOG)
    assert segments == [analysis.Segment(0, "s1", 0, 10), analysis.Segment(1, "s3", 10, 14)]
    # rows in any order (e.g. read from several logs) give the same segments
    assert analysis.stage_segments(LOG[::-1]) == analysis.stage_segments(LOG)


def test_the_tidy_table_has_one_row_per_logged_number():
    table = analysis.log_table(LOG)
    assert list(table.columns) == list(analysis.COLUMNS)
    numbers = sum(len(r) - len(analysis.LOG_KEYS) for r in LOG)
    assert len(table) == numbers

    def one(**where):
        rows = table
        for k, v in where.items():
            rows = rows[rows[k] == v]
        assert len(rows) == 1, where
        return rows.iloc[0]

    row = one(stage=1, split="train", measure="loss", head="fc16", term="sim")
    assert (row.step, row.global_step, row.value) == (4, 14, 0.2)  # stage s3 starts after s1's 10 steps
    assert one(stage=0, step=5, measure="loss", head="", term="total").value == 100.0
    assert one(stage=0, step=5, measure="lr").value == 1e-3
    dev = one(stage=0, split="dev", measure="loss", head="fc1", term="cos")
    assert (dev.global_step, dev.value) == (10, 6.5)
    assert one(stage=0, split="dev", measure="loss", term="total").value == 75.0
    share = one(stage=1, split="dev", measure="share", head="fc16", term="sim")
    assert (share.global_step, share.value) == (14, 1.0)


def test_loss_curves_show_every_term_of_every_head_with_stage_boundaries():
    table, segments = analysis.log_table(LOG), analysis.stage_segments(LOG)
    fig = analysis.plot_loss_curves(table, segments)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["fc1/cos", "fc1/sim", "fc16/sim", "weighted total"]
    for ax in axes:
        assert ax.get_xlim() == (0, 14)  # every panel spans all stages
        dashed = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
        assert dashed == [10]  # the boundary between s1 and s3
        assert [t.get_text() for t in ax.texts] == ["s1", "s3"]
    cos = axes[0]
    stage_lines = {line.get_label(): list(line.get_xdata())
                   for line in cos.lines if line.get_linestyle() == "-"}
    assert stage_lines == {"s1": [5, 10], "s3": [14]}  # one curve per stage, on the global step axis
    assert axes[0].get_yscale() == "log"


def test_gradient_shares_one_panel_per_head_or_none():
    table, segments = analysis.log_table(LOG), analysis.stage_segments(LOG)
    fig = analysis.plot_gradient_shares(table, segments)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["fc1: share of the gradient", "fc16: share of the gradient"]
    curves = {line.get_label(): list(line.get_ydata())
              for line in axes[0].lines if line.get_label() in ("cos", "sim")}
    assert curves == {"cos": [0.9, 0.7], "sim": [0.1, 0.3]}
    no_dev = [r for r in LOG if not any(k.startswith("dev/") for k in r)]
    assert analysis.plot_gradient_shares(analysis.log_table(no_dev), segments) is None


# --- quality against speed ---------------------------------------------------------------------


PEERS = {
    "models": {"minilm": "teacher models/all-MiniLM-L6-v2", "st-mse(mpnet)": "sentence-transformers recipe",
               "mtd/default:fc1": "mtd run runs/default, head fc1"},
    "results": [
        {"model": "minilm", "task": "sts", "dataset": "stsb/test", "spearman": 82.0},
        {"model": "minilm", "task": "sts", "dataset": "sickr/test", "spearman": 77.0},
        {"model": "st-mse(mpnet)", "task": "sts", "dataset": "stsb/test", "spearman": 70.0},
        {"model": "mtd/default:fc1", "task": "sts", "dataset": "stsb/test", "spearman": 76.8},
        {"model": "mtd/default:fc1", "task": "retrieval", "dataset": "cisi", "ndcg@10": 36.0},
        {"model": "unscored-speed", "task": "speed", "dataset": "wordnet-1000", "sentences_per_s": 5.0},
        {"model": "minilm", "task": "speed", "dataset": "wordnet-1000", "sentences_per_s": 457.0},
        {"model": "st-mse(mpnet)", "task": "speed", "dataset": "wordnet-1000", "sentences_per_s": 800.0},
        {"model": "mtd/default:fc1", "task": "speed", "dataset": "wordnet-1000", "sentences_per_s": 840.0},
    ],
}


def test_peers_results_become_one_point_per_model_with_quality_and_speed(tmp_path):
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(PEERS))
    points = analysis.quality_speed_points(analysis.read_report(path))
    assert points == [analysis.Point("minilm", "teacher", 82.0, 457.0),
                      analysis.Point("st-mse(mpnet)", "peer", 70.0, 800.0),
                      analysis.Point("mtd/default:fc1", "mtd", 76.8, 840.0)]
    fig = analysis.plot_quality_speed(points, title="t")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert sorted(c.get_label() for c in ax.collections) == ["mtd", "peer", "teacher"]
    assert [t.get_text() for t in ax.texts] == [p.model for p in points]


def test_a_results_file_that_is_not_one_names_the_fix(tmp_path):
    path = tmp_path / "peers.json"
    path.write_text('{"tables": {}}')
    with pytest.raises(analysis.AnalysisError, match=r"no 'results' list.*python bench/peers.py"):
        analysis.read_report(path)
    path.write_text("{")
    with pytest.raises(analysis.AnalysisError, match="not a readable JSON file"):
        analysis.read_report(path)


def test_the_report_is_peers_json_when_there_else_the_run_scored_here_else_none(tmp_path, monkeypatch):
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps(PEERS))
    report, note = analysis.quality_speed_report(tmp_path / "run", None, peers, tmp_path / "no-sts.jsonl")
    assert report == PEERS and str(peers) in note
    missing = tmp_path / "missing.json"
    report, note = analysis.quality_speed_report(tmp_path / "run", None, missing, tmp_path / "no-sts.jsonl")
    assert report is None
    assert f"{missing} is missing; to make it" in note and "bench/peers.py --student" in note
    sts_file = tmp_path / "test.jsonl"
    sts_file.write_text("")
    calls = []
    monkeypatch.setattr(analysis, "own_quality_speed",
                        lambda *a, **k: calls.append(a) or {"speed_texts": 64, "results": []})
    report, note = analysis.quality_speed_report(tmp_path / "run", type("C", (), {"cache_dir": "c"}), missing,
                                                 sts_file)
    assert calls and report == {"speed_texts": 64, "results": []} and "Plotted instead" in note


def test_the_run_is_scored_like_peers_and_its_speed_children_show_no_progress_bars(tiny_config, monkeypatch):
    cfg = tiny_config()
    run = save_untrained_student(cfg)
    labels = list(analysis.run_model_loaders(run, cfg.teachers))
    assert labels == [f"mtd/{run.name}:fc1", f"mtd/{run.name}:fc16", "teacher_a", "teacher_b"]

    def fake_sts(label, model, sets, batch_size, cache_dir):
        return [{"model": label, "task": "sts", "dataset": "stsb/test", "spearman": float(len(label))}]

    def fake_speed(loaders, n_texts, batch_size, threads, latency_samples):
        assert os.environ.get("TQDM_DISABLE") == "1"  # inherited by the spawned children
        return [{"model": m, "task": "speed", "dataset": "w", "sentences_per_s": 10.0} for m in loaders]

    monkeypatch.setattr(analysis.suite, "run_sts", fake_sts)
    monkeypatch.setattr(analysis.suite, "speed_rows", fake_speed)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    report = analysis.own_quality_speed(run, cfg, "sts.jsonl", cache_dir=None)
    assert "TQDM_DISABLE" not in os.environ
    assert json.loads((run / analysis.OWN_REPORT).read_text()) == report
    groups = {p.model: p.group for p in analysis.quality_speed_points(report)}
    assert groups == {labels[0]: "mtd", labels[1]: "mtd", "teacher_a": "teacher", "teacher_b": "teacher"}


# --- similarities of held-out pairs ------------------------------------------------------------


def test_pair_cosines_encode_each_text_once():
    vecs = {"a": [1.0, 0.0], "b": [3.0, 3.0], "c": [0.0, -2.0]}
    seen = []

    def vectors_of(texts):
        seen.append(list(texts))
        return np.array([vecs[t] for t in texts])

    pairs = analysis.Pairs("p", ["a", "a", "b"], ["b", "c", "a"])
    got = analysis.pair_cosines(vectors_of, pairs)
    np.testing.assert_allclose(got, [np.sqrt(0.5), 0.0, np.sqrt(0.5)], atol=1e-12)
    assert seen == [["a", "b", "c"]]


def test_spearman_agreement():
    assert analysis.agreement([0.1, 0.5, 0.9], [1, 2, 3]) == pytest.approx(100)
    assert analysis.agreement([0.1, 0.5, 0.9], [3, 2, 1]) == pytest.approx(-100)


def save_untrained_student(cfg):
    from mtd.models.student import save_student
    from mtd.training.pipeline import build_student

    student, tokenizer = build_student(cfg, 32 + 48)
    run = cfg.run_dir
    save_student(student, tokenizer, run / "student", cfg.student.max_length)
    return run


def test_dev_pairs_are_the_runs_own_dev_texts(tiny_config):
    from mtd.training.pipeline import load_corpus

    cfg = tiny_config()  # 200 dev texts
    pairs = analysis.dev_text_pairs(cfg)
    dev = load_corpus(cfg).dev
    assert pairs.first == dev[0::2] and pairs.second == dev[1::2] and pairs.scores is None
    assert len(analysis.dev_text_pairs(cfg, limit=7).first) == 7
    with pytest.raises(analysis.AnalysisError, match="too few to pair. Give an STS file"):
        analysis.dev_text_pairs(tiny_config("data.dev_size=3"))


def test_held_out_pairs_are_the_sts_file_when_it_exists(tiny_config, tmp_path):
    cfg = tiny_config()
    sts_file = tmp_path / "stsb" / "dev.jsonl"
    sts_file.parent.mkdir()
    sts_file.write_text('{"sentence1": "a b", "sentence2": "b c", "score": 4.0}\n'
                        '{"sentence1": "c", "sentence2": "d", "score": 1.0}\n')
    pairs = analysis.held_out_pairs(cfg, sts_file)
    assert (pairs.name, pairs.first, pairs.second) == ("stsb/dev", ["a b", "c"], ["b c", "d"])
    assert list(pairs.scores) == [4.0, 1.0]
    fallback = analysis.held_out_pairs(cfg, tmp_path / "missing.jsonl")
    assert fallback.first == analysis.dev_text_pairs(cfg).first


def test_pair_similarities_are_the_target_and_each_heads_cosines(tiny_config, tmp_path):
    from mtd.models.student import encode, load_student

    cfg = tiny_config()
    run = save_untrained_student(cfg)
    pairs = analysis.dev_text_pairs(cfg, limit=20)
    sims = analysis.pair_similarities(run, cfg, pairs, tmp_path / "vectors")
    assert list(sims.columns) == ["first", "second", "target", "fc1", "fc16"]
    texts = pairs.first + pairs.second

    def cosines(vecs):
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        return np.einsum("ij,ij->i", vecs[:20], vecs[20:])

    # The target: each teacher normalized, weighted, concatenated, renormalized (as trained on).
    parts = [TeacherEncoder(t.name, t).encode(texts) for t in cfg.teachers]
    target = multi_teacher_target(parts, [t.weight for t in cfg.teachers]).numpy()
    np.testing.assert_allclose(sims.target, cosines(target), atol=1e-5)
    student, tokenizer, max_length = load_student(run / "student")
    for head in ("fc1", "fc16"):
        np.testing.assert_allclose(sims[head], cosines(encode(student, tokenizer, texts, head, max_length)),
                                   atol=1e-5)
    # Teacher weights count: doubling one teacher's weight changes the target's cosines.
    cfg.teachers[1].weight = 3.0
    reweighted = analysis.pair_similarities(run, cfg, pairs, tmp_path / "vectors")
    assert not np.allclose(reweighted.target, sims.target, atol=1e-4)

    fig = analysis.plot_pair_scatter(sims, title="t")
    titles = [ax.get_title() for ax in fig.axes]
    spearman = [analysis.agreement(sims.target, sims[h]) for h in ("fc1", "fc16")]
    assert titles == [f"fc1: Spearman {spearman[0]:.1f}", f"fc16: Spearman {spearman[1]:.1f}"]
