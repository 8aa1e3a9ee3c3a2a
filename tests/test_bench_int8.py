"""bench/int8.py times and scores a model's torch, ONNX and int8 variants without touching it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from mtd.io import hash_folder

ROOT = Path(__file__).resolve().parents[1]


def test_bench_exports_a_copy_and_reports_every_variant(tiny_assets, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_int8", ROOT / "bench" / "int8.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", model)
    (tmp_path / "link").symlink_to(model)  # as models/all-MiniLM-L6-v2 is: the bench copies it
    before = hash_folder(model)
    texts = (tiny_assets / "corpus.txt").read_text().splitlines()
    sts = tmp_path / "sts.jsonl"
    rows = [{"sentence1": texts[i], "sentence2": texts[i + 1], "score": i % 5} for i in range(0, 40, 2)]
    sts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "int8.json"
    argv = [str(tmp_path / "link"), "--stsb", str(sts), "--sickr", str(sts), "--repeats", "2",
            "--batch1-texts", "3", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    assert hash_folder(model) == before and not (model / "onnx").exists()
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["torch fp32", "onnx fp32", "onnx int8"]
    torch_row, onnx_row, int8_row = rows
    assert torch_row["x_torch_b64"] == 1.0 and torch_row["stsb_change"] == 0.0
    assert len(int8_row["passes_b64"]) == 2 and int8_row["texts_b64"] == 40 and int8_row["texts_b1"] == 3
    assert abs(onnx_row["stsb_change"]) < 0.05 and onnx_row["mean_cos_to_torch"] > 0.9999
    assert onnx_row["stsb"] == onnx_row["sickr"]  # same pairs: timed vectors score like fresh ones
    assert int8_row["file_mb"] < onnx_row["file_mb"]
    table = capsys.readouterr().out
    assert "| link | onnx int8 |" in table and "goal (" in table
