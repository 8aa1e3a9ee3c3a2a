"""Score sentence-transformers models on STS sets (Spearman x100 of cosine similarity).

    python eval.py MODEL_DIR [MODEL_DIR ...] [--data DIR] [--split test] [--batch-size 64]
                   [--out FILE.json]

MODEL_DIR: any sentence-transformers folder (a teacher, an mtd export) or an mtd run folder
(runs/NAME, whose final/ export is scored).

Prints a Markdown table (rows = models, columns = sets) and optionally writes the results as JSON.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mtd.io import atomic_write_json
from mtd.sts import (
    evaluate_sts,
    find_sts_sets,
    format_table,
    load_sts,
    st_encoder,
)

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "sts"

logger = logging.getLogger("eval")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="local model folder(s)")
    parser.add_argument(
        "--data", type=Path, default=None, help=f"STS data root (default: {DEFAULT_DATA})"
    )
    parser.add_argument("--split", default="test", help="file stem to look for (default: test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.data is None:
        if not DEFAULT_DATA.is_dir():
            parser.error(f"default data directory {DEFAULT_DATA} does not exist; pass --data DIR")
        args.data = DEFAULT_DATA
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    for i, model_dir in enumerate(args.models):
        if not Path(model_dir).is_dir():
            parser.error(f"model folder not found: {model_dir}")
        if (Path(model_dir) / "final" / "modules.json").is_file():  # an mtd run folder
            args.models[i] = str(Path(model_dir) / "final")

    try:
        sets = [load_sts(p) for p in find_sts_sets(args.data, args.split)]
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        parser.error(f"several files give the same set name(s) {dupes} under {args.data}")
    logger.info("sets: %s", ", ".join(f"{s.name} ({len(s)} pairs)" for s in sets))

    from sentence_transformers import SentenceTransformer  # slow import; after arg checks

    rows = []
    for model_dir in args.models:
        start = time.perf_counter()
        model = SentenceTransformer(str(model_dir), trust_remote_code=False)
        encode = st_encoder(model, batch_size=args.batch_size)
        for sts in sets:
            # batch_size=None: one encode call per set, so sentence-transformers batches and
            # length-sorts the whole set itself.
            result = evaluate_sts(encode, sts, batch_size=None)
            rows.append({"model": model_dir, "set": sts.name, **result})
        logger.info("%s done in %.1f s", model_dir, time.perf_counter() - start)
        del model

    print(format_table(rows))
    if args.out is not None:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
