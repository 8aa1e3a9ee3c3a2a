"""Bad configs and model paths: each one a clear error, before anything runs, nothing lost."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import types
import typing
from pathlib import Path

import pytest
import torch

from mtd import config as config_module
from mtd.config import RANGE, ConfigError, RunConfig, check_batch_sizes, dump_config, load_config
from mtd.hf import ModelPathError, resolve_model
from mtd.training import pipeline

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


# --- numeric ranges: declared for every numeric field, checked generically ------------------------------


def _config_classes(cls: type = RunConfig) -> list[type]:
    """RunConfig and every config dataclass reachable from its fields."""
    found = [cls]
    for tp in typing.get_type_hints(cls).values():
        for leaf in _leaves(tp):
            if dataclasses.is_dataclass(leaf) and leaf not in found:
                found += [c for c in _config_classes(leaf) if c not in found]
    return found


def _leaves(tp) -> list:
    """int for `list[int] | None`, float for `dict[str, float]`, ...: the types values take."""
    args = typing.get_args(tp)
    if not args:
        return [tp]
    if typing.get_origin(tp) is dict:
        args = args[1:]
    return [leaf for a in args for leaf in _leaves(a)]


def _numeric_fields() -> list[tuple[type, dataclasses.Field]]:
    return [(cls, f) for cls in _config_classes() for f in dataclasses.fields(cls)
            if {int, float} & set(_leaves(typing.get_type_hints(cls)[f.name]))]


def test_every_numeric_config_field_declares_its_range():
    numeric = _numeric_fields()
    assert len(numeric) >= 30  # the walk really finds them
    missing = [f"{cls.__name__}.{f.name}" for cls, f in numeric if RANGE not in f.metadata]
    assert not missing, f"numeric config fields without a declared range (use config.num): {missing}"


# Where each config class sits in configs/tiny.yaml (student.vision is added for the test).
PREFIX = {"RunConfig": "", "TeacherConfig": "teachers.0.", "DataConfig": "data.", "ImagesConfig": "images.",
          "VisionConfig": "student.vision.", "PairsConfig": "pairs.",
          "StudentConfig": "student.", "StageConfig": "stages.0.",
          "TrainConfig": "train.", "EvalConfig": "eval."}


def _bad_values(valid, integer: bool) -> list[str]:
    """Values just outside `valid` as YAML, and (float fields) NaN and infinity, never valid."""
    bad = [] if integer else [".nan", ".inf"]
    written = (lambda x: str(int(x))) if integer else (lambda x: repr(float(x)))
    if valid.low != -math.inf:
        bad.append(written(valid.low if valid.low_open else valid.low - 1))
    if valid.high != math.inf:
        bad.append(written(valid.high if valid.high_open else valid.high + 1))
    return bad


def _container(tp) -> type | None:
    """list or dict for `list[int] | None`, `dict[str, float]`; None for a plain number."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    origins = {typing.get_origin(a) for a in (typing.get_args(tp) if union else (tp,))}
    return next((o for o in (list, dict) if o in origins), None)


@pytest.mark.parametrize("cls, f", [pytest.param(c, f, id=f"{c.__name__}.{f.name}")
                                    for c, f in _numeric_fields()])
def test_every_declared_range_is_enforced_at_load(cls, f):
    assert set(PREFIX) == {c.__name__ for c in _config_classes()}, "add the new config class to PREFIX"
    tp = typing.get_type_hints(cls)[f.name]
    key = PREFIX[cls.__name__] + f.name
    for text in _bad_values(f.metadata[RANGE], integer=float not in _leaves(tp)):
        value, shown = {list: (f"[{text}]", f"{key}.0"), dict: (f"{{cos: {text}}}", f"{key}.cos")}.get(
            _container(tp), (text, key))
        if _container(tp) is dict and _container(typing.get_args(tp)[1]) is list:  # {head: [dims]}
            value, shown = f"{{cos: [{text}]}}", f"{key}.cos.0"
        with pytest.raises(ConfigError, match=rf"^{re.escape(shown)}=.* is out of range: it must be "):
            _load("student.vision={kind: timm, name: vit_tiny_patch16_224}", f"{key}={value}")


@pytest.mark.parametrize("override, message", [
    ("teachers.1.batch_size=0", "teachers.1.batch_size=0 is out of range: it must be at least 1."),
    ("train.num_workers=-1", "train.num_workers=-1 is out of range: it must be at least 0."),
    ("data.max_texts=-5", "data.max_texts=-5 is out of range: it must be at least 1."),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 is out of range: it must be more than 0."),
    ("stages.0.warmup_ratio=1", "stages.0.warmup_ratio=1.0 is out of range: it must be in [0, 1)."),
    ("stages.2.weights.sim=-200", "stages.2.weights.sim=-200.0 is out of range: it must be at least 0."),
    ("stages.0.batch_size=1", "stages.0.batch_size=1 is out of range: it must be at least 2 (in-batch "
                              "losses compare the texts of a batch)."),
    ("train.seed=-1", "train.seed=-1 is out of range: it must be in [0, 4294967295]."),
    ("stages.1.lr=.nan", "stages.1.lr=nan is out of range: it must be more than 0."),
    ("teachers.0.weight=0", "teachers.0.weight=0.0 is out of range: it must be more than 0 (to leave a "
                            "teacher out, remove it)."),
])
def test_range_messages_name_the_dotted_key_and_the_valid_range(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        _load(override)


# --- mixed precision -------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where there is a GPU")
def test_fp16_without_a_gpu_is_refused_before_anything_runs(tiny_config):
    cfg = tiny_config("train.mixed_precision=fp16")
    with pytest.raises(ConfigError, match=r"^train\.mixed_precision=fp16 needs a GPU.*silently ignored.*"
                                          r"train\.mixed_precision=bf16.*train\.mixed_precision=no"):
        pipeline.run(cfg)
    assert not cfg.run_dir.exists()  # no config.yaml that says fp16
    assert not Path(cfg.cache_dir).exists()  # no teacher ran


# --- model paths: one resolver -----------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch, tiny_assets):
    """huggingface_hub.snapshot_download replaced: records repo ids, "downloads" teacher_a."""
    import huggingface_hub

    calls: list[str] = []

    def fake(repo_id, **kwargs):
        calls.append(repo_id)
        if repo_id == "org/missing":
            raise OSError("404 Client Error: Repository Not Found")
        return str(tiny_assets / "teacher_a")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.mark.parametrize("path", ["models/all-MiniLM-L6-v3", "runs/nope/final", "mine/model", "./model",
                                  "~/nope-model", "/abs/model"])
def test_a_local_looking_path_that_is_missing_is_never_downloaded(hub, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # its first component exists: a local path
    with pytest.raises(ModelPathError, match=rf"^teachers\.0\.path: '{re.escape(path)}' is not a folder on "
                                             r"this machine.*scripts/setup\.sh.*hf:ORG/NAME"):
        resolve_model(path, "teachers.0.path")
    assert hub == []


def test_hub_ids_explicit_and_bare(hub, tiny_assets, caplog):
    assert resolve_model("hf:org/name", "teacher a") == tiny_assets / "teacher_a"
    assert hub == ["org/name"]  # the prefix is stripped
    with caplog.at_level("INFO", logger="mtd.hf"):
        resolve_model("sentence-transformers/all-MiniLM-L6-v2", "teacher a")
    assert hub[-1] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "loading 'sentence-transformers/all-MiniLM-L6-v2' from the hub" in caplog.text
    with pytest.raises(ModelPathError, match=r"^teacher a: 'hf:org/missing' cannot be downloaded from the "
                                             r"Hugging Face hub \(OSError: 404.*Check the id"):
        resolve_model("hf:org/missing", "teacher a")


def _copy(src: Path, dst: Path, drop: str | None = None, add: dict[str, bytes] | None = None) -> Path:
    shutil.copytree(src, dst)
    if drop:
        (dst / drop).unlink()
    for name, data in (add or {}).items():
        (dst / name).write_bytes(data)
    return dst


def test_a_folder_without_weights_or_with_pickle_only_is_refused(tiny_assets, tmp_path):
    bare = _copy(tiny_assets / "teacher_a", tmp_path / "bare", drop="model.safetensors")
    with pytest.raises(ModelPathError, match=rf"^teacher a: {re.escape(str(bare))} has config\.json but no "
                                             r"weights \(model\.safetensors\).*scripts/setup\.sh"):
        resolve_model(str(bare), "teacher a")
    pickled = _copy(tiny_assets / "teacher_a", tmp_path / "pickled", drop="model.safetensors",
                    add={"pytorch_model.bin": b"not loaded"})
    with pytest.raises(ModelPathError, match=r"only pickle weights \(pytorch_model\.bin\); mtd loads "
                                             r"safetensors only"):
        resolve_model(str(pickled), "teacher a")
    sharded = _copy(tiny_assets / "teacher_a", tmp_path / "sharded", drop="model.safetensors",
                    add={"model.safetensors.index.json": b"{}"})
    assert resolve_model(str(sharded), "teacher a") == sharded
    assert resolve_model(str(bare), "student.path", weights=False) == bare  # a tokenizer is enough
    with pytest.raises(ModelPathError, match=r"holds no model \(no config\.json or modules\.json\)"):
        resolve_model(str(tmp_path), "teacher a")


def test_weights_of_a_nested_sentence_transformers_module_are_checked(tiny_assets, tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(tiny_assets / "teacher_a", folder / "0_Transformer")
    modules = [{"idx": 0, "name": "0", "path": "0_Transformer",
                "type": "sentence_transformers.models.Transformer"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert resolve_model(str(folder), "teacher a") == folder
    (folder / "0_Transformer" / "model.safetensors").unlink()
    with pytest.raises(ModelPathError, match=r"0_Transformer has config\.json but no weights"):
        resolve_model(str(folder), "teacher a")


@pytest.mark.parametrize("override, key", [
    ("teachers.1.path=models/no-such-teacher", r"teachers\.1\.path \(teacher teacher_b\): 'models/no-such"),
    ("student.init=teacher", r"student\.path: .*student-without-weights has config\.json but no weights"),
])
def test_a_run_checks_every_model_path_before_any_teacher_runs(tiny_config, tiny_assets, tmp_path,
                                                               override, key):
    broken = _copy(tiny_assets / "teacher_a", tmp_path / "student-without-weights", drop="model.safetensors")
    cfg = tiny_config(override, f"student.path={json.dumps(str(broken))}" if "student" in override else
                      "train.seed=0")
    with pytest.raises(ModelPathError, match=key):
        pipeline.run(cfg)
    assert not Path(cfg.cache_dir).exists()  # teacher_a did not run first


def test_eval_specs_use_the_same_resolver(hub, tiny_assets, tmp_path):
    from mtd.evaluation.specs import ModelSpecError, SentenceTransformerEncoder, parse_models

    models = parse_models(["a=hf:org/name"])
    assert isinstance(models["a"], SentenceTransformerEncoder) and hub == ["org/name"]
    with pytest.raises(ModelSpecError, match=r"'models/nope' is not a folder on this machine.*hf:ORG/NAME"):
        parse_models(["models/nope"])
    bare = _copy(tiny_assets / "teacher_a", tmp_path / "bare", drop="model.safetensors")
    with pytest.raises(ModelPathError, match=r"^Model '.*bare': .*bare has config\.json but no weights"):
        parse_models([str(bare)])


def test_a_transformers_vision_tower_path_uses_the_resolver(hub):
    from mtd.models.vision import build_tower

    with pytest.raises(ModelPathError, match=r"^student\.vision\.name: 'models/siglip-nope' is not a folder"):
        build_tower("transformers", "models/siglip-nope")
    assert hub == []


def test_a_transformers_tower_from_a_config_loads_its_folder_through_the_resolver(tiny_config, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path / "clip"
    tiny = CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            image_size=32, patch_size=8)
    CLIPVisionModel(tiny).save_pretrained(folder)
    vision = f"student.vision={{kind: transformers, name: {json.dumps(str(folder))}, tokens: 4}}"
    student, _ = pipeline.build_student(tiny_config(vision), 80)  # model_config {}: the folder's
    assert student.image.tower.width == 32
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelPathError, match=r"^student\.vision\.name: .*clip has config\.json but no "):
        pipeline.build_student(tiny_config(vision), 80)


def test_an_incomplete_mtd_student_folder_is_named(tiny_assets, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mtd.models.student import HEADS_FILE, Student, StudentError, load_student, save_student

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16))
    save_student(Student(encoder, {"fc1": 4}), tokenizer, tmp_path / "s", 16)
    (tmp_path / "s" / HEADS_FILE).unlink()
    with pytest.raises(StudentError, match=rf"lacks {HEADS_FILE}: the folder is incomplete"):
        load_student(tmp_path / "s")
    (tmp_path / "s" / "encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelPathError, match=r"encoder has config\.json but no weights"):
        load_student(tmp_path / "s")


# --- batch sizes against the data, before the teachers run -----------------------------------------------


def test_a_stage_batch_larger_than_the_training_texts_stops_before_the_teachers(tiny_config):
    cfg = tiny_config("data.max_texts=250", "stages.2.batch_size=64")  # 250 - 200 dev = 50 texts
    with pytest.raises(ConfigError, match=r"^stages\.2 \(stage3\): batch_size 64 is larger than the 50 "
                                          r"training texts \(after data\.dev_size=200 held out\)\. Lower "
                                          r"stages\.2\.batch_size to 50 or less"):
        pipeline.run(cfg)
    assert not Path(cfg.cache_dir).exists()  # no teacher ran


def test_image_stage_batches_and_process_counts_are_checked_too():
    cfg = load_config(ROOT / "configs" / "tiny-multimodal.yaml")
    check_batch_sizes(cfg, {"text": 2800, "images": 32}, 1)
    with pytest.raises(ConfigError, match=r"^stages\.3 \(stage4\): batch_size 32 is larger than the 20 "
                                          r"training images"):
        check_batch_sizes(cfg, {"text": 2800, "images": 20}, 1)
    with pytest.raises(ConfigError, match=r"^stages\.0 \(stage1\): the global batch_size 32 does not divide "
                                          r"evenly over 3 processes; use a multiple of 3"):
        check_batch_sizes(cfg, {"text": 2800, "images": 32}, 3)


# --- positions ------------------------------------------------------------------------------------------


def test_student_max_length_beyond_its_positions_is_refused_when_built(tiny_config):
    cfg = tiny_config("student.max_length=65")  # tiny BERT: 64 positions
    with pytest.raises(config_module.MtdError, match=r"^student\.max_length=65 is more than the 64 "
                                                     r"positions the student's encoder \(BertModel\) takes"):
        pipeline.build_student(cfg, 80)
    pipeline.build_student(tiny_config("student.max_length=64"), 80)


def test_roberta_style_positions_leave_out_the_padding_offset(tiny_config):
    roberta = ["student.model_config.model_type=roberta", "student.model_config.pad_token_id=0",
               "student.model_config.max_position_embeddings=66"]  # positions start at pad + 1
    with pytest.raises(config_module.MtdError, match=r"max_length=66 is more than the 65 positions"):
        pipeline.build_student(tiny_config(*roberta, "student.max_length=66"), 80)
    pipeline.build_student(tiny_config(*roberta, "student.max_length=65"), 80)


def test_a_run_with_too_long_a_student_stops_before_training(tiny_config):
    cfg = tiny_config("student.max_length=65")
    with pytest.raises(config_module.MtdError, match=r"student\.max_length=65"):
        pipeline.run(cfg)
    assert not (cfg.run_dir / "checkpoints").exists()


def test_image_length_beyond_the_positions_is_refused(tiny_assets):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mtd.models.projection import ImagePath
    from mtd.models.student import Student, StudentError, check_positions
    from mtd.models.vision import build_tower

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    tower = build_tower("timm", "vit_tiny_patch16_224", model_config=vit)
    image = ImagePath(tower, 32, 61, "linear", tokenizer.cls_token_id, tokenizer.sep_token_id)
    with pytest.raises(StudentError, match=r"^student\.vision\.tokens=61: an image then takes 65 positions.*"
                                           r"Lower student\.vision\.tokens by 1"):
        check_positions(Student(encoder, {"fc1": 8}, image), 32)


def test_teacher_max_length_beyond_its_positions_is_refused_at_load(tiny_assets):
    from mtd.config import TeacherConfig
    from mtd.targets.teachers import TeacherError, load_teacher

    limit = json.loads((tiny_assets / "teacher_a" / "config.json").read_text())["max_position_embeddings"]
    cfg = TeacherConfig(name="a", path=str(tiny_assets / "teacher_a"), max_length=limit + 1)
    with pytest.raises(TeacherError, match=rf"^teacher a: max_length={limit + 1} is more than the {limit} "
                                           rf"positions the model takes"):
        load_teacher(cfg, tiny_assets / "teacher_a")
