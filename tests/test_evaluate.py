"""Data discovery by layout, and the results table with retention."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mtd.evaluation.image_text import ImageTextFormatError
from mtd.evaluation.sts import StsFormatError
from mtd.evaluation.suite import discover, evaluate_all, retention_table

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


def test_discover_reads_headers_as_the_loaders_do(tmp_path):
    """A BOM or quoted header names the same columns for discovery as for load_sts."""
    bom = tmp_path / "bom" / "test.csv"
    bom.parent.mkdir()
    bom.write_text("\ufeffsentence1,sentence2,score\nx,y,2\n", encoding="utf-8")
    quoted = tmp_path / "quoted" / "test.csv"
    quoted.parent.mkdir()
    quoted.write_text('"sentence1","sentence2","score"\n"x","y",1\n', encoding="utf-8")
    assert discover(tmp_path).sts == [bom, quoted]


@pytest.mark.parametrize(("name", "content", "found"), [
    ("test.csv", "sentence1,sentence2,label\nx,y,2\n", "['sentence1', 'sentence2', 'label']"),
    ("test.tsv", "sentence1\tsentence2\nx\ty\n", "['sentence1', 'sentence2']"),
    ("test.jsonl", '{"sentence1": "x", "sentence2": "y", "similarity": 1}\n',
     "['sentence1', 'sentence2', 'similarity']"),
])
def test_an_sts_file_without_its_score_is_an_error_not_skipped(tmp_path, name, content, found):
    path = tmp_path / "mysts" / name
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")
    with pytest.raises(StsFormatError, match=re.escape(
            f"{path}: looks like an STS set but has no column(s) 'score'; found {found}, expected "
            "sentence1, sentence2, score. Rename the column(s), or move the file out")):
        discover(tmp_path)


def test_an_image_caption_file_without_images_is_an_error(tmp_path):
    _jsonl(tmp_path / "pics" / "test.jsonl", [{"file": "1.jpg", "captions": ["c"]}])
    match = r"pics/test.jsonl: looks like an image-caption set but has no column\(s\) 'image'; found \['file'"
    with pytest.raises(ImageTextFormatError, match=match):
        discover(tmp_path)


class _ImageModel:
    """A model with an image side that must never be asked to encode anything."""

    name = fingerprint = "m"

    def encode(self, texts, role="document", batch_size=64):
        raise AssertionError("encoded before the data was checked")

    encode_images = encode


def test_image_caption_set_with_no_image_on_disk_fails_before_scoring(tmp_path):
    sts = _jsonl(tmp_path / "mysts" / "test.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 1}] * 2)
    pics = _jsonl(tmp_path / "pics" / "test.jsonl", [{"image": f"images/{i}.jpg", "captions": ["c"]}
                                                     for i in range(3)])
    with pytest.raises(ImageTextFormatError, match=re.escape(
            f"{pics}: none of its 3 images exists (first: {pics.parent / 'images' / '0.jpg'}). Image paths "
            f"are relative to the file's folder: put the images there")):
        evaluate_all({"m": _ImageModel()}, data=tmp_path, tasks=["sts", "image-text"], split="test",
                     batch_size=8, index="flat", cache_dir=None, speed=None)
    assert sts.is_file()


def test_image_caption_set_with_no_readable_image_is_named(tmp_path):
    pics = _jsonl(tmp_path / "pics" / "test.jsonl", [{"image": "0.jpg", "captions": ["c"]}])
    (pics.parent / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageTextFormatError, match=r"pics/test.jsonl: none of the 1 images could be loaded"):
        evaluate_all({"m": _ImageModel()}, data=tmp_path, tasks=["image-text"], split="test",
                     batch_size=8, index="flat", cache_dir=None, speed=None)


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
