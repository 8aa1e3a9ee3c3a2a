"""Seconds per AdamW step on a real student-sized model: the default (per-tensor) implementation
against the fused one that `mtd.training.trainer.make_optimizer` uses. Interleaved, medians.

    python bench/optimizer_step.py [--model models/all-MiniLM-L6-v2] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mtd  # noqa: F401  (torchvision shim before transformers loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="models/all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    params = list(AutoModel.from_pretrained(args.model).float().parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for fused in (False, True):
            opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
            opt.step()  # state allocation outside the timing
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[fused].append((time.perf_counter() - start) / args.steps)
    plain, fused = (statistics.median(times[k]) * 1000 for k in (False, True))
    n = sum(p.numel() for p in params) / 1e6
    print(f"{args.model} ({n:.1f}M parameters, {args.threads} threads): AdamW {plain:.1f} ms/step, "
          f"fused {fused:.1f} ms/step, {plain / fused:.1f}x")


if __name__ == "__main__":
    main()
