"""Contrastive distillation (DisCo) against plain distillation, on the same student, data and steps.

    python bench/disco_table.py [--train] [--throughput-steps 30]

Five configurations of the default recipe (configs/default.yaml: MiniLM cut to 3 layers, 10k
WordNet texts, 1,200 steps in three stages, this CPU scale):
    plain             configs/default.yaml
    +ckd              configs/ckd.yaml: contrastive knowledge distillation on fc1 in every stage
    +kl               configs/kl.yaml: KL between the in-batch similarity distributions
    +finetune         configs/finetune.yaml on plain's student: 120 steps of pair InfoNCE on
                      STS-B/SICK-R train pairs (score >= 4) and COCO caption pairs, fc1 still
                      distilled on the anchors
    +ckd+finetune     configs/ckd-finetune.yaml: the same on +ckd's student
Each run's fc1 is scored on STS-B and SICK-R test (Spearman x100) and CISI (nDCG@10 x100) with
eval.py's code, beside the teachers and their combination. --train trains the runs that are
missing (about 15 minutes each on 2 CPU cores; the fine-tuning ones about 3).

Training throughput: each configuration's last stage (the one training every weight) is run for
--throughput-steps steps in this process, configurations interleaved twice (A..E, E..A), and its
median steps/s after 3 warm-up steps is reported (texts/s = steps/s x batch 64; a pair batch holds
64 anchors and 64 positives).

Writes bench/results/disco.json and the "Contrastive distillation" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from peers import add_result_args, write_section

import mtd  # noqa: F401  (compat shims before transformers)
from mtd.config import load_config
from mtd.evaluation.specs import parse_models
from mtd.evaluation.suite import MAIN_METRIC, evaluate_all
from mtd.io import atomic_write_json
from mtd.training import pipeline
from mtd.training.trainer import StageRunner

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("disco_table")
# label: (config, overrides, run folder)
CONFIGS = {
    "plain": ("configs/default.yaml", [], "runs/default"),
    "+ckd": ("configs/ckd.yaml", [], "runs/ckd"),
    "+kl": ("configs/kl.yaml", [], "runs/kl"),
    "+finetune": ("configs/finetune.yaml", [], "runs/finetune"),
    "+ckd+finetune": ("configs/ckd-finetune.yaml", [], "runs/ckd-finetune"),
}
PEERS = {"all-MiniLM-L6-v2": "models/all-MiniLM-L6-v2", "all-mpnet-base-v2": "models/all-mpnet-base-v2",
         "teachers combined": "models/all-MiniLM-L6-v2+models/all-mpnet-base-v2"}
WARMUP = 3


def train_missing(configs: dict) -> None:
    """Train (in order: fine-tuning needs its source run) every run without a student/."""
    for label, (config, overrides, run) in configs.items():
        if (ROOT / run / "student").is_dir():
            continue
        logger.info("Training %s: python train.py %s", label, " ".join([config, *overrides]))
        subprocess.run([sys.executable, "train.py", config, *overrides, "eval.teachers=false"],
                       cwd=ROOT, check=True)


def steps_per_second(config: str, overrides: list[str], steps: int, out: Path) -> float:
    """The config's last stage alone, `steps` steps, its median steps/s after WARMUP steps."""
    last = len(load_config(ROOT / config, overrides).stages) - 1
    cfg = load_config(ROOT / config, [*overrides, f"name=speed-{time.monotonic_ns()}",
                                      f"output_dir={out}", "eval.sts_dir=null", "train.eval_every=0",
                                      f"train.save_every={steps + 1}", f"stages.{last}.steps={steps}"])
    cfg.stages = cfg.stages[last:]  # the last stage alone (checked as part of the whole config)
    if cfg.stages[0].train != "all":
        raise ValueError(f"{config}: its last stage does not train every weight")
    times: list[float] = []
    real = StageRunner._after_step

    def timed(self, model, step, *args, **kwargs):
        times.append(time.perf_counter())
        return real(self, model, step, *args, **kwargs)

    with mock.patch.object(StageRunner, "_after_step", timed):
        pipeline.run(cfg)
    gaps = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:], strict=False)]
    return 1 / statistics.median(gaps)


def throughput(configs: dict, steps: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {label: [] for label in configs}
    order = list(configs)
    with tempfile.TemporaryDirectory() as tmp:
        for labels in (order, order[::-1]):
            for label in labels:
                config, overrides, _ = configs[label]
                rates[label].append(steps_per_second(config, overrides, steps, Path(tmp)))
                logger.info("%s: %.2f steps/s", label, rates[label][-1])
    return {label: statistics.median(r) for label, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train the runs that are missing")
    parser.add_argument("--throughput-steps", type=int, default=30, help="0: skip the throughput runs")
    add_result_args(parser, "disco")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data, cache, out, docs = (p.resolve() for p in (args.data, args.cache_dir, args.out, args.docs))
    os.chdir(ROOT)  # configs name their data relative to the project root
    if args.train:
        train_missing(CONFIGS)
    missing = [run for _, _, run in CONFIGS.values() if not (ROOT / run / "final").is_dir()]
    if missing:
        parser.error(f"no trained student in {missing}: pass --train, or train them (see --help)")
    specs = [f"{label}={run}/final" for label, (_, _, run) in CONFIGS.items()]
    specs += [f"{label}={path}" for label, path in PEERS.items()]
    rows = evaluate_all(parse_models(specs), data=data, tasks=("sts", "retrieval"), split="test",
                        batch_size=64, index="flat", cache_dir=cache, speed=None)
    score: dict[str, dict[str, float]] = {}
    for r in rows:
        score.setdefault(r["model"], {})[r["dataset"]] = r[MAIN_METRIC[r["task"]]]
    rates = throughput(CONFIGS, args.throughput_steps) if args.throughput_steps else {}
    markdown = table(score, rates)
    print(markdown)
    atomic_write_json(out, {"date": str(datetime.date.today()), "configs": CONFIGS, "scores": score,
                            "steps_per_s": rates, "throughput_steps": args.throughput_steps,
                            "results": rows, "table": markdown})
    write_section(docs, "Contrastive distillation", f"""`bench/disco_table.py`, measured
{datetime.date.today()} on {os.cpu_count()} CPU cores (CPU scale: the default recipe's 10k WordNet
texts and 1,200 steps, not the GPU scale the method is meant for). To rerun: `python
bench/disco_table.py --train` (numbers and settings in `bench/results/disco.json`). Scores:
Spearman x100 (STS-B, SICK-R test), nDCG@10 x100 (CISI); training speed: the last stage (every
weight trains), batch 64, median over two interleaved runs of each configuration; a pair step
encodes 64 anchors and 64 positives. Differences are against plain.

- plain: `configs/default.yaml` (MiniLM cut to layers [0, 3, 5], Jasper stages 1-3, 1,200 steps).
- +ckd: `configs/ckd.yaml`, ckd on fc1 in every stage (weight 100, queue 4,096, temperature 0.05).
- +kl: `configs/kl.yaml`, the similarity-distribution KL on fc1 in every stage (weight 10).
- +finetune: `configs/finetune.yaml`, plain's student fine-tuned 120 steps on 3,984 labeled pairs
  (STS-B and SICK-R train pairs scoring 4+, coco_mini caption pairs) with the pair term, fc1 still
  distilled on the anchors. STS-B and SICK-R are in-domain for these pairs (train split).
- +ckd+finetune: `configs/ckd-finetune.yaml`, the same fine-tuning of +ckd's student.

{markdown}
""")
    logger.info("Wrote %s", out)
    return 0


def table(score: dict[str, dict[str, float]], rates: dict[str, float]) -> str:
    sets = [s for s in ("stsb/test", "sickr/test", "cisi/test") if any(s in v for v in score.values())]
    header = ["model", *sets, "train steps/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    plain = score["plain"]
    for label, got in score.items():
        cells = [f"{got[s]:.2f}" + (f" ({got[s] - plain[s]:+.2f})" if label in CONFIGS and label != "plain"
                                    else "") for s in sets]
        rate = f"{rates[label]:.2f}" if label in rates else ""
        lines.append("| " + " | ".join([label, *cells, rate]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
