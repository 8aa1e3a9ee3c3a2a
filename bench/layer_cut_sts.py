"""STS of a teacher cut to some of its layers, before any training: where a student starts.

Mean pooling over the kept layers' output, no head, exactly how a teacher-initialised student
(student.init: teacher, student.layers: [...]) sees the text before stage 1.

    python bench/layer_cut_sts.py [--teacher models/all-MiniLM-L6-v2] [--cuts 0,2,4 0,3,5 all]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mtd.evaluation.sts import evaluate_sts, load_sts
from mtd.models.student import build_encoder, mean_pool, tokenize

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def pooled(encoder, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[i : i + batch_size], 128)
        out.append(mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    parser.add_argument("--sts", default=str(ROOT.parent / "shared/data/sts/stsb/test.jsonl"))
    parser.add_argument("--cuts", nargs="+", default=["0,2,4", "0,3,5", "0,1,3,5", "all"])
    args = parser.parse_args()
    data = load_sts(args.sts)
    results = {}
    for cut in args.cuts:
        layers = None if cut == "all" else [int(i) for i in cut.split(",")]
        encoder, tokenizer = build_encoder("teacher", args.teacher, layers, {})
        encoder.eval()
        score = evaluate_sts(lambda texts, e=encoder, t=tokenizer: pooled(e, t, texts), data, batch_size=None)
        results[cut] = round(score["spearman"], 2)
    print(json.dumps({"teacher": args.teacher, "sts": data.name, "spearman_x100": results}, indent=2))


if __name__ == "__main__":
    main()
