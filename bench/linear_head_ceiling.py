"""How well can a linear head on the frozen start features do? The ceiling of Jasper stage 1.

Stage 1 trains only fc1, a linear map from the student's pooled features (frozen, as the untrained
student computes them) to the multi-teacher target. This script fits that map in closed form
(ridge least squares with a bias, on the config's training texts and their cached targets) and
scores on STS: the raw features (the untrained start), and the fitted head for each ridge weight.
A stage 1 that ends far below the fitted head is undertrained; a fitted head below the raw
features means the target, learned linearly on this corpus, costs STS quality by itself.

    python bench/linear_head_ceiling.py [CONFIG] [overrides ...] [--sts FILE ...] [--ridge 1e-3 1e-1 10]

Needs the config's target caches (a run of the config, or `python -m mtd.cache CONFIG`, fills
them). Prints JSON and writes bench/results/linear_head_ceiling.json (--out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import mtd  # noqa: F401  (torchvision shim before transformers loads)

ROOT = Path(__file__).resolve().parents[1]
STS = [ROOT.parent / "shared/data/sts/stsb/test.jsonl", ROOT.parent / "shared/data/sts/sickr/test.jsonl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for train.py")
    parser.add_argument("--sts", nargs="+", default=[str(p) for p in STS])
    parser.add_argument("--ridge", nargs="+", type=float, default=[1e-3, 1e-1, 10.0])
    parser.add_argument("--out", default=str(ROOT / "bench/results/linear_head_ceiling.json"))
    args = parser.parse_args()

    from mtd.config import load_config
    from mtd.data.corpus import multi_teacher_target
    from mtd.evaluation.sts import evaluate_sts, load_sts
    from mtd.io import atomic_write_text
    from mtd.models.student import pooled_features
    from mtd.targets.cache import cached_targets
    from mtd.training.pipeline import build_student, load_corpus

    cfg = load_config(args.config, args.overrides)
    corpus = load_corpus(cfg)
    arrays = cached_targets(cfg.teachers, corpus.texts, cfg.cache_dir, chunk_size=cfg.cache_chunk_size)
    n = len(corpus.train)
    target = multi_teacher_target([a[:n] for a in arrays], [t.weight for t in cfg.teachers]).numpy()
    torch.manual_seed(cfg.train.seed)
    student, tokenizer = build_student(cfg, target.shape[1])
    length = cfg.student.max_length

    seen: dict[tuple[str, ...], np.ndarray] = {}

    def features(texts: list[str]) -> np.ndarray:  # the frozen start: each text list encoded once
        key = tuple(texts)
        if key not in seen:
            seen[key] = pooled_features(student, tokenizer, texts, length, progress=False)
        return seen[key]

    def with_bias(x: np.ndarray) -> np.ndarray:
        return np.hstack([x, np.ones((len(x), 1), np.float32)]).astype(np.float64)

    t0 = time.perf_counter()
    x = with_bias(features(corpus.train))
    sets = [load_sts(p) for p in args.sts]
    scores = {"raw features (untrained start)": {s.name: evaluate_sts(features, s, None)["spearman"]
                                                 for s in sets}}
    gram, moment = x.T @ x, x.T @ target
    for ridge in args.ridge:
        w = np.linalg.solve(gram + ridge * np.eye(len(gram)), moment)

        def head(texts: list[str], w=w) -> np.ndarray:
            return (with_bias(features(texts)) @ w).astype(np.float32)

        scores[f"least-squares fc1, ridge {ridge:g}"] = {s.name: evaluate_sts(head, s, None)["spearman"]
                                                         for s in sets}
    result = {"config": args.config, "overrides": args.overrides, "train_texts": n,
              "target_dim": int(target.shape[1]), "spearman_x100": scores,
              "seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(result, indent=1)
    atomic_write_text(Path(args.out), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
