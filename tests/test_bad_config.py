"""Bad configs and model paths: each one a clear error, before anything runs, nothing lost (issue 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtd.config import ConfigError, RunConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _load(*overrides: str) -> RunConfig:
    return load_config(TINY, overrides=list(overrides))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- YAML syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, where, problem", [
    ("name: x\nteachers:\n  - {name: a, path: b\nstages: []\n", "4:7", r"expected ',' or '\}'.*from line 3"),
    ("name: x\n\tseed: 2\n", "2:1", r"found character '\\t'"),
    ("name: x\ntrain:\n  seed: 1\n  seed: 2\n", "4:3", "key 'seed' is given twice; keep one"),
    ("name: !!python/object/apply:os.system ['echo hi']\n", "1:7", "could not determine a constructor"),
])
def test_yaml_errors_name_file_line_column_and_problem(tmp_path, text, where, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{where}: invalid YAML: {problem}"):
        load_config(path)


def test_yaml_error_in_an_override_value_names_the_override():
    with pytest.raises(ConfigError,
                       match=r"^override 'stages.0.heads=\{fc1: \[cos', value:1:\d+: invalid YAML"):
        _load("stages.0.heads={fc1: [cos")


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text \(byte 9\); save it as UTF-8"):
        load_config(path)


# --- YAML 1.2 booleans: no/off/yes/on are strings ------------------------------------------------------


def test_no_off_yes_on_stay_strings_in_overrides():
    cfg = _load("train.mixed_precision=no", "teachers.0.prompt=yes", "teachers.1.prompt=off")
    assert cfg.train.mixed_precision == "no"  # README documents `no`; YAML 1.1 made it False
    assert (cfg.teachers[0].prompt, cfg.teachers[1].prompt) == ("yes", "off")
    assert _load("eval.teachers=false").eval.teachers is False
    assert _load("student.model_config.layer_norm_eps=1e-12").student.model_config["layer_norm_eps"] == 1e-12


def test_no_stays_a_string_in_files(tmp_path):
    text = TINY.read_text(encoding="utf-8").replace("train:\n", "train:\n  mixed_precision: no\n")
    cfg = load_config(_write(tmp_path, text))
    assert cfg.train.mixed_precision == "no"


@pytest.mark.parametrize("value", ["on", "yes", "off", "no"])
def test_bool_fields_take_only_true_or_false(value):
    with pytest.raises(ConfigError,
                       match=rf"'eval.teachers' must be bool, got '{value}' \(write true or false\)"):
        _load(f"eval.teachers={value}")


def test_strings_that_look_like_other_types_survive_a_dump(tmp_path):
    cfg = _load("teachers.0.prompt='1e5'", "teachers.1.prompt=no", "name='on'")
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg and again.teachers[0].prompt == "1e5" and again.name == "on"
