"""bench/dims_table.py's table: each reduced vector's scores beside the full head's."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_table_rows_and_share_of_full(bench_script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports its sibling peers.py
    dims_table = bench_script("dims_table")
    rows = [{"model": m, "task": t, "dataset": d, ("spearman" if t == "sts" else "ndcg@10"): v}
            for m, vals in {"full": (80.0, 40.0), "learned64": (76.0, 30.0), "pca64": (72.0, 36.0),
                            "prefix64": (60.0, 20.0)}.items()
            for (t, d), v in zip((("sts", "stsb/test"), ("retrieval", "cisi/test")), vals, strict=True)]
    cells = {("full", 1152): "full", ("learned", 64): "learned64", ("pca", 64): "pca64",
             ("prefix", 64): "prefix64"}
    markdown, score = dims_table.table(rows, cells, [64])
    lines = markdown.splitlines()
    assert lines[0] == "| dims | method | stsb/test | cisi/test | % of full (mean) |"
    # share of full: mean over sets of 100 * reduced / full
    assert lines[2:] == ["| 64 | learned | 76.00 | 30.00 | 85.0 |", "| 64 | prefix | 60.00 | 20.00 | 62.5 |",
                         "| 64 | pca | 72.00 | 36.00 | 90.0 |", "| 1152 | full | 80.00 | 40.00 | 100.0 |"]
    assert score["pca64"] == {"stsb/test": 72.0, "cisi/test": 36.0}
