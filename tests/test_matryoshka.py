"""Matryoshka heads: prefix terms in the objective, their config checks, and exports by dim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mtd.config import ConfigError, check_dims
from mtd.export import ExportError, choose_exports, main, to_sentence_transformer
from mtd.losses.objective import Objective
from mtd.losses.terms import relative_similarity_loss, similarity_loss
from mtd.models.student import encode, load_student
from mtd.training import pipeline

WEIGHTS = {"cos": 10.0, "sim": 200.0, "resim": 20.0, "nce": 1.0}


def _objective(**kw) -> Objective:
    return Objective(heads={"fc1": ("cos", "sim", "resim")}, targets={}, weights=WEIGHTS, **kw)


def test_prefix_terms_score_the_renormalized_prefix():
    torch.manual_seed(0)
    s, t = torch.randn(12, 24), torch.randn(12, 24)
    terms = _objective(matryoshka={"fc1": (4, 10)})({"fc1": s}, t)
    plain = _objective()({"fc1": s}, t)
    for dim in (4, 10):
        prefix = s[:, :dim] / s[:, :dim].norm(dim=1, keepdim=True) * 3.0  # scale must not matter
        torch.testing.assert_close(terms[f"fc1@{dim}/sim"], similarity_loss(prefix, t))
        resim = relative_similarity_loss(prefix, t, margin=0.015)
        torch.testing.assert_close(terms[f"fc1@{dim}/resim"], resim)
        assert terms[f"fc1@{dim}/sim"] != plain["fc1/sim"]
    extra = sum(WEIGHTS[n] * terms[f"fc1@{d}/{n}"] for d in (4, 10) for n in ("sim", "resim"))
    torch.testing.assert_close(terms["loss"], plain["loss"] + extra)
    assert not any(k.startswith("fc1@") for k in plain)


def test_a_prefix_term_trains_only_its_prefix():
    torch.manual_seed(1)
    s = torch.randn(10, 16, requires_grad=True)
    objective = Objective(heads={"fc1": ("sim",)}, targets={}, weights=WEIGHTS | {"sim": 0.0},
                          matryoshka={"fc1": (6,)})
    objective({"fc1": s}, torch.randn(10, 16))["loss"].backward()
    assert s.grad[:, :6].abs().sum() > 0
    assert s.grad[:, 6:].abs().sum() == 0
    shares = objective.gradient_shares({"fc1": s.detach()}, torch.randn(10, 16))
    assert set(shares) == {"fc1/sim", "fc1@6/sim", "fc1@6/resim"}
    assert shares["fc1/sim"] == 0 and shares["fc1@6/resim"] > 0  # sim weighs 0 on prefixes too


def test_config_checks_matryoshka(tiny_config):
    with pytest.raises(ConfigError, match=r"stages\.2\.matryoshka: head 'fc16' is not trained"):
        tiny_config("stages.2.heads={fc1: [cos, sim, resim]}", "stages.2.matryoshka={fc16: [4]}")
    for bad, why in (("[]", "prefix sizes"), ("[4, 0]", r"\.1=0 is out of range"), ("[4, 4]", "twice"),
                     ("[2.5]", "must be int")):
        with pytest.raises(ConfigError, match=rf"stages\.2\.matryoshka\.fc16.*{why}"):
            tiny_config(f"stages.2.matryoshka={{fc16: {bad}}}")
    cfg = tiny_config("stages.2.matryoshka={fc16: [4, 16]}")
    with pytest.raises(ConfigError, match=r"prefixes \[16\] are not smaller than the head \(16 dims\)"):
        check_dims(cfg, {"fc1": 80, "fc16": 16}, 80)
    check_dims(tiny_config("stages.2.matryoshka={fc16: [4, 15]}"), {"fc1": 80, "fc16": 16}, 80)


def test_choose_exports_by_name_dim_or_all():
    meta = {"heads": {"fc1": 80, "fc16": 16}, "matryoshka": {"fc1": [8, 16, 32]}}
    source = Path("runs/x")
    assert choose_exports(meta, None, None, False, source) == [("fc1", "fc1", None)]
    assert choose_exports(meta, "fc16", None, False, source) == [("fc16", "fc16", None)]
    assert choose_exports(meta, None, 16, False, source) == [("fc16", "fc16", None)]  # a head first
    assert choose_exports(meta, None, 32, False, source) == [("fc1-32", "fc1", 32)]
    assert choose_exports(meta, None, 80, False, source) == [("fc1", "fc1", None)]
    assert [e[0] for e in choose_exports(meta, None, None, True, source)] == [
        "fc1", "fc16", "fc1-8", "fc1-16", "fc1-32"]
    with pytest.raises(ExportError, match=r"prefix of 64 dims .*\[8, 16, 32, 80\].*--dim"):
        choose_exports(meta, None, 64, False, source)


@pytest.fixture
def matryoshka_run(tiny_config, tmp_path) -> Path:
    cfg = tiny_config("stages.0.steps=4", "stages.1.steps=4", "stages.2.steps=4", "train.log_every=4",
                      "train.save_every=4", "eval.teachers=false", "stages.2.matryoshka={fc1: [8, 24]}")
    return pipeline.run(cfg)


def test_run_records_prefixes_and_exports_them(matryoshka_run, tmp_path, tiny_assets, caplog):
    from sentence_transformers import SentenceTransformer

    meta = json.loads((matryoshka_run / "student" / "student.json").read_text())
    assert meta["matryoshka"] == {"fc1": [8, 24]}
    rows = [json.loads(line) for line in (matryoshka_run / "log.jsonl").read_text().splitlines()]
    assert any("fc1@24/resim" in r for r in rows if r.get("stage") == 2)

    texts = (tiny_assets / "corpus.txt").read_text().splitlines()[:40]
    student, tokenizer, max_length = load_student(matryoshka_run / "student")
    full = encode(student, tokenizer, texts, "fc1", max_length)
    assert main([str(matryoshka_run), str(tmp_path / "all"), "--all"]) == 0
    assert {p.name for p in (tmp_path / "all").iterdir()} == {"fc1", "fc16", "fc1-8", "fc1-24"}
    assert main([str(matryoshka_run), str(tmp_path / "d24"), "--dim", "24"]) == 0
    for folder in (tmp_path / "all" / "fc1-24", tmp_path / "d24"):
        got = SentenceTransformer(str(folder), device="cpu").encode(texts)
        want = full[:, :24] / np.linalg.norm(full[:, :24], axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # The full head's export also serves any prefix through sentence-transformers' truncate_dim.
    truncated = SentenceTransformer(str(tmp_path / "all" / "fc1"), device="cpu", truncate_dim=8).encode(texts)
    np.testing.assert_allclose(truncated, full[:, :8], atol=1e-5)
    caplog.clear()
    assert main([str(matryoshka_run), str(tmp_path / "x"), "--dim", "12"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(r"of 12 dims .*fc1-8: 8.*--dim", errors[0]), errors
    assert not (tmp_path / "x").exists()


def test_prefix_export_refuses_a_prefix_beyond_the_head(tiny_assets):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from mtd.models.student import Student, StudentError

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    student = Student(AutoModel.from_config(config), {"fc1": 10})
    with pytest.raises(StudentError, match=r"prefix of 11 dims .*choose 1 to 10"):
        to_sentence_transformer(student, tokenizer, "fc1", 16, dim=11)


def test_prefixes_train_in_text_stages_only_and_last_k_is_checked_at_load(tiny_config):
    from mtd.config import load_config

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"stages\.3\.matryoshka: prefixes train in text stages only"):
        load_config(root / "configs" / "tiny-multimodal.yaml", ["stages.3.matryoshka={fc1: [8]}"])
    with pytest.raises(ConfigError, match=r"stages\.1\.train='last:0': use heads, all, or last:K"):
        tiny_config("stages.1.train=last:0")
    with pytest.raises(ConfigError, match=r"stages\.1\.train=last:3: the student's encoder has 2 layers"):
        tiny_config("student.init=teacher", "student.layers=[0, 1]", "stages.1.train=last:3")


def test_a_run_from_a_run_keeps_the_prefixes_it_was_given(matryoshka_run, tiny_config):
    from mtd.training.pipeline import trained_prefixes

    from_run = tiny_config("student.init=run", f"student.path={json.dumps(str(matryoshka_run))}")
    assert trained_prefixes(from_run) == {"fc1": [8, 24]}
    assert trained_prefixes(tiny_config()) == {}
