"""Tests for mtd.config: strict keys, typed values and overrides, cross-field checks, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtd.config import ConfigError, RunConfig, StageConfig, dump_config, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _load(*overrides: str):
    return load_config(TINY, overrides=list(overrides))


# --- strict keys -------------------------------------------------------------------------------


def test_unknown_top_level_key_names_valid_keys_and_close_match():
    with pytest.raises(ConfigError) as e:
        _load("teacher=[]")
    msg = str(e.value)
    assert "'teacher'" in msg
    assert "Did you mean 'teachers'?" in msg
    for valid in ("teachers", "stages", "cache_chunk_size", "export_head"):
        assert valid in msg


def test_unknown_nested_key_names_path_valid_keys_and_close_match():
    with pytest.raises(ConfigError) as e:
        _load("stages.0.warmup_ration=0.1")
    msg = str(e.value)
    assert "stages.0.warmup_ration" in msg
    assert "Did you mean 'warmup_ratio'?" in msg
    assert "resim_chunk_size" in msg and "batch_size" in msg  # the StageConfig keys are listed


def test_unknown_nested_key_without_close_match_still_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        _load("stages.0.lr_typo=1")
    msg = str(e.value)
    assert "stages.0.lr_typo" in msg and "Valid keys here:" in msg and "weight_decay" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    text = TINY.read_text(encoding="utf-8").replace("  dev_size: 200", "  dev_sise: 200")
    assert "dev_sise" in text
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.dev_sise.*Did you mean 'dev_size'"):
        load_config(tmp_path / "c.yaml")


# --- types ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, where",
    [
        ("train.seed=abc", "train.seed"),
        ("train.seed=true", "train.seed"),  # bool is not an int here
        ("train.seed=1.5", "train.seed"),
        ("stages.0.lr=fast", "stages.0.lr"),
        ("data.corpus=notalist", "data.corpus"),
        ("student.layers=[0, x]", "student.layers.1"),
        ("train=3", "train"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(override, where):
    with pytest.raises(ConfigError, match=rf"'{where}' must be"):
        _load(override)


def test_typed_overrides():
    cfg = _load("train.seed=3", "stages.0.lr=3e-4", "student.layers=[0,2]", "stages.1.steps=7",
                "train.max_grad_norm=null", "teachers.1.prompt='query: '")
    assert cfg.train.seed == 3 and type(cfg.train.seed) is int
    assert cfg.stages[0].lr == pytest.approx(3e-4) and type(cfg.stages[0].lr) is float
    assert cfg.student.layers == [0, 2] and all(type(x) is int for x in cfg.student.layers)
    assert cfg.stages[1].steps == 7 and cfg.stages[0].steps == 40  # only the indexed stage
    assert cfg.train.max_grad_norm is None
    assert cfg.teachers[1].prompt == "query: " and cfg.teachers[0].prompt == ""


def test_int_is_widened_to_float():
    cfg = _load("stages.0.lr=1")
    assert type(cfg.stages[0].lr) is float and cfg.stages[0].lr == 1.0


@pytest.mark.parametrize("override", ["stages.3.lr=1e-4", "teachers.2.name=x", "stages.x.lr=1"])
def test_override_list_index_out_of_range(override):
    with pytest.raises(ConfigError, match="no list item"):
        _load(override)


@pytest.mark.parametrize("override", ["train.seed", "name.x=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError):
        _load(override)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"Missing required config key\(s\) \['path'\] in 'teachers\.1\.'"):
        _load("teachers.1={name: only_a_name}")
    with pytest.raises(ConfigError, match=r"\['name'\]"):
        from_dict(StageConfig, {"lr": 1.0})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.teachers and cfg.stages


def test_tiny_config_values():
    cfg = _load()
    assert [t.name for t in cfg.teachers] == ["teacher_a", "teacher_b"]
    assert cfg.student.heads == {"fc1": "target", "fc16": 16}
    assert [s.name for s in cfg.stages] == ["stage1", "stage2", "stage3"]
    assert cfg.stages[2].heads == {"fc1": ["cos", "sim", "resim"], "fc16": ["sim", "resim"]}


# --- cross-field validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stages.0.epochs=2"], "exactly one of 'steps' or 'epochs'"),
        (["stages.0.steps=null"], "exactly one of 'steps' or 'epochs'"),
        (["stages.0.heads={fc2: [cos]}"], "unknown head 'fc2'"),
        (["stages.0.heads={fc1: [cos, sims]}"], "loss terms"),
        (["stages.2.targets={fc16: 'self:unknown'}"], "self:HEAD"),
        (["stages.2.targets={fc16: teacherz}"], "self:HEAD"),
        (["stages.0.targets={fc16: teacher}"], "not trained in this stage"),
        (["stages.1.train=last:x"], "last:K"),
        (["stages.1.train=everything"], "last:K"),
        (["stages.1.name=stage1"], "Stage names must be unique"),
        (["teachers.1.name=teacher_a"], "Teacher names must be unique"),
        (["student.heads={fc1: target, fc16: -3}"], "positive int"),
        (["export_head=fc99"], "export_head"),
        (["train.mixed_precision=fp8"], "mixed_precision"),
        (["student.init=teacher", "student.path=null"], "needs student.path"),
        (["stages.0.weights={cos: 1.0, kd: 2.0}"], "weights"),
        (["data.corpus=[]"], "data.corpus is empty"),
        (["teachers=[]"], "No teachers"),
        (["stages=[]"], "No stages"),
    ],
)
def test_validate_rejects(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _load(*overrides)


def test_validate_accepts_the_valid_neighbours():
    # the same fields, set to allowed values: the rejections above are about the values
    cfg = _load("stages.0.steps=null", "stages.0.epochs=1.5", "stages.1.train=last:2",
                "stages.2.targets={fc16: 'self:fc1', fc1: teacher}", "export_head=fc16")
    assert cfg.stages[0].epochs == 1.5 and cfg.stages[1].train == "last:2"
    assert cfg.stages[2].targets == {"fc16": "self:fc1", "fc1": "teacher"}


# --- round trip -----------------------------------------------------------------------------------------


def test_dump_load_round_trip(tmp_path):
    cfg = _load("train.seed=5", "stages.0.lr=3e-4", "student.layers=[0,2]", "teachers.0.prompt='q: '",
                "stages.2.targets={fc16: 'self:fc1'}", "data.max_texts=100", "stages.1.epochs=0.5",
                "stages.1.steps=null")
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    assert again != _load()  # the overrides really survived the trip


def test_cos_on_a_head_of_another_size_is_refused_before_training(tiny_config):
    from mtd.config import check_dims

    cfg = tiny_config("stages.2.heads={fc1: [cos], fc16: [cos, sim]}")
    with pytest.raises(ConfigError, match=r"stages\.2\.heads\.fc16: 'cos' needs equal dims.*16.*80"):
        check_dims(cfg, {"fc1": 80, "fc16": 16}, target_dim=80)
    ok = tiny_config("stages.2.heads={fc1: [cos], fc16: [cos]}", "stages.2.targets={fc16: 'self:fc1'}")
    with pytest.raises(ConfigError, match="self:fc1"):
        check_dims(ok, {"fc1": 80, "fc16": 16}, target_dim=80)
    check_dims(tiny_config(), {"fc1": 80, "fc16": 16}, target_dim=80)  # the shipped config is fine


@pytest.mark.parametrize("override, key", [
    ("train.log_every=0", "train.log_every"),
    ("train.save_every=0", "train.save_every"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("stages.0.batch_size=1", "stages.0.batch_size"),
    ("stages.1.lr=0", "stages.1.lr"),
    ("teachers.0.pooling=meen", "teachers.0.pooling"),
    ("teachers.1.dtype=fp16", "teachers.1.dtype"),
])
def test_out_of_range_values_are_refused_at_load(tiny_config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(override)


def test_resume_refuses_a_changed_config(tiny_config):
    from mtd.config import check_resume, dump_config

    saved = dump_config(tiny_config())
    check_resume(saved, tiny_config("train.max_steps_per_job=5", "eval.batch_size=8"))  # allowed
    with pytest.raises(ConfigError, match=r"stages\.1\.lr: 0\.003 -> 0\.002.*name=NEW_NAME"):
        check_resume(saved, tiny_config("stages.1.lr=2e-3"))


def test_resume_of_a_run_saved_before_a_field_existed_takes_its_default(tiny_config):
    from mtd.config import check_resume, dump_config

    saved = dump_config(tiny_config()).replace("  group_by_length: false\n", "")
    assert "group_by_length" not in saved
    check_resume(saved, tiny_config())  # the field's default: what the run trained with
    with pytest.raises(ConfigError, match=r"train\.group_by_length: False -> True"):
        check_resume(saved, tiny_config("train.group_by_length=true"))


def test_teacher_and_student_token_limits_that_differ_are_named(tiny_config):
    from mtd.training.pipeline import length_mismatches

    assert length_mismatches(tiny_config("teachers.0.max_length=32")) == []
    (message,) = length_mismatches(tiny_config("teachers.0.max_length=64"))
    assert "teachers.0 (teacher_a) reads up to 64 tokens, the student 32" in message


# ---------------------------------------------------------------------------------------------
# base: a config that changes another


def _write(path, text):
    path.write_text(text)
    return path


def test_base_config_changes_only_what_it_names(tmp_path):
    from mtd.config import load_config

    _write(tmp_path / "a.yaml", """
name: a
teachers: [{name: t, path: x}]
data: {corpus: [c.txt], dev_size: 5}
student: {heads: {fc1: target, fc8: 8}}
stages:
  - {name: s1, heads: {fc1: [cos]}, steps: 3}
  - {name: s2, heads: {fc1: [cos], fc8: [sim]}, steps: 4, lr: 1.0e-4}
""")
    b = _write(tmp_path / "b.yaml", """
base: a.yaml
name: b
data: {max_texts: 9}
stages:
  1: {heads: {fc1: [cos, ckd]}, lr: 2.0e-5}
  2: {name: s3, heads: {fc1: [sim]}, steps: 1}
""")
    cfg = load_config(b)
    assert cfg.name == "b" and cfg.data.corpus == ["c.txt"]
    assert cfg.data.dev_size == 5 and cfg.data.max_texts == 9
    assert [s.name for s in cfg.stages] == ["s1", "s2", "s3"]
    assert cfg.stages[1].heads == {"fc1": ["cos", "ckd"], "fc8": ["sim"]} and cfg.stages[1].lr == 2e-5
    assert cfg.stages[1].steps == 4 and cfg.stages[0].heads == {"fc1": ["cos"]}
    c = _write(tmp_path / "c.yaml", "base: b.yaml\nname: c\n")  # a chain
    assert [s.name for s in load_config(c).stages] == ["s1", "s2", "s3"]


@pytest.mark.parametrize("text, match", [
    ("base: missing.yaml\n", "not found"),
    ("base: self.yaml\n", "leads back to itself"),
    ("base: a.yaml\nstages: {5: {steps: 1}}\n", "no item 4 before it"),
    ("base: a.yaml\nstages: {x: {steps: 1}}\n", "by its number"),
])
def test_base_config_mistakes_are_named(tmp_path, text, match):
    from mtd.config import ConfigError, load_config

    _write(tmp_path / "a.yaml", "teachers: [{name: t, path: x}]\ndata: {corpus: [c.txt]}\n"
                                "stages: [{name: s1, steps: 3}]\n")
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path / "self.yaml", text))


def test_ready_disco_configs_build_on_the_default_recipe():
    from mtd.config import load_config

    default = load_config(ROOT / "configs" / "default.yaml")
    ckd = load_config(ROOT / "configs" / "ckd.yaml")
    assert [s.steps for s in ckd.stages] == [s.steps for s in default.stages]
    assert all("ckd" in s.heads["fc1"] and s.queue_size for s in ckd.stages)
    assert ckd.stages[2].heads["fc256"] == default.stages[2].heads["fc256"]
    both = load_config(ROOT / "configs" / "ckd-finetune.yaml")
    assert both.student.path == "runs/ckd" and both.stages[0].data == "pairs"
