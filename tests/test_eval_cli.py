"""eval.py end to end on data sets it has never seen, in the STS and BEIR layouts."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as eval_cli  # noqa: E402  (the entry script at the project root)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def unseen_data(tiny_assets: Path, tmp_path: Path) -> Path:
    """A made-up STS set (tsv) and a made-up BEIR set built from the tiny corpus."""
    texts = (tiny_assets / "corpus.txt").read_text().splitlines()[:60]
    rng = random.Random(0)
    root = tmp_path / "data"
    sts = root / "my-sts" / "test.tsv"
    sts.parent.mkdir(parents=True)
    lines = ["sentence1\tsentence2\tscore"]
    lines += [f"{texts[i]}\t{texts[i + 1]}\t{rng.uniform(0, 5):.2f}" for i in range(0, 40, 2)]
    sts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    beir = root / "my-ir"
    corpus = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(texts)]
    _write_jsonl(beir / "corpus.jsonl", corpus)
    _write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": texts[i][:20]} for i in range(10)])
    qrels = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t{1 + i % 2}" for i in range(10)]
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return root


def test_eval_scores_unseen_folders_with_retention(tiny_assets, unseen_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = [f"a={tiny_assets / 'teacher_a'}", f"b={tiny_assets / 'teacher_b'}", "a+b", "a@16",
            "--data", str(unseen_data), "--tasks", "sts,retrieval,speed", "--speed-texts", "50",
            "--reference", "a+b", "--index", "hnsw", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]
    assert eval_cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| model | my-sts/test spearman | my-ir/test ndcg@10 | sentences/s "
                        "| retention % | speed x |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| a", "| b", "| a+b", "| a@16"]
    assert table[4].endswith("| 100.0 | 1.00 |")
    saved = json.loads(out.read_text())
    assert saved["settings"]["index"] == "hnsw" and set(saved["models"]) == {"a", "b", "a+b", "a@16"}
    by = {(r["model"], r["task"]): r for r in saved["results"]}
    assert 0 < by[("a", "retrieval")]["ndcg@10"] <= 100
    assert 0 <= by[("a", "retrieval")]["recall@10_vs_exact"] <= 100
    assert by[("a", "speed")]["sentences_per_s"] > 0 and by[("a", "speed")]["peak_memory_mb"] > 0
    assert ("a@16", "speed") not in by  # a prefix costs what its model costs: timed once


def test_eval_reports_bad_input_clearly(tiny_assets, unseen_data, tmp_path):
    (unseen_data / "my-ir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\tnope\t1\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="nope"):
        eval_cli.main([str(tiny_assets / "teacher_a"), "--data", str(unseen_data),
                       "--tasks", "retrieval", "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(SystemExit, match="not a folder"):
        eval_cli.main([str(tmp_path / "missing-model"), "--data", str(unseen_data)])
    with pytest.raises(SystemExit, match="reference"):
        eval_cli.main([str(tiny_assets / "teacher_a"), "--data", str(unseen_data), "--reference", "zz"])
