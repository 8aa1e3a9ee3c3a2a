"""Which stage moved the scores? STS of a run's student at the end of every stage.

A run keeps the student's weights at the end of each stage (runs/NAME/checkpoints/S-STAGE-end/).
This script loads each of them into the run's student and scores every head trained so far on
STS (Spearman x100 of cosine vs gold), so a run's table reads: stage 1 (heads on the frozen
encoder) gave this, stage 2 (the last layers) moved it by that, and so on.

    python bench/stage_sts.py runs/NAME [runs/OTHER ...] [--sts FILE ...] [--out FILE]

Prints one row per run, stage and head, and writes them to --out (JSON,
bench/results/stage_sts.json by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mtd  # noqa: F401  (torchvision shim before transformers loads)

ROOT = Path(__file__).resolve().parents[1]
STS = [ROOT.parent / "shared/data/sts/stsb/test.jsonl", ROOT.parent / "shared/data/sts/sickr/test.jsonl"]


def stage_ends(run: Path) -> list[tuple[int, Path]]:
    """(stage index, folder) of the run's stage-end checkpoints that hold the student's weights."""
    from mtd.training.checkpoints import stage_ends as listed

    return [(index, folder) for index, folder in listed(run) if (folder / "model.safetensors").is_file()]


def score_run(run: Path, sts_files: list[str]) -> list[dict]:
    from mtd.config import load_config
    from mtd.errors import MtdError
    from mtd.evaluation.sts import evaluate_sts, load_sts
    from mtd.io import load_safetensors
    from mtd.models.student import encode
    from mtd.training.pipeline import build_student

    ends = stage_ends(run)
    if not ends:
        raise MtdError(f"{run}/checkpoints holds no stage-end checkpoint (S-NAME-end/model.safetensors): "
                       "score a run that finished at least one stage.")
    cfg = load_config(run / "config.yaml", [])
    first = load_safetensors(ends[0][1] / "model.safetensors")
    target_dim = next((first[f"heads.{h}.weight"].shape[0] for h, d in cfg.student.heads.items()
                       if d == "target"), 0)  # a head sized to the target keeps that size here
    student, tokenizer = build_student(cfg, target_dim)
    sets = [load_sts(p) for p in sts_files]
    rows, trained = [], []
    for n, (index, folder) in enumerate(ends):
        student.load_state_dict(first if n == 0 else load_safetensors(folder / "model.safetensors"))
        stage = cfg.stages[index]
        trained += [h for h in stage.heads if h not in trained]
        for head in trained:
            def vectors(texts: list[str], head: str = head):
                return encode(student, tokenizer, texts, head, cfg.student.max_length)

            scores = {s.name: round(evaluate_sts(vectors, s, None)["spearman"], 2) for s in sets}
            rows.append({"run": str(run), "stage": f"{index + 1} {stage.name}", "head": head} | scores)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sts", nargs="+", default=[str(p) for p in STS])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/stage_sts.json")
    args = parser.parse_args()

    from mtd.io import atomic_write_json

    t0 = time.perf_counter()
    rows = [row for run in args.runs for row in score_run(run, args.sts)]
    for row in rows:
        print(json.dumps(row))
    atomic_write_json(args.out, {"rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                                 "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    from mtd.errors import cli_main

    raise SystemExit(cli_main("stage_sts", main))
