"""eval.py end to end on data sets it has never seen, in the STS and BEIR layouts."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as eval_cli  # noqa: E402  (the entry script at the project root)


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


def _refused(argv: list[str], caplog, match: str) -> None:
    """eval.py exits 2 with one logged error matching `match`."""
    caplog.clear()
    assert eval_cli.main([str(a) for a in argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and re.search(match, errors[0]), errors


@pytest.fixture
def no_scoring(monkeypatch):
    """Scoring any model fails the test: what is refused must be refused before any work."""
    from mtd.evaluation import suite

    def scored(*args, **kwargs):
        raise AssertionError("a model was scored before the bad input was found")

    for name in ("run_sts", "run_retrieval", "run_image_text", "run_speed"):
        monkeypatch.setattr(suite, name, scored)


def test_eval_reports_bad_input_clearly(tiny_assets, unseen_data, tmp_path, caplog, no_scoring):
    model = tiny_assets / "teacher_a"
    cache = ["--cache-dir", tmp_path / "cache"]
    _refused([tmp_path / "missing-model", "--data", unseen_data], caplog, "not a folder")
    _refused([model, "--data", unseen_data, "--reference", "zz"], caplog, r"--reference 'zz' is not one of")
    _refused([model, "--data", tmp_path / "nowhere"], caplog, r"nowhere does not exist; pass --data")
    # Bad data is found before any model is scored, whichever set comes first.
    qrels = unseen_data / "my-ir" / "qrels" / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\tnope\t1\n", encoding="utf-8")
    _refused([model, "--data", unseen_data, *cache], caplog,
             r"test.tsv, line 2: 1 corpus id\(s\) not in corpus.jsonl")
    qrels.unlink()
    _refused([model, "--data", unseen_data, *cache], caplog,
             r"my-ir: missing qrels/test.tsv; a BEIR folder holds corpus.jsonl, queries.jsonl and qrels")
    assert not (tmp_path / "cache").exists()  # nothing was encoded


def test_eval_without_any_data_set_is_an_error(tiny_assets, tmp_path, caplog, no_scoring):
    data = tmp_path / "data"
    (data / "notes").mkdir(parents=True)
    (data / "notes" / "test.jsonl").write_text('{"question": "q"}\n', encoding="utf-8")
    _refused([tiny_assets / "teacher_a", "--data", data, "--tasks", "sts,retrieval,speed"], caplog,
             r"No data set for --tasks sts,retrieval under .*data: eval.py looks for STS files .*BEIR "
             r"folders .*image-caption files .*notes/test.jsonl.*Point --data at the folder")


def test_eval_checks_out_before_scoring(tiny_assets, unseen_data, tmp_path, caplog, no_scoring):
    (tmp_path / "file").write_text("not a folder")
    _refused([tiny_assets / "teacher_a", "--data", unseen_data, "--out", tmp_path / "file" / "results.json"],
             caplog, r"--out .*file/results.json: .*file is a file, not a folder")
    _refused([tiny_assets / "teacher_a", "--data", unseen_data, "--out", tmp_path], caplog, r"is a folder")


def test_eval_saves_results_elsewhere_when_out_fails_at_the_end(tiny_assets, unseen_data, tmp_path, caplog,
                                                                monkeypatch):
    """--out was fine at the start, but its folder is gone when the results are written."""
    import tempfile

    from mtd.evaluation import suite

    out_dir = tmp_path / "out"
    evaluate_all = suite.evaluate_all

    def then_lose_the_folder(*args, **kwargs):
        rows = evaluate_all(*args, **kwargs)
        out_dir.rmdir()
        out_dir.write_text("now a file")
        return rows

    monkeypatch.setattr(suite, "evaluate_all", then_lose_the_folder)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _refused([tiny_assets / "teacher_a", "--data", unseen_data, "--tasks", "sts", "--cache-dir",
              tmp_path / "cache", "--out", out_dir / "results.json"], caplog,
             r"Cannot write .*results.json .* The results are saved in .*tmp/results-.*\.json instead")
    [saved] = (tmp_path / "tmp").glob("results-*.json")
    rows = json.loads(saved.read_text())["results"]
    assert [(r["task"], r["dataset"]) for r in rows] == [("sts", "my-sts/test")]


def test_eval_names_a_truncated_weights_file(tiny_assets, unseen_data, tmp_path, caplog, no_scoring):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_assets / "teacher_b", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # Named before the good model listed first is scored.
    _refused([tiny_assets / "teacher_a", broken, "--data", unseen_data], caplog,
             r"broken/model.safetensors \(.*\): the file is truncated or corrupt.*re-export.*setup.sh"
             r".*download the model again")


def test_loading_a_truncated_model_names_the_file(tiny_assets, tmp_path):
    """The same message where a model is loaded, for damage the early check did not see."""
    from mtd.evaluation.specs import SentenceTransformerEncoder
    from mtd.io import WeightsError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_assets / "teacher_a", broken)
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"broken/model.safetensors .*truncated or corrupt"):
        SentenceTransformerEncoder("broken", broken).encode(["a text"])


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(tmp_path / "missing-model"),
                           "--data", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing-model' is not a folder" in proc.stderr
