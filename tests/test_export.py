"""Export: a sentence-transformers folder that computes exactly the student's head vectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mtd.export import export_student, to_sentence_transformer
from mtd.models.student import Student, StudentError, encode, load_student
from mtd.training import pipeline

ROOT = Path(__file__).resolve().parents[1]
HEADS = {"fc1": 80, "fc16": 16, "fc3": 3}
MAX_LENGTH = 12  # short enough that long corpus texts are truncated: both sides must agree on it


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "shared-target-cache"


@pytest.fixture(scope="module")
def texts(tiny_assets) -> list[str]:
    lines = (tiny_assets / "corpus.txt").read_text().splitlines()
    return lines[:150] + ["", "kalo", lines[0] * 6]  # empty, one word, far over max_length


@pytest.fixture(scope="module")
def student_and_tokenizer(tiny_assets):
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    student = Student(AutoModel.from_config(config), HEADS)
    with torch.no_grad():  # non-trivial biases: an exported Dense without bias would show
        for head in student.heads.values():
            head.bias.normal_(0, 0.5)
    return student.eval(), tokenizer


@pytest.mark.parametrize("head", list(HEADS))
def test_sentence_transformer_matches_student(student_and_tokenizer, texts, tmp_path, head):
    from sentence_transformers import SentenceTransformer

    student, tokenizer = student_and_tokenizer
    out = export_student(student, tokenizer, tmp_path / "st", head, MAX_LENGTH)
    assert out == tmp_path / "st"
    expected = encode(student, tokenizer, texts, head, MAX_LENGTH)
    model = SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == MAX_LENGTH
    assert model.get_embedding_dimension() == HEADS[head]
    got = model.encode(texts, batch_size=16, convert_to_numpy=True)
    assert got.shape == (len(texts), HEADS[head])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Cosine similarity is the model's declared similarity, so ST tooling scores it right.
    sims = model.similarity(got[:3], got[:3]).numpy()
    np.testing.assert_allclose(sims, expected[:3] @ expected[:3].T, atol=1e-5)


def test_export_folder_layout(student_and_tokenizer, tmp_path):
    student, tokenizer = student_and_tokenizer
    out = export_student(student, tokenizer, tmp_path / "st", "fc16", MAX_LENGTH)
    modules = json.loads((out / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert (out / "config_sentence_transformers.json").is_file()
    pooling = json.loads((out / modules[1]["path"] / "config.json").read_text())
    mean = pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens") is True
    assert mean, pooling
    dense = json.loads((out / modules[2]["path"] / "config.json").read_text())
    assert (dense["in_features"], dense["out_features"]) == (32, 16)
    assert "Identity" in dense["activation_function"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # temp folder renamed away


def test_export_replaces_an_old_folder(student_and_tokenizer, tmp_path):
    student, tokenizer = student_and_tokenizer
    out = tmp_path / "st"
    export_student(student, tokenizer, out, "fc1", MAX_LENGTH)
    export_student(student, tokenizer, out, "fc3", MAX_LENGTH)
    dense = json.loads((out / "2_Dense" / "config.json").read_text())
    assert dense["out_features"] == 3


def test_unknown_head_raises(student_and_tokenizer, tmp_path):
    student, tokenizer = student_and_tokenizer
    with pytest.raises(StudentError, match="fc99"):
        export_student(student, tokenizer, tmp_path / "st", "fc99", MAX_LENGTH)
    with pytest.raises(StudentError, match="fc99"):
        to_sentence_transformer(student, tokenizer, "fc99", MAX_LENGTH)
    assert not (tmp_path / "st").exists()


@pytest.fixture
def finished_run(tiny_config, shared_cache) -> Path:
    cfg = tiny_config(f"cache_dir={json.dumps(str(shared_cache))}", "stages.0.steps=5", "stages.1.steps=5",
                      "stages.2.steps=5", "train.log_every=5", "train.save_every=5")
    return pipeline.run(cfg)


def test_cli_exports_chosen_head_of_a_run(finished_run, tmp_path, texts):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "exported"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mtd.export", str(finished_run), str(out), "--head", "fc16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    student, tokenizer, max_length = load_student(finished_run / "student")
    got = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True)
    assert got.shape == (len(texts), 16)
    np.testing.assert_allclose(got, encode(student, tokenizer, texts, "fc16", max_length), atol=1e-5)
    # The run's own final/ export is the default head (fc1, 80-d) of the same student.
    final = SentenceTransformer(str(finished_run / "final"), device="cpu").encode(texts[:20])
    np.testing.assert_allclose(final, encode(student, tokenizer, texts[:20], "fc1", max_length), atol=1e-5)

    # An unknown head fails with the heads there are, and writes nothing (in-process: saves a start).
    from mtd.export import main

    with pytest.raises(StudentError, match=r"No head 'fc99'.*fc1"):
        main([str(finished_run / "student"), str(tmp_path / "x"), "--head", "fc99"])
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    from mtd.export import export_student
    from mtd.models.student import StudentError

    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "keep.txt").write_text("data")
    with pytest.raises(StudentError, match="refusing to replace"):
        export_student(None, None, precious, "fc1", 16)  # refused before the student is touched
    assert (precious / "keep.txt").read_text() == "data"
