"""Score embedding models: STS, FAISS retrieval, image-text retrieval, speed.

    python eval.py MODEL [MODEL ...] [--tasks sts,retrieval,image-text,speed] [--data DIR]
                   [--hub TASK:NAME ...] [--reference LABEL] [--dims heads|64,128]
                   [--index flat|hnsw|ivfpq] [--out FILE]

MODEL: a sentence-transformers folder, an mtd run (runs/NAME, its final/ export), RUN:HEAD,
LABEL=MODEL (names it; later MODELs may use the label), A+B (each normalized, concatenated,
normalized again: the multi-teacher target), MODEL@DIM (a Matryoshka prefix), or PATH#onnx /
PATH#int8 (the folder's Transformer run by onnxruntime from onnx/model.onnx or
onnx/model_qint8_avx512_vnni.onnx, written by `python -m mtd.onnx FOLDER`). Examples:

    python eval.py minilm=models/all-MiniLM-L6-v2 mpnet=models/all-mpnet-base-v2 minilm+mpnet \\
        student=runs/default --reference minilm+mpnet
    python eval.py student=runs/default/final student8=runs/default/final#int8 --tasks sts,speed

Data (--data, default ../shared/data) is found by layout: STS files (sentence1, sentence2, score),
BEIR folders (corpus.jsonl, queries.jsonl, qrels/), image-caption files (image, captions).
--hub TASK:NAME (repeatable; TASK sts or retrieval) adds a Hugging Face hub data set in MTEB's
layout (STS: columns sentence1, sentence2, score; retrieval: configs corpus, queries and default =
qrels), e.g. --hub sts:mteb/stsbenchmark-sts --hub retrieval:mteb/scifact; NAME may also be a
local folder laid out like a hub repo. Needs `pip install datasets`. With only --hub, a missing
default data folder is not an error.
Prints a Markdown table (main metric per data set, retention vs --reference) and writes every
number with the settings that produced it to --out (JSON).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"

logger = logging.getLogger("eval")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mtd.evaluation.suite import TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"data root (default: {DEFAULT_DATA}; skipped with --hub if missing)")
    parser.add_argument("--hub", action="append", default=[], type=_hub_spec, metavar="TASK:NAME",
                        help="hub data set to score too, e.g. sts:mteb/stsbenchmark-sts or "
                             "retrieval:mteb/scifact (repeatable)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--reference", default=None, help="label of the model retention is measured against")
    parser.add_argument("--dims", default=None,
                        help="'heads' (every head of mtd runs) and/or Matryoshka prefixes, e.g. heads,128")
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"],
                        help="FAISS index for retrieval; approximate ones also report recall vs exact")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--speed-texts", type=int, default=1000, help="texts in the speed set")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="corpus vector cache")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    off = [f"{task}:{name}" for task, name in args.hub if task not in args.tasks]
    if off:
        parser.error(f"--hub {' '.join(off)}: its task is not in --tasks {','.join(args.tasks)}")
    args.dims = [_dim(p.strip(), parser) for p in (args.dims or "").split(",") if p.strip()]
    if args.data is None and (DEFAULT_DATA.exists() or not args.hub):
        args.data = DEFAULT_DATA  # a missing default is only an error when there is nothing else
    return args


def _dim(part: str, parser: argparse.ArgumentParser) -> str | int:
    """One --dims entry: "heads" or a positive prefix size."""
    if part == "heads":
        return part
    if not part.isdigit() or int(part) < 1:
        parser.error(f"--dims: {part!r} is neither 'heads' nor a positive number of dimensions")
    return int(part)


def _hub_spec(text: str) -> tuple[str, str]:
    """'TASK:NAME' -> (task, name), TASK one of mtd.evaluation.suite.HUB_TASKS."""
    from mtd.evaluation.suite import HUB_TASKS

    task, sep, name = text.partition(":")
    if not sep or task not in HUB_TASKS or not name.strip():
        raise argparse.ArgumentTypeError(
            f"expected TASK:NAME with TASK one of {', '.join(HUB_TASKS)}, e.g. retrieval:mteb/scifact; "
            f"got {text!r}")
    return task, name.strip()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mtd.errors import cli_main

    return cli_main("eval", lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    """Everything that can be checked is checked before the first model is scored: the --out
    file, the models' weights, the data; a failed final write saves the results elsewhere."""
    from mtd.evaluation.specs import PrefixEncoder, check_weights
    from mtd.evaluation.suite import evaluate_all, retention_table
    from mtd.io import check_writable, write_json_or_fallback

    if args.out is not None:
        check_writable(args.out, "--out")
    base, models = _models(args)
    check_weights(models)
    # A prefix costs what its model costs: time each real model once.
    timed = [label for label, m in base.items() if not isinstance(m, PrefixEncoder)]
    rows = evaluate_all(models, data=args.data, tasks=args.tasks, split=args.split,
                        batch_size=args.batch_size, index=args.index, cache_dir=args.cache_dir,
                        speed=(tuple(args.models), timed, args.speed_texts), hub=args.hub)
    print(retention_table(rows, args.reference))
    if args.out is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        settings["hub"] = [f"{task}:{name}" for task, name in args.hub]
        fingerprints = {label: m.fingerprint for label, m in models.items()}
        write_json_or_fallback(args.out, {"settings": settings, "models": fingerprints, "results": rows},
                               "results")
        logger.info("Wrote %d results to %s", len(rows), args.out)
    return 0


def _models(args: argparse.Namespace) -> tuple[dict, dict]:
    """(the models named, those plus --dims variants), each {label: encoder}."""
    from mtd.evaluation.specs import ModelSpecError, parse_models, student_heads, with_prefixes

    base = parse_models(args.models)
    models = dict(base)
    for part in args.dims:
        models = student_heads(models) if part == "heads" else with_prefixes(models, [part])
    if args.reference is not None and args.reference not in models:
        raise ModelSpecError(f"--reference {args.reference!r} is not one of the models {list(models)}; "
                             "give one of their labels.")
    return base, models


if __name__ == "__main__":
    sys.exit(main())
