"""Data discovery by layout, and the results table with retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtd.evaluation.suite import discover, retention_table

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_discover_recognizes_each_layout(tmp_path):
    sts = _jsonl(tmp_path / "a" / "mysts" / "test.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 1}])
    csv = tmp_path / "b" / "test.csv"
    csv.parent.mkdir()
    csv.write_text("sentence1,sentence2,score\nx,y,2\n", encoding="utf-8")
    beir = tmp_path / "c" / "myir"
    _jsonl(beir / "corpus.jsonl", [{"_id": "d1", "text": "t"}])
    _jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "q"}])
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    pics = _jsonl(tmp_path / "d" / "test.jsonl", [{"image": "1.jpg", "captions": ["c"]}])
    _jsonl(tmp_path / "e" / "test.jsonl", [{"other": 1}])  # skipped, with a warning
    _jsonl(tmp_path / "a" / "mysts" / "dev.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 1}])

    found = discover(tmp_path)
    assert found.sts == sorted([sts, csv])
    assert found.retrieval == [beir]  # its qrels/test.tsv is not mistaken for STS
    assert found.image_text == [pics]
    assert discover(tmp_path, split="dev").sts == [tmp_path / "a" / "mysts" / "dev.jsonl"]


def test_discover_missing_folder():
    with pytest.raises(FileNotFoundError, match="--data"):
        discover("/no/such/data")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not beside the project")
def test_discover_shared_data():
    found = discover(SHARED)
    assert [p.parent.name for p in found.sts] == ["sickr", "stsb"]
    assert [p.name for p in found.retrieval] == ["cisi"]
    assert [p.parent.name for p in found.image_text] == ["coco_mini"]


def test_retention_table():
    rows = [
        {"model": "student", "task": "sts", "dataset": "stsb/test", "spearman": 80.0},
        {"model": "student", "task": "retrieval", "dataset": "cisi", "ndcg@10": 30.0},
        {"model": "student", "task": "speed", "dataset": "wordnet-1000", "sentences_per_s": 900.0},
        {"model": "a+b", "task": "sts", "dataset": "stsb/test", "spearman": 84.0},
        {"model": "a+b", "task": "retrieval", "dataset": "cisi", "ndcg@10": 40.0},
        {"model": "a+b", "task": "speed", "dataset": "wordnet-1000", "sentences_per_s": 100.0},
    ]
    table = retention_table(rows, reference="a+b").splitlines()
    assert table[0] == "| model | stsb/test spearman | cisi ndcg@10 | sentences/s | retention % | speed x |"
    # retention = mean(80/84, 30/40) * 100 = 85.1; speed 900 / 100 = 9.00
    assert table[2] == "| student | 80.00 | 30.00 | 900.00 | 85.1 | 9.00 |"
    assert table[3] == "| a+b | 84.00 | 40.00 | 100.00 | 100.0 | 1.00 |"
    assert "retention" not in retention_table(rows, reference=None)
