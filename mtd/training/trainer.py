"""The training loop: stages of the Jasper recipe on Accelerate. The one module that knows it.

A run directory holds:
    config.yaml        the resolved config
    log.jsonl          one row per logging step (every loss term, lr) and per dev evaluation
    checkpoints/       S-NAME-stepK/ (Accelerate state: model, optimizer, scheduler, RNG) and
                       S-NAME-end/ (student weights) for stage index S named NAME; a checkpoint
                       counts once its state.json exists
    student/           the trained student in mtd's format (see student.save_student)

Resuming reloads the newest checkpoint and replays the same data order (StepBatchSampler is a pure
function of the step), optimizer, scheduler and RNG state, so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mtd.config import ConfigError, StageConfig, TrainConfig
from mtd.data.corpus import StepBatchSampler, TargetDataset
from mtd.errors import MtdError
from mtd.io import append_jsonl, atomic_write_json, atomic_write_text, read_json
from mtd.losses.objective import Objective
from mtd.models.student import Student, set_train_mode, set_trainable, tokenize
from mtd.training.distributed import gather_with_grad, world_size

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


class NonFiniteLossError(MtdError, RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` optimizer steps into stage `stage` (done: stage finished)."""

    stage: int = 0
    step: int = 0
    done: bool = False
    name: str = ""  # the stage's name, for folder names and messages

    def key(self) -> tuple[int, float]:
        return (self.stage, math.inf if self.done else self.step)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(run_dir: Path) -> list[tuple[Path, Position]]:
    """Finished checkpoints (those with a state.json), oldest position first."""
    found = [(d, Position(**read_json(d / STATE_FILE)))
             for d in (run_dir / "checkpoints").glob("*") if (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda x: x[1].key())


def latest_checkpoint(run_dir: Path) -> tuple[Path, Position] | None:
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def _save_mid_stage(accelerator: Accelerator, run_dir: Path, pos: Position, keep: int) -> Path:
    ckpt = run_dir / "checkpoints" / f"{pos.stage}-{pos.name}-step{pos.step:07d}"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()  # every rank's files (its RNG state) are in before it counts
    if accelerator.is_main_process:
        atomic_write_json(ckpt / STATE_FILE, pos.__dict__)  # written last: marks it complete
        mids = [d for d, p in _checkpoints(run_dir) if not p.done]
        for old in mids[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def _save_stage_end(accelerator: Accelerator, model, run_dir: Path, pos: Position) -> Path:
    ckpt = run_dir / "checkpoints" / f"{pos.stage}-{pos.name}-end"
    state = accelerator.get_state_dict(model)  # full weights even when sharded (FSDP/DeepSpeed)
    if accelerator.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(ckpt / "model.safetensors"))
        atomic_write_json(ckpt / STATE_FILE, pos.__dict__)
    accelerator.wait_for_everyone()
    return ckpt


def _truncate_log(log_path: Path, pos: Position) -> None:
    """Drop log rows written after the checkpoint we resume from; they will be written again."""
    if not log_path.is_file():
        return
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if (r["stage"], r["step"]) <= pos.key()]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------------------------------
# One stage


def stage_steps(stage: StageConfig, n_train: int, grad_accum: int) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.epochs * (n_train // stage.batch_size) / grad_accum))


def collate_texts(dataset: TargetDataset, indices: list[int], *, tokenizer, max_length: int):
    """Corpus rows -> ({input_ids, attention_mask}, {"teacher": (B, D_target)})."""
    texts, target = dataset.collate(indices)
    return tokenize(tokenizer, texts, max_length), {"teacher": target}


@dataclass
class StageData:
    """What a stage trains on: its datasets and how a list of rows becomes (inputs, targets).

    collate(dataset, rows) -> ({model input: tensor}, {target source: (B, D)}); `sampler` orders
    the rows (a pure function of the step, so resuming replays the same batches).
    """

    train: Any
    dev: Any | None
    collate: Callable
    sampler: type[StepBatchSampler] = StepBatchSampler


def _forward_global(model, inputs, targets, heads: set[str], device):
    """Student outputs and targets of the global batch: local rows gathered from every process."""
    outputs = model(**{k: v.to(device, non_blocking=True) for k, v in inputs.items()})
    # Sorted: a set iterates in per-process hash order, and collectives must match across ranks.
    outputs = {h: gather_with_grad(outputs[h].float()) for h in sorted(heads)}
    return outputs, {k: gather_with_grad(targets[k].to(device)) for k in sorted(targets)}


class _TermMeans:
    """Running mean of every loss term over the optimizer steps since the last log row.

    Counts its own steps: right after a resume or at a job's stop a row covers fewer than
    train.log_every steps.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, terms: dict[str, float], scale: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * scale

    def pop(self) -> dict[str, float]:
        row = {k: v / self.steps for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return row


class StageRunner:
    """Trains one stage from `start` to its end (or to the job's step budget)."""

    def __init__(self, accelerator, student: Student, stage: StageConfig, index: int,
                 tcfg: TrainConfig, data: Callable[[Student], StageData], n_train: int, run_dir: Path):
        """data(student) builds the stage's data once the student holds this stage's start weights
        (image stages read the frozen text side's caption vectors from it); n_train: its rows."""
        self.acc, self.student, self.run_dir = accelerator, student, run_dir
        self.stage, self.index, self.tcfg = stage, index, tcfg
        self.make_data, self.data = data, None
        self.objective = Objective.from_stage(stage)
        self.total = stage_steps(stage, n_train, tcfg.grad_accum)

    def _loader(self, start: int, stop: int, seed: int, batch: int):
        dataset = self.data.train
        sampler = self.data.sampler(len(dataset), batch, seed, start, stop,
                                    self.acc.process_index, self.acc.num_processes)
        # Its own generator: iterating a DataLoader draws a base seed, which from the global RNG
        # would shift the dropout stream of a resumed run (restored RNG state, then one more draw).
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        workers = self.tcfg.num_workers
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=partial(self.data.collate, dataset),
            num_workers=workers, generator=generator, pin_memory=self.acc.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if workers else None)

    def _prepare(self):
        trainable = set_trainable(self.student, self.stage.train, list(self.stage.heads))
        logger.info("Stage %s: training %d parameter tensors (%s) for %d steps.",
                    self.stage.name, len(trainable), self.stage.train, self.total)
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.stage.lr, weight_decay=self.stage.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(self.stage.warmup_ratio * self.total), self.total)
        self.acc.free_memory()  # forget the previous stage's wrapped model and optimizer
        return self.acc.prepare(self.student, optimizer, scheduler)

    def run(self, start: int, resume_from: Path | None, step_budget: int | None) -> Position:
        set_seed(self.tcfg.seed + self.index)  # a stage starts the same whether resumed or not
        model, optimizer, scheduler = self._prepare()
        if resume_from is not None:
            self.acc.load_state(str(resume_from))
            logger.info("Resumed stage %s at step %d from %s", self.stage.name, start, resume_from)
        self.data = self.make_data(self.acc.unwrap_model(model))
        stop = self.total if step_budget is None else min(self.total, start + step_budget)
        accum = self.tcfg.grad_accum
        loader = self._loader(start * accum, stop * accum, self.tcfg.seed + 7919 * self.index,
                              self.stage.batch_size)
        bar = tqdm(total=self.total, initial=start, desc=f"stage {self.stage.name}",
                   disable=not self.acc.is_local_main_process)
        means = _TermMeans()
        step, micro = start, 0
        self._train_mode(model)
        for batch, target in loader:
            terms = self._micro_step(model, batch, target, step, micro)
            means.add(terms, 1 / accum)
            micro += 1
            if micro < accum:
                continue
            self._optimizer_step(model, optimizer, scheduler)
            step, micro = step + 1, 0
            means.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            self._after_step(model, step, means, scheduler, stop)
        bar.close()
        end = Position(self.index, step, done=step >= self.total, name=self.stage.name)
        if end.done:
            _save_stage_end(self.acc, model, self.run_dir, end)
        return end

    def _train_mode(self, model) -> None:
        model.train()  # the wrapper too (DDP reads its own flag)
        set_train_mode(self.acc.unwrap_model(model), self.stage.train)

    def _micro_step(self, model, batch, target, step: int, micro: int) -> dict[str, float]:
        sync = micro == self.tcfg.grad_accum - 1
        generator = torch.Generator(device=self.acc.device).manual_seed(
            (self.tcfg.seed * 1_000_003 + step) * 64 + micro)  # same pair samples on all ranks
        # The prepared model's forward runs under autocast already; the objective turns it off.
        with nullcontext() if sync else self.acc.no_sync(model):
            outputs, target = _forward_global(model, batch, target, self.objective.heads_used,
                                              self.acc.device)
            terms = self.objective(outputs, target, generator=generator)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                self._non_finite(step, terms)
            self.acc.backward(loss / self.tcfg.grad_accum)
        return {k: float(v.detach()) for k, v in terms.items()}

    def _optimizer_step(self, model, optimizer, scheduler) -> None:
        if self.tcfg.max_grad_norm is not None:
            self.acc.clip_grad_norm_(model.parameters(), self.tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _after_step(self, model, step: int, means: _TermMeans, scheduler, stop: int) -> None:
        if step % self.tcfg.log_every == 0 or step == stop:
            self._log(step, means.pop() | {"lr": scheduler.get_last_lr()[0]})
        if self.tcfg.eval_every and step % self.tcfg.eval_every == 0 or step == self.total:
            self._log(step, self.evaluate(model), prefix="dev/")
        if step < self.total and (step % self.tcfg.save_every == 0 or step == stop):
            _save_mid_stage(self.acc, self.run_dir, Position(self.index, step, name=self.stage.name),
                            self.tcfg.keep_checkpoints)

    def _log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not values:
            return
        row = {"stage": self.index, "stage_name": self.stage.name, "step": step}
        row |= {prefix + k: v for k, v in values.items()}
        if self.acc.is_main_process:
            append_jsonl(self.run_dir / "log.jsonl", row)
        if self.tcfg.report_to:
            self.acc.log({prefix + k: v for k, v in values.items()}, step=step)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean of every loss term over the dev texts, in global batches like training."""
        dev = self.data.dev
        if dev is None:
            return {}
        world = self.acc.num_processes
        batch = min(self.stage.batch_size, len(dev) // world * world)
        if batch < 2 * world:
            return {}
        model.eval()
        totals: dict[str, float] = {}
        n = len(dev) // batch
        collate = partial(self.data.collate, dev)
        for b in range(n):
            rows = list(range(b * batch, (b + 1) * batch))
            per = batch // world
            tokens, target = collate(rows[self.acc.process_index * per:][:per])
            outputs, target = _forward_global(model, tokens, target, self.objective.heads_used,
                                              self.acc.device)
            for k, v in self.objective(outputs, target).items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        self._train_mode(model)
        return totals

    def _non_finite(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        last = latest_checkpoint(self.run_dir)
        values = {k: float(v.detach()) for k, v in terms.items()}
        raise NonFiniteLossError(
            f"Non-finite loss in stage {self.stage.name!r} at step {step + 1}: {values}. "
            f"Nothing was saved after the last good checkpoint "
            f"({last[0] if last else 'none yet'}). Lower stages.{self.index}.lr, keep "
            "train.max_grad_norm set, or use bf16 rather than fp16; then rerun with --resume."
        )


# ---------------------------------------------------------------------------------------------
# All stages


def check_precision(tcfg: TrainConfig) -> None:
    """Refuse fp16 where there is no GPU: Accelerate would run in float32 without a word, while
    the run's config.yaml says fp16. Checked before the Accelerator exists, which keeps the
    precision it is first given for the rest of the process."""
    device = PartialState().device
    if tcfg.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU, and this run is on the CPU, where "
                          "it would be silently ignored. Use train.mixed_precision=bf16 (faster on "
                          "recent CPUs) or train.mixed_precision=no.")


def make_accelerator(tcfg: TrainConfig, run_dir: Path) -> Accelerator:
    check_precision(tcfg)
    # step_scheduler_with_optimizer=False: the scheduler counts global optimizer steps (batch sizes
    # are global); Accelerate's default steps it once per process per step, so 2 processes ran
    # the cosine schedule twice as fast (lr 0 halfway through a stage, then rising again).
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, log_with=tcfg.report_to,
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False)
    if world_size() != accelerator.num_processes:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: torch.distributed is up,
        # but Accelerate runs every process as a lone main process (each would write the run).
        raise RuntimeError(
            f"{world_size()} processes were launched but Accelerate sees {accelerator.num_processes}. "
            "On CPUs launch with ACCELERATE_USE_CPU=1 (e.g. `ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N train.py ...`); note that `accelerate launch --cpu` starts "
            "one process unless it runs under mpirun."
        )
    return accelerator


def train_stages(accelerator: Accelerator, student: Student, stages: list[StageConfig],
                 tcfg: TrainConfig, run_dir: Path, data_for: Callable[[int], tuple[Callable, int]],
                 resume: bool) -> bool:
    """Run every stage not yet finished. Returns True when all stages are done.

    data_for(index) -> (data, n_train): a builder of stage `index`'s StageData from the student
    (see StageRunner) and the number of its training rows.
    """
    found = latest_checkpoint(run_dir) if resume else None
    pos = found[1] if found else Position()
    if found and found[1].done:
        student.load_state_dict(load_file(str(found[0] / "model.safetensors")))
        pos = Position(found[1].stage + 1)
    if accelerator.is_main_process:
        if found:
            logger.info("Resuming from %s", found[0])
            _truncate_log(run_dir / "log.jsonl", found[1])
        else:  # a fresh start: rows of an earlier attempt that never checkpointed do not belong
            (run_dir / "log.jsonl").unlink(missing_ok=True)
    budget = tcfg.max_steps_per_job
    for index in range(pos.stage, len(stages)):
        start = pos.step if index == pos.stage else 0
        resume_from = found[0] if found and not found[1].done and index == found[1].stage else None
        runner = StageRunner(accelerator, student, stages[index], index, tcfg, *data_for(index), run_dir)
        end = runner.run(start, resume_from, budget)
        if not end.done:
            logger.info("Stopped after the job's step budget (train.max_steps_per_job); "
                        "rerun with --resume to continue.")
            return False
        if budget is not None:
            budget -= end.step - start
            if budget <= 0 and index + 1 < len(stages):
                return False
    return True


class RunExistsError(MtdError, FileExistsError):
    """A run folder with checkpoints, started again without --resume."""


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise RunExistsError(
            f"{run_dir} already has checkpoints. Pass --resume to continue it, or choose another "
            "name (name=NEW_NAME) to start fresh; nothing was overwritten."
        )


