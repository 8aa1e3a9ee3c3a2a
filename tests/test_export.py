"""Export: a sentence-transformers folder that computes exactly the student's head vectors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mtd.export import export_student, main, to_sentence_transformer
from mtd.io import hash_folder
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


def test_export_replaces_an_old_model_only_when_told(student_and_tokenizer, tmp_path):
    student, tokenizer = student_and_tokenizer
    out = tmp_path / "st"
    export_student(student, tokenizer, out, "fc1", MAX_LENGTH)
    before = hash_folder(out)
    with pytest.raises(StudentError, match=r"already holds a sentence-transformers model.*--overwrite"):
        export_student(student, tokenizer, out, "fc3", MAX_LENGTH)
    assert hash_folder(out) == before
    export_student(student, tokenizer, out, "fc3", MAX_LENGTH, overwrite=True)
    dense = json.loads((out / "2_Dense" / "config.json").read_text())
    assert dense["out_features"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]  # no temp or old folder left


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



def _refused(argv: list[str], caplog, match: str) -> None:
    """main(argv) exits 2 with one logged line matching `match`."""
    caplog.clear()
    assert main([str(a) for a in argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(match, errors[0]), errors


def test_cli_refuses_what_would_lose_data(finished_run, tmp_path, caplog):
    """Every refusal leaves what was there as it was; the run itself is never written into."""
    run, model = finished_run, tmp_path / "model"
    assert main([str(run), str(model)]) == 0
    kept = {p: hash_folder(p) for p in (run, model)}
    _refused([run, tmp_path / "x", "--head", "fc99"], caplog,
             r"No head 'fc99' in .*\['fc1', 'fc16'\].*--head")
    _refused([run, model, "--head", "fc16"], caplog,
             r"model .*already holds a sentence-transformers.*--overwrite")
    (tmp_path / "link").symlink_to(model)
    _refused([run, tmp_path / "link", "--overwrite"], caplog, r"link is a symbolic link \(to .*model\)")
    _refused([run, run, "--overwrite"], caplog, r"tiny is .*tiny, part of the run being exported")
    _refused([run / "student", run / "student"], caplog, r"student is .*student, part of the run")
    _refused([run, run / "checkpoints" / "x"], caplog, r"x is inside .*checkpoints, part of the run")
    _refused([run, run.parent, "--overwrite"], caplog, r"runs contains .*runs/tiny, part of the run")
    assert {p: hash_folder(p) for p in (run, model)} == kept
    assert not (tmp_path / "x").exists() and not (run / "checkpoints" / "x").exists()
    # Inside the run, beside its parts, is fine; so is replacing the model when told to.
    assert main([str(run), str(run / "fc16"), "--head", "fc16"]) == 0
    assert main([str(run), str(model), "--head", "fc16", "--overwrite"]) == 0
    assert json.loads((model / "2_Dense" / "config.json").read_text())["out_features"] == 16
    # A truncated weights file is named, with the way to restore it.
    heads = run / "student" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    _refused([run, tmp_path / "y"], caplog, r"heads.safetensors .*truncated or corrupt.*--resume")


def test_cli_names_what_a_source_must_be(tmp_path, caplog):
    _refused([tmp_path / "nope", tmp_path / "out"], caplog, r"nope does not exist\. SOURCE is .*runs/NAME")
    (tmp_path / "notes").mkdir()
    _refused([tmp_path / "notes", tmp_path / "out"], caplog,
             r"notes is not an mtd run or student folder: it holds neither student/ nor student.json")
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    _refused([tmp_path / "unfinished", tmp_path / "out"], caplog, r"has not finished.*--resume")
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    _refused([tmp_path / "st", tmp_path / "out"], caplog,
             r"sentence-transformers folder \(an export already\)")
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mtd.export", str(tmp_path / "nope"), str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope does not exist" in proc.stderr


def test_export_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    from mtd.export import export_student
    from mtd.models.student import StudentError

    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "keep.txt").write_text("data")
    with pytest.raises(StudentError, match="refusing to replace"):
        export_student(None, None, precious, "fc1", 16)  # refused before the student is touched
    assert (precious / "keep.txt").read_text() == "data"


def test_a_failed_swap_puts_the_old_model_back(tmp_path, monkeypatch):
    from mtd import export

    out, new = tmp_path / "st", tmp_path / "new"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "modules.json").write_text(text)
    real_rename = Path.rename

    def rename(self, target):
        if self == new:
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk went away"):
        export._replace(new, out)
    assert (out / "modules.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "st"]  # no hidden .old folder left
