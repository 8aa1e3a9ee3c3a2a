"""bench/gpu_checks.sh: its steps run end to end at toy size on a CPU (`smoke`), and it refuses
to start without its teachers and data."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_checks.sh"
DATA = ROOT.parent / "shared" / "data"
TEACHERS = [ROOT / "models" / "all-MiniLM-L6-v2", ROOT / "models" / "all-mpnet-base-v2"]


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=900)


def test_unknown_mode_and_missing_data_stop_with_the_fix(tmp_path):
    proc = run("gpu")
    assert proc.returncode == 2 and "bench|full|full-l3|smoke" in proc.stderr
    proc = run("full", ROOT_W=str(tmp_path / "w"), OUT=str(tmp_path / "out"), PACK_DIR=str(tmp_path))
    assert proc.returncode == 2
    assert f"missing {tmp_path / 'w'}/models/all-MiniLM-L6-v2" in proc.stderr and "device-pack" in proc.stderr


@pytest.mark.slow
def test_smoke_runs_every_step(tmp_path):
    """About 3 minutes on a busy 2-core CPU."""
    missing = [p for p in (*TEACHERS, DATA / "corpus", DATA / "sts") if not p.is_dir()]
    if missing:
        pytest.skip(f"needs {missing}")
    out = tmp_path / "out"
    proc = run("smoke", OUT=str(out), TMPDIR=str(tmp_path))
    summary = json.loads((out / "summary-smoke.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + json.dumps(summary["steps"])[-4000:]
    assert not summary["failed"] and not summary["skipped"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert set(steps) == {"facts", "throughput", "throughput-st", "resim", "cache-minilm", "cache-mpnet",
                          "fsdp", "fsdp-check", "throughput-cos", "full-smoke-cache", "full-smoke-train",
                          "full-smoke-collect", "full-smoke-student"}
    # Each bench's own results are in the summary.
    rows = steps["throughput"]["results"]["train_throughput.json"]["rows"]
    assert {r["stage"] for r in rows} == {"heads", "all"} and all(r["steps_per_s"] > 0 for r in rows)
    # mtd's trainer and SentenceTransformerTrainer, same device, precision and batch, and their ratio.
    st = steps["throughput-st"]["results"]["throughput_st.json"]
    st_rows = {r["trainer"]: r for r in st["rows"]}
    assert set(st_rows) == {"mtd (cos+sim+resim)", "mtd (cos)", "sentence-transformers (MSELoss)"}
    assert all((r["device"], r["precision"], r["batch"]) == ("cpu", "no", 8) and r["steps_per_s"] > 0
               for r in st["rows"])
    facts = steps["facts"]["results"]["facts.json"]
    assert (st["device"], st["precision"], st["versions"]["datasets"]) == ("cpu", "no", facts["datasets"])
    assert st["ratio_mtd_to_st"] == pytest.approx(st_rows["mtd (cos+sim+resim)"]["steps_per_s"]
                                                  / st_rows["sentence-transformers (MSELoss)"]["steps_per_s"])
    cos = steps["throughput-cos"]["results"]["train_throughput_cos.json"]
    assert {r["stage"] for r in cos["rows"]} == {"all"}
    resim = steps["resim"]["results"]["resim_speed.json"]["rows"]
    assert all(r["sorted_peak_mib"] is not None for r in resim)
    for t in ("minilm", "mpnet"):
        assert steps[f"cache-{t}"]["results"][f"cache_{t}.json"]["cache_texts_per_s"] > 0
    fsdp = steps["fsdp-check"]["results"]["fsdp.json"]
    assert fsdp["exported"] and fsdp["fsdp_shard_folders"]
    progress = steps["full-smoke-collect"]["results"]["full-smoke-progress.json"]
    assert progress["finished"] and {r["set"] for r in progress["results"]} == {"stsb/test", "sickr/test"}
    # What comes back from a device call: at most 8 plain files, logs packed, the student in parts.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())
    with tarfile.open(out / "smoke-files.tar.gz") as tar:
        assert "smoke/fsdp.log" in tar.getnames()
    parts = [out / f for f in files if f.startswith("smoke-student.tar.")]
    assert parts and all(p.stat().st_size <= 16 * 2**20 for p in parts)
    joined = tmp_path / "student.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert "student-fp16/model.safetensors" in tar.getnames()
