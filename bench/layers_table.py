"""Fewer layers, in the shape of seed 001's table: a teacher cut to N layers and distilled back.

    python bench/layers_table.py [--teacher models/all-mpnet-base-v2] [--layers 6,4,3,2,1]
                                 [--cpu | key=value ...]

For each N, `python -m mtd.layers TEACHER --keep N` (N layers spread from the first to the last)
trains a student with the default recipe, the teacher alone as target; a finished run is reused.
Reported per N: STS-B test Spearman x100 of the cut before training (start) and of the distilled
student (final/), the change against the full teacher, sentences/s on this machine (batch 64,
each model in a fresh process, `--threads` torch threads) and the speed ratio to the teacher.
`--cpu` shortens the recipe to what 2 CPU cores train in minutes (CPU_OVERRIDES below: fewer
texts and steps; the table says so); without it, the default recipe runs as is (GPU scale).
Writes bench/results/layers.json and the "Layers" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
from functools import partial
from pathlib import Path

from layer_cut_sts import pooled
from peers import write_section

import mtd  # noqa: F401  (compat shims before transformers)
from mtd.evaluation.specs import load_encoder, parse_models
from mtd.evaluation.sts import evaluate_sts, load_sts
from mtd.evaluation.suite import speed_rows
from mtd.io import atomic_write_json
from mtd.layers import main as layers_main
from mtd.layers import spread, teacher_layers

ROOT = Path(__file__).resolve().parents[1]
CPU_OVERRIDES = ["data.max_texts=2000", "data.dev_size=100", "stages.0.steps=100", "stages.1.steps=100",
                 "stages.2.steps=100", "eval.teachers=false", "train.eval_every=0", "train.save_every=100"]
logger = logging.getLogger("layers_table")


def start_sts(teacher: str, keep: list[int], sts) -> float:
    """STS-B of the teacher cut to `keep`, untrained: mean pooling over the kept layers, no head."""
    from mtd.models.student import build_encoder

    encoder, tokenizer = build_encoder("teacher", teacher, keep, {})
    encoder.eval()
    return evaluate_sts(lambda texts: pooled(encoder, tokenizer, texts), sts, batch_size=None)["spearman"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--teacher", default="models/all-mpnet-base-v2")
    parser.add_argument("--layers", default="6,4,3,2,1")
    parser.add_argument("--cpu", action="store_true", help="the shortened CPU recipe (CPU_OVERRIDES)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-texts", type=int, default=1000)
    parser.add_argument("--sts", type=Path, default=ROOT.parent / "shared/data/sts/stsb/test.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "layers.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of every run, e.g. stages.2.steps=100")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sts_path, out, docs = (p.resolve() for p in (args.sts, args.out, args.docs))
    os.chdir(ROOT)
    overrides = (CPU_OVERRIDES if args.cpu else []) + args.overrides
    total = teacher_layers(args.teacher)
    sts = load_sts(sts_path)
    tag = Path(args.teacher).name
    specs, rows = [f"teacher={args.teacher}"], []
    for n in [int(v) for v in args.layers.split(",")]:
        keep = spread(n, total)
        name = f"layers-{tag}-{n}"
        if not (ROOT / "runs" / name / "final" / "modules.json").is_file():
            extra = ["stages.1.train=last:1"] if n < 2 else []  # the recipe's last:2 needs 2 layers
            code = layers_main([args.teacher, "--keep", str(n), "--name", name, *overrides, *extra])
            if code:
                return code
        specs.append(f"L{n}=runs/{name}")
        rows.append({"layers": n, "keep": keep, "run": f"runs/{name}",
                     "start": start_sts(args.teacher, keep, sts)})
    models = parse_models(specs)
    scores = {label: evaluate_sts(lambda t, m=m: m.encode(t), sts)["spearman"] for label, m in models.items()}
    loaders = {label: partial(load_encoder, tuple(specs), label) for label in models}
    timed = speed_rows(loaders, args.speed_texts, 64, threads=args.threads)
    speed = {r["model"]: r["sentences_per_s"] for r in timed}
    base = scores["teacher"]
    lines = ["| layers | kept | STS-B start | STS-B distilled | change vs teacher | sentences/s | speed x |",
             "|---:|---|---:|---:|---:|---:|---:|",
             f"| teacher: {total} | all | {base:.2f} | {base:.2f} | - | {speed['teacher']:.1f} | 1.00 |"]
    for r in rows:
        label = f"L{r['layers']}"
        r.update(sts=scores[label], change_pct=100 * (scores[label] - base) / base,
                 sentences_per_s=speed[label], speed_x=speed[label] / speed["teacher"])
        lines.append(f"| {r['layers']} | {r['keep']} | {r['start']:.2f} | {r['sts']:.2f} | "
                     f"{r['change_pct']:+.1f}% | {r['sentences_per_s']:.1f} | {r['speed_x']:.2f} |")
    markdown = "\n".join(lines)
    print(markdown)
    atomic_write_json(out, {"date": str(datetime.date.today()), "teacher": args.teacher,
                            "teacher_sts": base, "teacher_sentences_per_s": speed["teacher"],
                            "overrides": overrides,
                            "threads": args.threads, "rows": rows, "table": markdown})
    command = shlex.join(["python", "bench/layers_table.py", *(argv if argv is not None else sys.argv[1:])])
    scale = (f"CPU scale: the default recipe shortened to `{' '.join(overrides)}`, so the students "
             "have barely trained; at GPU scale run it without `--cpu`." if args.cpu else
             f"The default recipe{' with ' + ' '.join(overrides) if overrides else ''}.")
    scale += " One kept layer trains stage 2 as last:1 (the recipe's last:2 needs two)."
    section = f"""`bench/layers_table.py`, measured {datetime.date.today()} on {os.cpu_count()} CPU cores
({args.threads} torch threads for the speed column, batch 64, {args.speed_texts} WordNet texts, each
model in a fresh process). To rerun: `{command}`. {args.teacher} cut to N layers spread from the first
to the last (`python -m mtd.layers`), the teacher alone as target. {scale} STS-B test, Spearman x100.

{markdown}
"""
    write_section(docs, "Layers", section)
    logger.info("Wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
