"""bench/disco_table.py: its table and its training-speed measurement (on the tiny assets)."""

from __future__ import annotations

import json
from pathlib import Path

from mtd.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _module(bench_script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling peers.py
    return bench_script("disco_table")


def test_table_shows_each_configuration_against_plain(bench_script, monkeypatch):
    disco = _module(bench_script, monkeypatch)
    score = {"plain": {"stsb/test": 77.0, "cisi/test": 36.0}, "+ckd": {"stsb/test": 77.5, "cisi/test": 37.25},
             "teachers combined": {"stsb/test": 83.6, "cisi/test": 42.85}}
    lines = disco.table(score, {"plain": 2.0, "+ckd": 1.5}).splitlines()
    assert lines[0] == "| model | stsb/test | cisi/test | train steps/s |"
    assert lines[2:] == ["| plain | 77.00 | 36.00 | 2.00 |",
                         "| +ckd | 77.50 (+0.50) | 37.25 (+1.25) | 1.50 |",
                         "| teachers combined | 83.60 | 42.85 |  |"]


def test_every_configuration_loads():
    disco_configs = {"configs/default.yaml", "configs/ckd.yaml", "configs/kl.yaml", "configs/finetune.yaml",
                     "configs/ckd-finetune.yaml"}
    for path in disco_configs:
        assert load_config(ROOT / path).stages


def test_steps_per_second_times_the_last_stage_alone(bench_script, monkeypatch, tiny_config, tmp_path):
    disco = _module(bench_script, monkeypatch)
    cfg = tiny_config()  # configs/tiny.yaml on this session's tiny assets, as overrides
    q = json.dumps
    overrides = [f"synthetic_assets={q(cfg.synthetic_assets)}", f"cache_dir={q(str(tmp_path / 'cache'))}",
                 f"teachers.0.path={q(cfg.teachers[0].path)}", f"teachers.1.path={q(cfg.teachers[1].path)}",
                 f"data.corpus={q(cfg.data.corpus)}", f"student.path={q(cfg.student.path)}"]
    ran = []
    real = disco.pipeline.run
    monkeypatch.setattr(disco.pipeline, "run", lambda c: ran.append([(s.name, s.steps) for s in c.stages])
                        or real(c))
    rate = disco.steps_per_second("configs/tiny.yaml", overrides, 8, tmp_path / "out")
    assert ran == [[("stage3", 8)]] and rate > 0
