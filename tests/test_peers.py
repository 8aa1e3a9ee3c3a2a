"""bench/peers.py: the pieces that run without models (the whole script runs with --smoke)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_peers_section_created_replaced_or_appended(peers):
    new = peers.replace_section("", "Peers", "table 1")
    assert new == "# Results\n\n## Peers\n\ntable 1\n"
    doc = "# Results\n\nintro\n\n## Peers\n\nold table\n\n## Images\n\nkept\n"
    again = peers.replace_section(doc, "Peers", "new table\n")
    assert again == "# Results\n\nintro\n\n## Peers\n\nnew table\n\n## Images\n\nkept\n"
    assert peers.replace_section(again, "Peers", "new table") == again  # rerunning changes nothing
    other = peers.replace_section("# Results\n\n## Peers of peers\n\nx\n", "Peers", "t")
    assert other == "# Results\n\n## Peers of peers\n\nx\n\n## Peers\n\nt\n"  # appended, not clobbered


def test_run_without_config_names_the_fix(peers, tmp_path):
    with pytest.raises(peers.PeersError, match=r"no config.yaml, so not an mtd run\. Train one first"):
        peers.run_config(tmp_path, None)


def test_mtd_throughput_timing_trains_the_stage(peers, config, tmp_path):
    """Table 2's mtd side runs the real train_stages for the asked steps (one stage, all terms)."""
    import numpy as np

    from mtd.data.corpus import read_corpus

    cfg = config()
    corpus = read_corpus(cfg.data.corpus, max_texts=300, dev_size=0)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((300, d)).astype(np.float16) for d in (32, 48)]  # the tiny teachers
    setup = peers.Setup(cfg, corpus, arrays, steps=3, batch=32)
    (tmp_path / "run").mkdir()
    seconds = peers.time_mtd(setup, ["cos", "sim", "resim"], 3, tmp_path / "run")
    assert seconds > 0
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert '"step": 3' in log[-1] and '"fc1/resim"' in log[-1]


def test_st_recipe_student_is_the_cut_teacher_with_a_linear_head(peers):
    """The sentence-transformers peer starts from the mtd student's encoder (the teacher folder,
    resolved as mtd resolves it, cut to the run's layers) plus a Dense to the target size."""
    from mtd.config import load_config

    cfg = load_config(ROOT / "configs" / "default.yaml")
    model = peers.st_student(cfg, 1152)
    assert len(model.transformers_model.encoder.layer) == len(cfg.student.layers)
    assert model.encode(["a short test sentence"]).shape == (1, 1152)
    assert peers.resolve(cfg.teachers[1].path).name == "all-mpnet-base-v2"
