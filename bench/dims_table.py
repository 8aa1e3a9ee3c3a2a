"""Smaller vectors on one student: learned heads, self-distilled heads, Matryoshka prefixes, PCA.

    python train.py configs/dims.yaml            # the student (about 20 minutes on 2 CPU cores)
    python bench/dims_table.py [--run runs/dims] [--dims 64,128,256,512]

For each size k the run's student gives four vectors of k dims:
    learned   head fc{k}, trained on the teachers' target with sim + resim (Jasper stage 3)
    self      head sd{k}, the same terms against the student's own fc1 vectors (self-distillation)
    prefix    the first k dims of fc1, renormalized (trained as Matryoshka prefixes in stage 3)
    pca       PCA of fc1's vectors of the run's training texts to k dims, renormalized
and fc1 itself is the full size. Each is scored on STS-B and SICK-R test (Spearman x100) and CISI
(nDCG@10 x100) with eval.py's code; the table says what share of fc1's score each keeps.
Writes bench/results/dims.json (every number and its settings) and the "Dimensions" section of
docs/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path

from peers import add_result_args, write_section

import mtd  # noqa: F401  (compat shims before transformers)
from mtd.config import load_config
from mtd.evaluation.specs import ProjectedEncoder, cached_encode, parse_models
from mtd.evaluation.suite import MAIN_METRIC, evaluate_all
from mtd.io import atomic_write_json, read_json
from mtd.training.pipeline import load_corpus

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"learned": "fc{k}", "self": "sd{k}", "prefix": "fc1@{k}", "pca": None}
logger = logging.getLogger("dims_table")


def models_for(run: Path, dims: list[int], cache_dir: Path) -> tuple[dict, dict[tuple[str, int], str]]:
    """{label: encoder} to score, and (method, k) -> label; heads the run lacks are skipped."""
    meta = read_json(run / "student" / "student.json")
    heads, prefixes = meta["heads"], meta.get("matryoshka", {}).get("fc1", [])
    specs, cells = [f"full={run}:fc1"], {("full", heads["fc1"]): "full"}
    for k in dims:
        for method, head in METHODS.items():
            if method == "pca":
                continue
            name = head.format(k=k)
            if (method == "prefix" and k in prefixes) or name in heads:
                label = f"{method}{k}"
                specs.append(f"{label}={run}:{name}")
                cells[(method, k)] = label
    models = parse_models(specs)
    texts = load_corpus(load_config(run / "config.yaml")).train
    vectors = cached_encode(models["full"], texts, "document", cache_dir)
    for k in dims:
        label = f"pca{k}"
        models[label] = ProjectedEncoder.pca(label, models["full"], vectors, k)
        cells[("pca", k)] = label
    return models, cells


def table(rows: list[dict], cells: dict[tuple[str, int], str], dims: list[int]) -> tuple[str, dict]:
    """Markdown (rows: dims; columns: method x data set, then % of full) and {label: {set: score}}."""
    score: dict[str, dict[str, float]] = {}
    for r in rows:
        score.setdefault(r["model"], {})[r["dataset"]] = r[MAIN_METRIC[r["task"]]]  # already x100
    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    full = score["full"]
    header = ["dims", "method", *sets, "% of full (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|" + "---:|" * (len(header) - 2)]
    full_dim = next(k for (m, k) in cells if m == "full")
    for k in [*dims, full_dim]:
        for method in ("learned", "self", "prefix", "pca", "full"):
            label = cells.get((method, k))
            if label is None:
                continue
            got = score[label]
            keep = sum(100 * got[s] / full[s] for s in sets) / len(sets)
            lines.append("| " + " | ".join([str(k), method, *(f"{got[s]:.2f}" for s in sets),
                                            f"{keep:.1f}"]) + " |")
    return "\n".join(lines), score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "dims")
    parser.add_argument("--dims", default="64,128,256,512")
    add_result_args(parser, "dims")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run, data, cache, out, docs = (p.resolve() for p in (args.run, args.data, args.cache_dir, args.out,
                                                           args.docs))
    os.chdir(ROOT)  # the run's config names its corpus relative to the project root
    dims = [int(d) for d in args.dims.split(",")]
    models, cells = models_for(run, dims, cache)
    rows = evaluate_all(models, data=data, tasks=("sts", "retrieval"), split="test", batch_size=64,
                        index="flat", cache_dir=cache, speed=None)
    markdown, score = table(rows, cells, dims)
    print(markdown)
    atomic_write_json(out, {"date": str(datetime.date.today()), "run": str(run), "dims": dims,
                            "models": {label: m.fingerprint for label, m in models.items()},
                            "cells": {f"{m}{k}": label for (m, k), label in cells.items()},
                            "scores": score, "results": rows, "table": markdown})
    section = f"""`bench/dims_table.py`, measured {datetime.date.today()} on {os.cpu_count()} CPU cores. To
rerun: `python train.py configs/dims.yaml`, then `python bench/dims_table.py` (numbers and settings
in `bench/results/dims.json`). One student ({run.name}: the default recipe with, in stage 3, learned
heads fcK on the teachers' target, self-distilled heads sdK on its own fc1 vectors, and fc1's
first K dims trained as Matryoshka prefixes); PCA is fitted on fc1's vectors of the run's training
texts. Scores: Spearman x100 (STS), nDCG@10 x100 (CISI); the last column is the mean share of the
full fc1's scores.

{markdown}
"""
    write_section(docs, "Dimensions", section)
    logger.info("Wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
