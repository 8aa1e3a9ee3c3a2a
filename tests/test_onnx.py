"""ONNX and int8 files of sentence-transformers folders (mtd/onnx.py) and their eval.py specs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mtd.evaluation.specs import ModelSpecError, OnnxEncoder, parse_models
from mtd.export import export_student
from mtd.io import hash_folder
from mtd.models.student import Student
from mtd.onnx import FP32_FILE, INT8_FILE, OnnxError, export_onnx, load_onnx_model, main

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
STSB = ROOT.parent / "shared" / "data" / "sts" / "stsb" / "test.jsonl"


def _st(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def texts(tiny_assets) -> list[str]:
    lines = (tiny_assets / "corpus.txt").read_text().splitlines()
    return lines[:60] + ["", "kalo", lines[0] * 8]  # empty, one word, past max_seq_length (32)


@pytest.fixture(scope="module")
def plain(tiny_assets, tmp_path_factory) -> Path:
    """A tiny random BERT sentence-transformers folder (Transformer, mean Pooling), exported."""
    folder = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    export_onnx(folder)
    return folder


@pytest.fixture(scope="module")
def with_head(tiny_assets, tmp_path_factory) -> Path:
    """An mtd export (Transformer, Pooling, Dense with bias, Normalize) of a random student."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    student = Student(AutoModel.from_config(config), {"fc16": 16})
    with torch.no_grad():
        student.heads["fc16"].bias.normal_(0, 0.5)
    folder = export_student(student.eval(), tokenizer, tmp_path_factory.mktemp("head") / "final", "fc16", 24)
    export_onnx(folder)
    return folder


def test_files_land_where_sentence_transformers_looks(plain):
    import onnx

    assert (FP32_FILE, INT8_FILE) == ("onnx/model.onnx", "onnx/model_qint8_avx512_vnni.onnx")
    written = sorted(p.relative_to(plain).as_posix() for p in (plain / "onnx").iterdir())
    assert written == [FP32_FILE, INT8_FILE]
    for name in (FP32_FILE, INT8_FILE):
        graph = onnx.load(str(plain / name)).graph
        inputs = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert inputs == {n: ["batch_size", "sequence_length"] for n in
                          ("input_ids", "attention_mask", "token_type_ids")}
        assert [o.name for o in graph.output] == ["last_hidden_state"]
        assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim][:2] == ["batch_size",
                                                                                          "sequence_length"]
    int8 = onnx.load(str(plain / INT8_FILE)).graph
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in int8.node}
    scales = [i for i in int8.initializer if i.name.endswith("_scale") and "MatMul" in i.name]
    assert scales and all(len(i.dims) == 1 and i.dims[0] > 1 for i in scales)  # per channel
    assert (plain / INT8_FILE).stat().st_size < (plain / FP32_FILE).stat().st_size
    assert not [p for p in plain.rglob("*.tmp")]


@pytest.mark.parametrize("fixture", ["plain", "with_head"])
def test_onnx_encodes_like_sentence_transformers(fixture, request, texts):
    folder = request.getfixturevalue(fixture)
    want = _st(folder).encode(texts, batch_size=7, convert_to_numpy=True)
    model = load_onnx_model(folder, threads=1)
    got = model.encode(texts, batch_size=7)  # odd batches: padding differs from batch to batch
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert model.session.get_session_options().intra_op_num_threads == 1
    int8 = load_onnx_model(folder, INT8_FILE).encode(texts, batch_size=64)
    assert int8.shape == want.shape
    assert _cosines(int8, want).min() > 0.9  # random tiny weights; the real model is held to 0.99
    if fixture == "with_head":  # Dense to 16 dims, then Normalize, as exported
        assert got.shape[1] == 16
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert load_onnx_model(folder).encode([]).shape == (0, want.shape[1])


def test_export_refuses_what_it_cannot_use(plain, tmp_path):
    with pytest.raises(OnnxError, match=r"nope does not exist\. Give a sentence-transformers folder"):
        export_onnx(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnnxError, match="file is not a folder"):
        export_onnx(tmp_path / "file")
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "modules.json").write_text("[]")
    with pytest.raises(OnnxError, match=r"run is not a sentence-transformers folder: it is an mtd run; its "
                                        r"export is .*run/final"):
        export_onnx(tmp_path / "run")
    (tmp_path / "st" / "student").mkdir(parents=True)
    (tmp_path / "st" / "student" / "student.json").write_text("{}")
    with pytest.raises(OnnxError, match=r"mtd student; export it first: python -m mtd.export"):
        export_onnx(tmp_path / "st")
    with pytest.raises(OnnxError, match=r"its first module is nothing, not a Transformer"):
        export_onnx(tmp_path / "run" / "final")
    (tmp_path / "link").symlink_to(plain)
    with pytest.raises(OnnxError, match=r"link is a symbolic link \(to .*model\); refusing to write into "
                                        r"what it points to\. Copy it \(cp -rL"):
        export_onnx(tmp_path / "link", overwrite=True)
    kept = {p.name: p.read_bytes() for p in (plain / "onnx").iterdir()}
    with pytest.raises(OnnxError, match=r"already holds onnx/model.onnx and onnx/model_qint8_avx512_vnni"
                                        r"\.onnx; refusing to replace it\. Pass --overwrite"):
        export_onnx(plain)
    with pytest.raises(OnnxError, match=r"already holds onnx/model.onnx;"):
        export_onnx(plain, int8=False)
    assert {p.name: p.read_bytes() for p in (plain / "onnx").iterdir()} == kept


def test_overwrite_and_fp32_only(tiny_assets, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    assert export_onnx(folder, int8=False) == [folder / FP32_FILE]
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["model.onnx"]
    assert export_onnx(folder, overwrite=True) == [folder / FP32_FILE, folder / INT8_FILE]
    caplog.clear()
    export_onnx(folder, int8=False, overwrite=True)
    assert any("model_qint8_avx512_vnni.onnx was left as it was" in r.getMessage() for r in caplog.records)


def test_a_failed_export_leaves_the_folder_as_it_was(tiny_assets, tmp_path, monkeypatch):
    import mtd.onnx

    folder = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    before = sorted(p.name for p in folder.rglob("*"))

    def broken(src, dst):
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(mtd.onnx, "quantize_int8", broken)
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        export_onnx(folder)
    assert sorted(p.name for p in folder.rglob("*")) == before  # no onnx/, no temp file


def test_a_graph_that_froze_a_shape_branch_is_refused(tiny_assets, tmp_path, monkeypatch):
    """A Python branch on the sequence length is traced as a constant: the check on another
    shape finds it, and nothing is written."""
    from transformers import BertModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    forward = BertModel.forward

    def shape_dependent(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        out = forward(self, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      **kwargs)
        if input_ids.shape[1] > 12:  # the traced example is shorter; the check batch is longer
            out.last_hidden_state = out.last_hidden_state * 2
        return out

    monkeypatch.setattr(BertModel, "forward", shape_dependent)
    with pytest.raises(OnnxError, match=r"does not reproduce the model on a batch of another shape"):
        export_onnx(folder)
    assert not (folder / "onnx").exists()


def test_loading_needs_the_file_and_names_the_command(tiny_assets, tmp_path, plain):
    folder = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    with pytest.raises(OnnxError, match=rf"model_qint8_avx512_vnni.onnx does not exist: write it with "
                                        rf"`python -m mtd.onnx {re.escape(str(folder))}`"):
        load_onnx_model(folder, INT8_FILE)
    with pytest.raises(OnnxError, match=r"threads must be >= 1"):
        load_onnx_model(plain, threads=0)
    with pytest.raises(OnnxError, match=r"batch_size must be >= 1"):
        load_onnx_model(plain).encode(["a"], batch_size=0)


def _refused(argv: list, caplog, match: str) -> None:
    caplog.clear()
    assert main([str(a) for a in argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(match, errors[0]), errors


def test_cli(tiny_assets, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    _refused([tmp_path / "nope"], caplog, r"nope does not exist")
    assert main([str(folder), "--no-int8"]) == 0
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["model.onnx"]
    _refused([folder], caplog, r"already holds onnx/model.onnx; .*--overwrite")
    assert main([str(folder), "--overwrite"]) == 0
    assert (folder / INT8_FILE).is_file()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mtd.onnx", str(tmp_path / "nope")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope does not exist" in proc.stderr


def test_specs(plain, tiny_assets, tmp_path):
    models = parse_models([f"t={plain}", f"o={plain}#onnx", f"q={plain}#int8", "q@8"])
    assert isinstance(models["o"], OnnxEncoder) and models["o"].file_name == FP32_FILE
    assert models["q"].file_name == INT8_FILE and models["q@8"].inner is models["q"]
    prints = {label: models[label].fingerprint for label in "toq"}
    assert len(set(prints.values())) == 3 and all(p.startswith(hash_folder(plain)) for p in prints.values())
    copy = tmp_path / "copy"
    shutil.copytree(plain, copy)
    with open(copy / INT8_FILE, "ab") as f:
        f.write(b"\0")  # another int8 file, same weights: another model
    assert parse_models([f"{copy}#int8"])[f"{copy}#int8"].fingerprint != prints["q"]
    vecs = models["q"].encode(["a text", "another text"])  # the folder has no Normalize: specs normalize
    want = load_onnx_model(plain, INT8_FILE).encode(["a text", "another text"], normalize_embeddings=True)
    np.testing.assert_allclose(vecs, want, atol=1e-6)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_assets / "teacher_a", bare)
    with pytest.raises(ModelSpecError, match=rf"Model '.*bare#int8': .*does not exist: write it with "
                                             rf"`python -m mtd.onnx {re.escape(str(bare))}`"):
        parse_models([f"{bare}#int8"])
    with pytest.raises(ModelSpecError, match=r"unknown backend #fp16; write #onnx \(fp32\) or #int8"):
        parse_models([f"{plain}#fp16"])


def test_head_of_a_run_is_exported_before_onnx(tmp_path):
    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    (student / "student.json").write_text(json.dumps({"heads": {"fc1": 8}}))
    with pytest.raises(ModelSpecError, match=r"is one head of an mtd run\. Export that head first "
                                             r"\(python -m mtd.export RUN OUT --head HEAD\)"):
        parse_models([f"{tmp_path / 'run'}:fc1#int8"])


def test_heads_of_a_run_are_not_added_for_its_onnx_model(with_head, tmp_path):
    """eval.py --dims heads adds a run's other heads as torch models; a #int8 spec is not the run."""
    from mtd.evaluation.specs import StudentHeadEncoder, student_heads

    run = tmp_path / "run"
    shutil.copytree(with_head, run / "final")
    (run / "student").mkdir()
    (run / "student" / "student.json").write_text(json.dumps({"heads": {"fc16": 16, "fc4": 4}}))
    models = parse_models([f"r={run}", f"r8={run}#int8"])
    assert models["r8"].folder == run / "final"
    added = {k for k, v in student_heads(models).items() if isinstance(v, StudentHeadEncoder)}
    assert added == {"r:fc16", "r:fc4"}


def test_eval_scores_int8_beside_torch(plain, texts, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import eval as eval_cli

    rows = [{"sentence1": texts[i], "sentence2": texts[i + 1], "score": i % 5} for i in range(0, 24, 2)]
    sts = tmp_path / "data" / "sts" / "test.jsonl"
    sts.parent.mkdir(parents=True)
    sts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.json"
    argv = [f"t={plain}", f"t8={plain}#int8", "--data", str(tmp_path / "data"), "--tasks", "sts,speed",
            "--speed-texts", "20", "--reference", "t", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]
    assert eval_cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| t", "| t8"]
    by = {(r["model"], r["task"]): r for r in json.loads(out.read_text())["results"]}
    assert by[("t8", "speed")]["sentences_per_s"] > 0
    assert all(np.isfinite(by[(m, "sts")]["spearman"]) for m in ("t", "t8"))
    assert len(list((tmp_path / "cache" / "vectors").glob("*.npy"))) == 2  # t8's own vectors, not t's


@pytest.mark.slow
def test_minilm_int8_keeps_its_vectors(tmp_path):
    """all-MiniLM-L6-v2: fp32 ONNX is the torch model; int8 keeps its vectors to cosine 0.99."""
    if not MINILM.is_dir():
        pytest.skip("models/all-MiniLM-L6-v2 is installed by scripts/setup.sh")
    folder = tmp_path / "minilm"
    shutil.copytree(MINILM, folder)
    export_onnx(folder)
    if STSB.is_file():
        rows = [json.loads(line) for line in STSB.read_text().splitlines()[:100]]
        texts = [r[k] for r in rows for k in ("sentence1", "sentence2")]
    else:
        texts = (ROOT / "data" / "wordnet" / "texts.txt").read_text().splitlines()[:200]
    want = _st(folder).encode(texts, batch_size=64, convert_to_numpy=True)
    np.testing.assert_allclose(load_onnx_model(folder).encode(texts), want, rtol=0, atol=1e-4)
    cos = _cosines(load_onnx_model(folder, INT8_FILE).encode(texts), want)
    assert cos.mean() > 0.99 and cos.min() > 0.95, (cos.mean(), cos.min())
