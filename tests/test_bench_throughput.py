"""bench/train_throughput.py runs end to end on the tiny config (its numbers are the bench's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mtd.config import dump_config

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_runs_every_variant(config, tmp_path):
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(dump_config(config()))
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), str(yaml_path), "--batch", "16",
         "--steps", "2", "--warmup", "1", "--repeats", "1", "--texts", "200", "--target-dim", "80",
         "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["stage"], r["pipeline"]) for r in rows} >= {
        ("heads", "frozen encoder features (heads-only stage)"), ("all", "token ids once")}
    assert all(r["steps_per_s"] > 0 for r in rows)
