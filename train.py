"""Train a student from a config: `python train.py CONFIG [key=value ...] [--resume]`.

Also under Accelerate: `accelerate launch train.py CONFIG ...` (any number of processes; the
config's batch sizes are global), with FSDP or DeepSpeed through `--config_file
configs/accelerate/fsdp.yaml` (or deepspeed-zero2.yaml, deepspeed-zero3.yaml). Overrides are
dotted and typed: `train.seed=1 stages.0.lr=3e-4`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mtd.config import parse_config_args
from mtd.errors import cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    cfg, args = parse_config_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mtd.training.pipeline import run  # after parsing: --help and config errors stay instant

    return cli_main("train", lambda: _report(cfg.name, run(cfg, resume=args.resume)))


def _report(name: str, run_dir) -> int:
    from mtd.evaluation.sts import format_table

    results = run_dir / "results.json"
    if results.is_file():
        rows = json.loads(results.read_text())
        sts_rows = [r for r in rows if "spearman" in r]
        if sts_rows:
            print(f"\n{name}: Spearman x100 (student export in {run_dir / 'final'})")
            print(format_table(sts_rows))
        for r in rows:
            if r.get("task") == "image-text":
                print(f"\n{name}: image-text recall x100 on {r['dataset']} ({r['images']} images, "
                      f"{r['captions']} captions)")
                print(" ".join(f"{k} {r[k]:.1f}" for k in sorted(r, key=_recall_order) if "@" in k))
    return 0


def _recall_order(key: str) -> tuple[str, int]:
    """i2t_R@1, i2t_R@5, i2t_R@10, t2i_R@1, ...: by direction, then by k as a number."""
    direction, _, k = key.partition("_R@")
    return direction, int(k) if k.isdigit() else 0


if __name__ == "__main__":
    sys.exit(main())
