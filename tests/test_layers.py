"""python -m mtd.layers: a teacher cut to some layers, distilled back with a config's recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mtd.config import ConfigError
from mtd.layers import layer_config, main, parse_keep, spread
from mtd.models.student import load_student

ROOT = Path(__file__).resolve().parents[1]


def test_spread_keeps_first_and_last():
    assert spread(1, 12) == [11]
    assert spread(2, 12) == [0, 11]
    assert spread(3, 12) == [0, 6, 11]  # round(5.5) is 6 (to even)
    assert spread(4, 12) == [0, 4, 7, 11]
    assert spread(12, 12) == list(range(12))
    with pytest.raises(ConfigError, match=r"--keep 13: the teacher has 12 layers; keep 1 to 12"):
        spread(13, 12)


def test_keep_is_checked_against_the_teacher(tiny_assets):
    teacher = str(tiny_assets / "teacher_a")  # 2 layers
    assert parse_keep("1", teacher) == [1]
    assert parse_keep("1,0", teacher) == [1, 0]
    for keep, why in (("0,2", r"layers 0\.\.1.*\[2\] are not"), ("1,1", r"distinct"),
                      ("a,b", r"layer indices like 0,5,11"), ("3", r"has 2 layers")):
        with pytest.raises(ConfigError, match=why):
            parse_keep(keep, teacher)


def test_the_config_has_the_teacher_alone_as_teacher_and_student(tiny_assets):
    teacher = str(tiny_assets / "teacher_a")
    cfg = layer_config(teacher, [1, 0], ROOT / "configs" / "default.yaml", None, ["train.seed=3"])
    # a teacher the recipe does not have reads the student's tokens
    assert [(t.name, t.path, t.max_length) for t in cfg.teachers] == [("teacher_a", teacher, 128)]
    assert (cfg.student.init, cfg.student.path, cfg.student.layers) == ("teacher", teacher, [1, 0])
    assert cfg.name == "teacher_a-layers-1-0" and cfg.train.seed == 3
    assert [s.steps for s in cfg.stages] == [300, 500, 400]  # the recipe is the default's


def test_a_run_distills_the_kept_layers(tiny_assets, tmp_path, caplog):
    q = lambda p: json.dumps(str(p))  # noqa: E731
    overrides = [f"output_dir={q(tmp_path / 'runs')}", f"cache_dir={q(tmp_path / 'cache')}",
                 f"data.corpus=[{q(tiny_assets / 'corpus.txt')}]", "data.max_texts=400", "data.dev_size=50",
                 "student.max_length=32", "stages.0.steps=3", "stages.1.steps=3", "stages.2.steps=3",
                 "stages.0.batch_size=16", "stages.1.batch_size=16", "stages.2.batch_size=16",
                 "eval.sts_dir=null", "train.save_every=3", "train.eval_every=0"]
    teacher = tiny_assets / "teacher_a"
    caplog.clear()  # the default recipe's stage 2 trains the last 2 layers: one kept is too few
    assert main([str(teacher), "--keep", "1", "--name", "cut", *overrides]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(r"stages\.1\.train=last:2: .* has 1 layers\. Use last:1", errors[0])
    assert not (tmp_path / "runs" / "cut" / "checkpoints").exists()  # refused before stage 1 trained
    assert main([str(teacher), "--keep", "1", "--name", "cut", *overrides, "stages.1.train=last:1"]) == 0
    student, _, _ = load_student(tmp_path / "runs" / "cut" / "student")
    assert student.encoder.config.num_hidden_layers == 1
    assert student.head_dims["fc1"] == 32  # teacher_a's own size: it is the only teacher
    assert (tmp_path / "runs" / "cut" / "final" / "modules.json").is_file()
    caplog.clear()
    assert main([str(teacher), "--keep", "5", *overrides]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(r"has 2 layers; keep 1 to 2", errors[0]), errors


def test_a_teacher_of_the_recipe_keeps_its_settings():
    """mpnet as in configs/default.yaml (name, max_length, batch size): its target cache is reused."""
    cfg = layer_config("models/all-mpnet-base-v2", [0, 11], ROOT / "configs" / "default.yaml", None, [])
    (teacher,) = cfg.teachers
    assert (teacher.name, teacher.max_length, teacher.batch_size) == ("mpnet", 128, 64)
    assert cfg.name == "all-mpnet-base-v2-layers-0-11"
