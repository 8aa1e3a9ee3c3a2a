"""Training steps/s of the text pipeline, for a heads-only stage and an all-parameter stage of
CONFIG: as it was before (every batch tokenized in the DataLoader, random batches, the loss terms
read on the host every micro-step), then with only the loss reads gone, then with token ids
computed once for the corpus, then also in length-grouped batches (train.group_by_length).

Every variant runs the trainer's own StageRunner (same loop, optimizer, losses, logging) on the
config's corpus, student and stages, with random targets in place of the teachers' (speed does not
depend on their values, and no teacher runs). Runs are interleaved (A B C, C B A, ...) and compared
as ratios of medians, each run's first --warmup steps left out. Then one instrumented run per
variant splits a step into: data (waiting on the DataLoader), forward (the student), loss (the
objective's forward), backward, optimizer (clipping and AdamW); on a GPU each part is timed
between torch.cuda.synchronize() calls, which removes the overlap the plain runs have, so read the
shares as where the work is, and the plain runs' steps/s as the speed.

    python bench/train_throughput.py [CONFIG] [--batch 256] [--steps 50] [--device cuda]
        [--precision bf16] [--texts 20000] [--workers 0] [--repeats 3]

Prints a table and writes bench/results/train_throughput.json (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import mtd  # noqa: F401  (torchvision shim before transformers loads)

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data", "forward", "loss", "backward", "optimizer")
VARIANTS = {  # name: (token ids kept with the corpus, train.group_by_length, loss read every step,
    #                train.frozen_features: a heads-only stage trains on the frozen encoder's outputs)
    "before: per-batch tokenize, loss read every step": (False, False, True, False),
    "per-batch tokenize": (False, False, False, False),
    "token ids once": (True, False, False, False),
    "token ids once, length-grouped": (True, True, False, False),
    "frozen encoder features (heads-only stage)": (True, False, False, True),
}
OLD = "before: per-batch tokenize, loss read every step"


def collate_per_batch(dataset, indices, *, tokenizer, max_length):
    """The collate the trainer used before token ids were kept: tokenize every batch's texts."""
    from mtd.models.student import tokenize

    texts, target = dataset.collate(indices)
    return tokenize(tokenizer, texts, max_length), {"teacher": target}


class Clock:
    """Seconds per step part, only while `on`; with `sync`, the accelerator is waited for first."""

    def __init__(self, sync: bool):
        self.sync, self.on = sync, False
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(self, part: str, fn):
        def call(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = self.now()
            out = fn(*args, **kwargs)
            self.seconds[part] += self.now() - t0
            return out

        return call


class TimedObjective:
    """The stage's Objective, its calls timed as "loss"."""

    def __init__(self, objective, clock: Clock):
        self._objective, self._call = objective, clock.timed("loss", objective)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._objective, name)


def timed_runner_class():
    from mtd.training import trainer

    class TimedRunner(trainer.StageRunner):
        """StageRunner that notes the time after optimizer steps `warmup` and the last one, and
        with `breakdown` times the parts of every step after the warm-up. With `read_loss`, every
        micro-step reads its loss terms on the host, as the loop did before they stayed on the
        device (the values, and a non-finite check)."""

        def setup(self, warmup: int, breakdown: bool, sync: bool, read_loss: bool):
            self.warmup, self.breakdown, self.steps_done = warmup, breakdown, 0
            self.read_loss = read_loss
            self.clock, self.marks = Clock(sync), {}
            if breakdown:
                self.objective = TimedObjective(self.objective, self.clock)

        def _loader(self, *args):
            loader = super()._loader(*args)
            if not self.breakdown:
                return loader
            clock = self.clock

            def batches():
                it = iter(loader)
                while True:
                    item = clock.timed("data", next)(it, None)
                    if item is None:
                        return
                    yield item

            return batches()

        def _micro_step(self, *args):
            terms = super()._micro_step(*args)
            if self.read_loss:
                values = {k: float(v) for k, v in terms.items()}
                if not torch.isfinite(terms["loss"]):
                    raise RuntimeError(f"non-finite loss: {values}")
            return terms

        def _optimizer_step(self, model, optimizer, scheduler):
            self.clock.timed("optimizer", super()._optimizer_step)(model, optimizer, scheduler)
            self.steps_done += 1
            if self.steps_done in (self.warmup, self.total):
                self.marks[self.steps_done] = self.clock.now()
                self.clock.on = self.steps_done == self.warmup

        def timed_run(self):
            with ExitStack() as stack:
                if self.breakdown:
                    stack.enter_context(mock.patch.object(
                        trainer, "_forward_global", self.clock.timed("forward", trainer._forward_global)))
                    stack.enter_context(mock.patch.object(
                        self.acc, "backward", self.clock.timed("backward", self.acc.backward)))
                self.run(0, None, None)
            return self.marks[self.total] - self.marks[self.warmup]

    return TimedRunner


def build(args):
    from mtd.config import load_config
    from mtd.data.corpus import TargetDataset
    from mtd.training.pipeline import build_student, corpus_stage_data, load_corpus
    from mtd.training.trainer import StageData

    cfg = load_config(args.config, overrides=[f"data.max_texts={args.texts}", "data.dev_size=0"])
    corpus = load_corpus(cfg)
    rng = np.random.default_rng(0)
    target = rng.standard_normal((len(corpus.train), args.target_dim)).astype(np.float16)
    arrays, weights = [target], [1.0]
    _, tokenizer = build_student(cfg, args.target_dim)
    t0 = time.perf_counter()
    kept = corpus_stage_data(corpus, arrays, weights, tokenizer, cfg.student.max_length, progress=False)
    tokenize_s = time.perf_counter() - t0
    per_batch = StageData(TargetDataset(corpus.train, arrays, weights), None,
                          partial(collate_per_batch, tokenizer=tokenizer, max_length=cfg.student.max_length))
    stages = {"heads": dataclasses.replace(cfg.stages[0], train="heads"),
              "all": dataclasses.replace(cfg.stages[-1], train="all")}
    return cfg, {False: per_batch, True: kept}, stages, tokenize_s


def one_run(acc, cfg, data, stage, variant: tuple, args, breakdown: bool, work: Path):
    """(seconds of the timed steps, {part: seconds}); the frozen features of a heads-only stage
    are computed before the timed steps (once per stage: see the table's note)."""
    from accelerate.utils import set_seed

    from mtd.training.pipeline import build_student, text_stage_data
    from mtd.training.trainer import PreparedStudent

    _, group, read_loss, frozen = variant
    tcfg = dataclasses.replace(cfg.train, group_by_length=group, num_workers=args.workers, eval_every=0,
                               save_every=10**9, max_steps_per_job=None, report_to=None, grad_accum=1,
                               mixed_precision=args.precision, frozen_features=frozen)
    stage = dataclasses.replace(stage, steps=args.warmup + args.steps, epochs=None, batch_size=args.batch)
    set_seed(cfg.train.seed)
    student, tokenizer = build_student(cfg, args.target_dim)
    run_cfg = dataclasses.replace(cfg, train=tcfg, stages=[stage])
    make_data = partial(text_stage_data, run_cfg, 0, data, tokenizer, acc)
    with tempfile.TemporaryDirectory(dir=work) as run_dir:
        runner = timed_runner_class()(acc, PreparedStudent(acc, student), stage, 0, tcfg, make_data,
                                      len(data.train), Path(run_dir), {})
        runner.setup(args.warmup, breakdown, sync=acc.device.type == "cuda", read_loss=read_loss)
        seconds = runner.timed_run()
    return seconds, runner.clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps per run before timing (>= 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--target-dim", type=int, default=1152,
                        help="(the default config's teachers: 384 + 768)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None,
                        help="train.mixed_precision (default: bf16 on cuda, no on cpu)")
    parser.add_argument("--workers", type=int, default=0, help="train.num_workers")
    parser.add_argument("--stages", default="heads,all", help="which of: heads (the config's first "
                        "stage, heads only), all (its last stage, every parameter)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(ROOT / "bench/results/train_throughput.json"))
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "no")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from mtd.data.corpus import LengthGroupedSampler, StepBatchSampler, padding_share
    from mtd.io import atomic_write_text
    from mtd.training.trainer import make_accelerator

    cfg, data, stages, tokenize_s = build(args)
    stages = {s: stages[s] for s in args.stages.split(",")}
    lengths = data[True].lengths
    n = len(lengths)
    padding = {name: padding_share(cls(n, args.batch, cfg.train.seed, 0, 10**9,
                                       **({"lengths": lengths} if cls is LengthGroupedSampler else {})),
                                   lengths)
               for name, cls in (("random", StepBatchSampler), ("grouped", LengthGroupedSampler))}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        acc = make_accelerator(dataclasses.replace(cfg.train, mixed_precision=args.precision), work)
        seconds = {(s, v): [] for s in stages for v in VARIANTS}
        for r in range(args.repeats):
            for s, stage in stages.items():
                order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
                for v in order:
                    secs, _ = one_run(acc, cfg, data[VARIANTS[v][0]], stage, VARIANTS[v], args, False, work)
                    seconds[(s, v)].append(secs)
                    print(f"repeat {r + 1}, {s}, {v}: {args.steps / secs:.2f} steps/s", flush=True)
        parts, data_ms = {}, {}  # shares of a step; milliseconds a step waits on the loader
        for s, stage in stages.items():
            for v, variant in VARIANTS.items():
                secs, split = one_run(acc, cfg, data[variant[0]], stage, variant, args, True, work)
                parts[(s, v)] = {p: split[p] / secs for p in PARTS}
                parts[(s, v)]["other"] = 1 - sum(split.values()) / secs
                data_ms[(s, v)] = 1000 * split["data"] / args.steps

    rows = []
    for (s, v), secs in seconds.items():
        median = statistics.median(secs)
        old = statistics.median(seconds[(s, OLD)])
        rows.append({"stage": s, "pipeline": v, "seconds": secs, "steps_per_s": args.steps / median,
                     "ratio_to_before": old / median, "shares": parts[(s, v)],
                     "data_ms_per_step": data_ms[(s, v)]})
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"\n{args.device} ({machine}, {args.threads} threads), batch {args.batch}, {args.precision}, "
          f"{args.steps} timed steps x {args.repeats} repeats, {n} texts")
    print(f"padding: {100 * padding['random']:.1f}% of tokens in random batches, "
          f"{100 * padding['grouped']:.1f}% length-grouped; token ids of all texts in {tokenize_s:.2f} s\n")
    print("| stage | pipeline | steps/s | x before | data ms/step | "
          + " | ".join(f"{p} %" for p in (*PARTS, "other")) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * (len(PARTS) + 1))
    for r in rows:
        shares = " | ".join(f"{100 * r['shares'][p]:.0f}" for p in (*PARTS, "other"))
        print(f"| {r['stage']} | {r['pipeline']} | {r['steps_per_s']:.2f} | {r['ratio_to_before']:.2f} | "
              f"{r['data_ms_per_step']:.1f} | {shares} |")
    result = {"config": os.path.relpath(args.config, ROOT), "device": args.device, "machine": machine,
              "precision": args.precision, "threads": args.threads, "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "texts": n,
              "workers": args.workers, "padding_share": padding, "tokenize_all_seconds": tokenize_s,
              "rows": rows, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
