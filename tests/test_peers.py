"""bench/peers.py: the pieces that run without models (the whole script runs with --smoke)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers(bench_script):
    return bench_script("peers")


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
    timed = peers.time_mtd(setup, ["cos", "sim", "resim"], 3, tmp_path / "run")
    assert timed.seconds > 0 and (timed.device, timed.precision) == ("cpu", cfg.train.mixed_precision)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert '"step": 3' in log[-1] and '"fc1/resim"' in log[-1]


def test_st_recipe_student_is_the_cut_teacher_with_a_linear_head(peers, tmp_path):
    """The sentence-transformers peer starts from the mtd student's encoder (the teacher folder,
    resolved as mtd resolves it, cut to the run's layers) plus a Dense to the target size, with
    float32 weights also from a float16 folder (as teachers travel to a GPU machine)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mtd.config import load_config

    cfg = load_config(ROOT / "configs" / "default.yaml")
    model = peers.st_student(cfg, 1152)
    assert len(model.transformers_model.encoder.layer) == len(cfg.student.layers)
    assert model.encode(["a short test sentence"]).shape == (1, 1152)
    assert peers.resolve(cfg.teachers[1].path).name == "all-mpnet-base-v2"
    half = tmp_path / "minilm-fp16"
    shutil.copytree(peers.resolve(cfg.student.path), half)
    weights = {k: v.half() for k, v in load_file(half / "model.safetensors").items()}
    save_file(weights, half / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"student.path={json.dumps(str(half))}"])
    assert {p.dtype for p in peers.st_student(cfg, 1152).parameters()} == {torch.float32}


def test_throughput_rows_compare_trainers_on_one_device_and_precision(peers, monkeypatch, tmp_path):
    """Table 2's ratios come from trainers that ran in the same place; any other mix stops it."""
    heads = {"fc1": "target"}
    setup = SimpleNamespace(cfg=SimpleNamespace(student=SimpleNamespace(heads=heads)), batch=4,
                            last_stage=SimpleNamespace(heads={"fc1": ["cos", "sim", "resim"]}))
    calls = []

    def mtd(setup, terms, steps, run_dir):
        calls.append(("mtd", tuple(terms), steps))
        return peers.Timed(steps / (4.0 if terms == ["cos"] else 2.0), "cuda", "bf16")

    monkeypatch.setattr(peers, "time_mtd", mtd)
    monkeypatch.setattr(peers, "time_st", lambda setup, steps, out: peers.Timed(steps / 1.0, "cuda", "bf16"))
    rows = {r["trainer"]: r for r in peers.throughput(setup, 10, 2, tmp_path)}
    assert rows["mtd (cos+sim+resim)"]["ratio_to_st"] == 2.0 and rows["mtd (cos)"]["ratio_to_st"] == 4.0
    assert rows[peers.ST_ROW]["steps_per_s"] == 1.0
    assert all((r["device"], r["precision"], r["batch"]) == ("cuda", "bf16", 4) for r in rows.values())
    assert [c[2] for c in calls] == [2, 2, 10, 10, 10, 10]  # warm-up of 2 steps, then 2 repeats
    for place in [("cpu", "bf16"), ("cuda", "no")]:
        monkeypatch.setattr(peers, "time_st", lambda setup, steps, out, place=place: peers.Timed(1.0, *place))
        with pytest.raises(peers.PeersError, match="ran on different devices or precisions"):
            peers.throughput(setup, 10, 1, tmp_path)


def test_throughput_only_options_need_the_mode(peers, capsys):
    for argv in (["--device", "cpu"], ["--batch", "8"], ["--throughput-only", "--smoke"],
                 ["--throughput-only", "--batch", "0"]):
        with pytest.raises(SystemExit) as stop:
            peers.parse_args(argv)
        assert stop.value.code == 2
    assert "--device: options of --throughput-only; add it" in capsys.readouterr().err
    args = peers.parse_args(["--throughput-only", "--device", "cpu"])
    assert (args.precision, args.out.name) == ("no", "peers_throughput.json")
