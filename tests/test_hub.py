"""Hub data sets (mtd.evaluation.hub), offline: local folders that load_dataset reads like hub repos."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mtd.evaluation.hub import HubDataError, load_hub_beir, load_hub_sts
from mtd.evaluation.retrieval import RetrievalFormatError, load_beir
from mtd.evaluation.sts import StsFormatError, load_sts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as eval_cli  # noqa: E402  (the entry script at the project root)

CORPUS = [
    {"_id": "d1", "title": "Dewey", "text": " Decimal classification."},
    {"_id": "d2", "title": "", "text": "No title here. "},
    {"_id": "d3", "text": "Missing title."},
    {"_id": "d4", "title": "Only a title", "text": ""},
]
QUERIES = [
    {"_id": "q1", "text": "what is dewey"},
    {"_id": "q2", "text": "untitled"},
    {"_id": "q3", "text": "only negatives"},
    {"_id": "q4", "text": "not judged"},
]
QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t0", "q2\td2\t1", "q3\td3\t0", "q2\td2\t1"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _value(text: str) -> int | float | str:
    """A tsv field as JSON writes it: numbers as numbers."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _hub_beir(folder: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS, part_split: str | None = None,
              ) -> Path:
    """A folder in BEIR layout that is also a hub repo in MTEB's layout (README.md `configs:`).

    `qrels` are the lines of qrels/test.tsv; the hub config reads the same judgments from
    qrels/test.jsonl, as MTEB's repos do (a repo gets one file format). The corpus/queries configs
    have splits named "corpus"/"queries", as in MTEB's repos, or `part_split` (their only split).
    """
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("".join(f"{r}\n" for r in qrels), encoding="utf-8")
    header, *judgments = [line.split("\t") for line in qrels]
    _jsonl(folder / "qrels" / "test.jsonl",
           [dict(zip(header, map(_value, j), strict=True)) for j in judgments])
    configs = [("corpus", part_split or "corpus", "corpus.jsonl"),
               ("queries", part_split or "queries", "queries.jsonl"),
               ("default", "test", "qrels/test.jsonl")]
    yaml = "".join(f"- config_name: {name}\n  data_files:\n  - split: {split}\n    path: {path}\n"
                   for name, split, path in configs)
    (folder / "README.md").write_text(f"---\nconfigs:\n{yaml}---\n# A BEIR set\n", encoding="utf-8")
    return folder


def _same_beir(a, b) -> None:
    assert (a.name, a.corpus_ids, a.corpus_texts, a.query_ids, a.query_texts, a.qrels) == (
        b.name, b.corpus_ids, b.corpus_texts, b.query_ids, b.query_texts, b.qrels)


@pytest.mark.parametrize("part_split", [None, "test"], ids=["mteb-splits", "single-split"])
def test_hub_beir_equals_the_folder(offline_datasets, tmp_path, part_split):
    folder = _hub_beir(tmp_path / "toy", part_split=part_split)
    hub = load_hub_beir(str(folder))
    _same_beir(hub, load_beir(folder))
    assert hub.name == "toy/test"
    assert hub.corpus_texts == ["Dewey  Decimal classification.", "No title here.", "Missing title.",
                                "Only a title"]
    assert hub.query_ids == ["q1", "q2"] and hub.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1}}


def test_hub_beir_numeric_ids_are_text(offline_datasets, tmp_path):
    folder = _hub_beir(tmp_path / "num", corpus=[{"_id": 1, "text": "one"}, {"_id": 2, "text": "two"}],
                       queries=[{"_id": 7, "text": "seven"}], qrels=["query-id\tcorpus-id\tscore", "7\t2\t1"])
    hub = load_hub_beir(str(folder))
    _same_beir(hub, load_beir(folder))
    assert hub.corpus_ids == ["1", "2"] and hub.qrels == {"7": {"2": 1}}


HUB_BEIR_ERRORS = {
    "no text column": ({"corpus": [{"_id": "d1", "body": "b"}]},
                       r"toy/corpus: missing column\(s\) 'text' \(found \['_id', 'body'\]\)"),
    "no score column": ({"qrels": ["query-id\tcorpus-id\tgrade", "q1\td1\t1"]},
                        r"toy/qrels/test: missing column\(s\) 'score'"),
    "duplicate query": ({"queries": [{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]},
                        r"toy/queries, row 2: duplicate _id 'q1' \(first on row 1\)"),
    "unknown query": ({"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t1", "zz\td1\t1"]},
                      r"toy/qrels/test, row 2: 1 query id\(s\) not in queries: 'zz'"),
    "float grade": ({"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t1.5"]},
                    r"toy/qrels/test, row 1: score must be an integer, got 1\.5"),
    "no positives": ({"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t0"]}, "no query has a positive"),
}


@pytest.mark.parametrize("case", list(HUB_BEIR_ERRORS))
def test_hub_beir_errors_name_the_set_and_row(offline_datasets, tmp_path, case):
    change, match = HUB_BEIR_ERRORS[case]
    folder = _hub_beir(tmp_path / "toy", **change)
    with pytest.raises(RetrievalFormatError, match=match) as err:
        load_hub_beir(str(folder))
    assert str(folder) in str(err.value)


def test_hub_sts_equals_the_file(offline_datasets, tmp_path):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i * 0.75, "genre": "x"} for i in range(6)]
    _jsonl(tmp_path / "my-sts" / "test.jsonl", rows)
    _jsonl(tmp_path / "my-sts" / "train.jsonl", rows[:2])
    hub, ref = load_hub_sts(str(tmp_path / "my-sts")), load_sts(tmp_path / "my-sts" / "test.jsonl")
    assert (hub.name, hub.sentences1, hub.sentences2) == (ref.name, ref.sentences1, ref.sentences2)
    assert hub.name == "my-sts/test"
    np.testing.assert_array_equal(hub.scores, ref.scores)
    assert len(load_hub_sts(str(tmp_path / "my-sts"), split="train")) == 2


def test_hub_sts_errors(offline_datasets, tmp_path):
    _jsonl(tmp_path / "cols" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1}])
    with pytest.raises(StsFormatError, match=r"cols/test: missing column\(s\) 'score' \(found \["):
        load_hub_sts(str(tmp_path / "cols"))
    _jsonl(tmp_path / "nulls" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1.0},
                                               {"sentence1": "c", "sentence2": "d", "score": None}])
    with pytest.raises(StsFormatError, match=r"nulls/test, row 2: non-numeric score None"):
        load_hub_sts(str(tmp_path / "nulls"))


def test_unknown_data_set_is_named_with_a_way_out(offline_datasets, tmp_path):
    name = str(tmp_path / "no-such-org" / "no-such-set")
    with pytest.raises(HubDataError, match=r"(?s)no-such-set.*local folder.*STS folder"):
        load_hub_sts(name)
    with pytest.raises(HubDataError, match=r"(?s)no-such-set.*config 'corpus'.*BEIR folder"):
        load_hub_beir(name)
    _jsonl(tmp_path / "sts-only" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1}])
    with pytest.raises(HubDataError, match="sts-only"):  # an STS set has no corpus config
        load_hub_beir(str(tmp_path / "sts-only"))


def test_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hub_sts("mteb/stsbenchmark-sts")


def test_eval_scores_hub_sets_without_a_data_folder(offline_datasets, tiny_assets, tmp_path, monkeypatch,
                                                    capsys):
    texts = (tiny_assets / "corpus.txt").read_text().splitlines()[:30]
    _jsonl(tmp_path / "hub-sts" / "test.jsonl",
           [{"sentence1": texts[i], "sentence2": texts[i + 1], "score": i % 5} for i in range(0, 20, 2)])
    ir = _hub_beir(tmp_path / "hub-ir", corpus=[{"_id": f"d{i}", "text": t} for i, t in enumerate(texts)],
                   queries=[{"_id": f"q{i}", "text": texts[i][:20]} for i in range(5)],
                   qrels=["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(5)])
    monkeypatch.setattr(eval_cli, "DEFAULT_DATA", tmp_path / "no-default-data")
    out = tmp_path / "results.json"
    argv = [f"a={tiny_assets / 'teacher_a'}", "--tasks", "sts,retrieval", "--hub", f"retrieval:{ir}",
            "--hub", f"sts:{tmp_path / 'hub-sts'}", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert eval_cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| model | hub-sts/test spearman | hub-ir/test ndcg@10 |"
    assert table[2].startswith("| a | ")
    saved = json.loads(out.read_text())
    assert saved["settings"]["hub"] == [f"retrieval:{ir}", f"sts:{tmp_path / 'hub-sts'}"]
    assert saved["settings"]["data"] is None
    assert [(r["task"], r["hub"]) for r in saved["results"]] == [
        ("sts", str(tmp_path / "hub-sts")), ("retrieval", str(ir))]
    assert 0 < saved["results"][1]["ndcg@10"] <= 100


def test_eval_rejects_bad_hub_options(tiny_assets, tmp_path, monkeypatch, caplog):
    model = str(tiny_assets / "teacher_a")
    with pytest.raises(SystemExit):  # argparse: not TASK:NAME
        eval_cli.main([model, "--hub", "image-text:some/set"])
    with pytest.raises(SystemExit):  # its task is not asked for
        eval_cli.main([model, "--hub", "retrieval:some/set", "--tasks", "sts"])
    monkeypatch.setattr(eval_cli, "DEFAULT_DATA", tmp_path / "no-default-data")
    assert eval_cli.main([model, "--tasks", "sts"]) == 2  # no --hub: the missing default is an error
    assert "no-default-data does not exist" in caplog.text
