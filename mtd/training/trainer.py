"""The training loop: stages of the Jasper recipe on Accelerate. The one module that knows it.

A run directory holds:
    config.yaml        the resolved config
    log.jsonl          one row per logging step (every loss term, lr) and per dev evaluation
    checkpoints/       S-NAME-stepK/ (Accelerate state: model, optimizer, scheduler, RNG) and
                       S-NAME-end/ (student weights) for stage index S named NAME, each saved
                       atomically and verified before a resume (see checkpoints.py)
    student/           the trained student in mtd's format (see student.save_student)

Resuming reloads the newest checkpoint and replays the same data order (StepBatchSampler is a pure
function of the step), optimizer, scheduler and RNG state, so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather, parse_flag_from_env, set_seed
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import _init_optim_state
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.integrations import unset_hf_deepspeed_config

from mtd.config import ConfigError, StageConfig, TrainConfig
from mtd.data.corpus import LengthGroupedSampler, StepBatchSampler, TargetDataset, padding_share
from mtd.errors import MtdError
from mtd.io import (
    DataFormatError,
    append_jsonl,
    atomic_write_text,
    jsonl_objects,
    load_safetensors,
    reading_weights,
)
from mtd.losses.objective import Objective, PairOutputs
from mtd.models.student import LOGIT_SCALE, Student, set_train_mode, set_trainable
from mtd.training.checkpoints import (
    Checkpoint,
    Position,
    drop_old_mid_stage,
    latest_checkpoint,
    save_checkpoint,
)
from mtd.training.distributed import gather_with_grad, world_size
from mtd.training.queue import TargetQueue, load_queues, save_queues

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
LOG_KEYS = ("stage", "step")  # every row has them
# A damaged checkpoint that slipped past verification: an earlier one can take over.
CHECKPOINT_FIX = ("move that checkpoint folder out of checkpoints/ and run again with --resume, "
                  "which continues from the newest checkpoint left")


class NonFiniteLossError(MtdError, RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Checkpoints and the log


def _save_mid_stage(accelerator: Accelerator, run_dir: Path, pos: Position, keep: int,
                    fingerprint: dict, queues: dict[str, TargetQueue]) -> Path:
    def write(folder: Path) -> None:
        accelerator.save_state(str(folder))
        _check_same_queues(accelerator, queues)
        if accelerator.is_main_process:
            save_queues(queues, folder)

    ckpt = save_checkpoint(accelerator, run_dir, pos, write, fingerprint)
    if accelerator.is_main_process:
        drop_old_mid_stage(run_dir, keep)
    accelerator.wait_for_everyone()
    return ckpt


def _check_same_queues(accelerator: Accelerator, queues: dict[str, TargetQueue]) -> None:
    """The main process saves the queues for all: check that every process holds the same ones
    (each pushes the same gathered batches, so they agree to the bit)."""
    if accelerator.num_processes == 1 or not queues:
        return
    sums = torch.stack([q.vectors.double().sum(dim=0).dot(torch.arange(
        q.vectors.shape[1], dtype=torch.float64, device=q.vectors.device) + 1) for q in queues.values()])
    every = accelerator.gather(sums[None]).cpu()
    if not (every == every[0]).all():
        raise RuntimeError(f"The ckd queues differ between processes (checksums {every.tolist()}); "
                           "every process must push the same gathered batches.")


def _save_stage_end(accelerator: Accelerator, model, run_dir: Path, pos: Position,
                    fingerprint: dict) -> Path:
    state = accelerator.get_state_dict(model)  # full weights even when sharded (FSDP/DeepSpeed)

    def write(folder: Path) -> None:
        if accelerator.is_main_process:
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"))

    return save_checkpoint(accelerator, run_dir, pos, write, fingerprint)


class RunLogError(DataFormatError):
    """A damaged row in log.jsonl before its last one (a torn last row is expected after a crash)."""

    def __init__(self, path, problem: str, line: int | None = None):
        super().__init__(path, f"{problem}. Repair that line (or delete it, losing that row) and run "
                               "again with --resume; rows after the checkpoint are written again", line)


def _log_rows(log_path: Path) -> list[dict]:
    """The rows of log.jsonl. A torn last line (a job killed while appending it) is dropped with a
    warning: its row comes after the checkpoint (a step's rows are written before its
    checkpoint), so it is written again. A damaged earlier line is an error naming it."""
    lines = [(n, raw.decode("utf-8", errors="replace"))
             for n, raw in enumerate(log_path.read_bytes().split(b"\n"), 1) if raw.strip()]
    rows = [row for _, row in jsonl_objects(log_path, lines[:-1], RunLogError, LOG_KEYS)]
    try:
        rows += [row for _, row in jsonl_objects(log_path, lines[-1:], RunLogError, LOG_KEYS)]
    except RunLogError as e:
        logger.warning("%s, line %d: dropped an incomplete last row (the job stopped while writing "
                       "it); it is written again.", log_path, e.line)
    return rows


def start_log(run_dir: Path, found: Checkpoint | None) -> None:
    """Resuming from `found`: drop the log rows written after it, they will be written again.
    Starting fresh: drop rows of an earlier attempt that never checkpointed (they do not belong)."""
    log_path = run_dir / LOG_FILE
    if found is None:
        log_path.unlink(missing_ok=True)
    elif log_path.is_file():
        keep = [r for r in _log_rows(log_path) if (r["stage"], r["step"]) <= found.pos.key()]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------------------------------
# One stage


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   matrices: set[int] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norm weights (the
    BERT and HF Trainer convention: pulling them toward 0 only distorts the features' scale).

    matrices: ids of the parameters that get weight decay (those of 2 or more dimensions), as
    recorded before FSDP or DeepSpeed ZeRO-3 flattened or emptied them; None: read the shapes now.

    Fused (one kernel for all tensors, as the HF Trainer uses): on this project's 2-core CPU the
    step of the 22.7M-parameter MiniLM took 76 ms instead of 681 ms (`python bench/optimizer_step.py`,
    measured on a busy machine: the ratio, 9x, is the number to keep).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if matrices is None:
        matrices = {id(p) for p in params if p.ndim >= 2}
    return torch.optim.AdamW([
        {"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0},
    ], lr=lr, fused=True)


def stage_steps(stage: StageConfig, n_train: int, grad_accum: int) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.epochs * (n_train // stage.batch_size) / grad_accum))


class PreparedStudent:
    """The student as Accelerate's backend trains it, stage after stage (see prepare).

    DDP and one process: a new wrapper each stage over the student. DDP's reducer covers the
    parameters that train when it is built, so a new trainable set needs a new one (building it
    copies no weights).
    FSDP: wrapped once per run (its auto-wrap refuses a module it has wrapped), with
    use_orig_params (set by make_accelerator), so a stage only changes requires_grad on the
    original parameters; each stage's optimizer is built over the wrapped model's parameters
    (FSDP1 needs them wrapped first).
    DeepSpeed: a new engine each stage over the unwrapped student. The engine owns the optimizer
    and ZeRO partitions exactly that optimizer's parameters; Accelerate's free_memory destroys the
    previous engine (its gradient hooks included).
    """

    def __init__(self, accelerator: Accelerator, student: Student):
        self.acc, self.student = accelerator, student
        # Which parameters get weight decay, read while every one still has its own shape.
        self.matrices = {id(p) for p in student.parameters() if p.ndim >= 2}
        self.wrapped = None  # FSDP: the wrapper, kept for the whole run

    def prepare(self, stage: StageConfig, total: int):
        """(model, optimizer, scheduler) of a stage training `total` optimizer steps."""
        acc = self.acc
        acc.free_memory()  # the previous stage's optimizer, scheduler, wrapper or engine
        fsdp = acc.distributed_type == DistributedType.FSDP
        if acc.distributed_type == DistributedType.DEEPSPEED:
            _deepspeed_batch(acc, stage.batch_size)
        trainable = set_trainable(self.student, stage.train, list(stage.heads), stage.learn_temperature)
        logger.info("Stage %s: training %d parameter tensors (%s) for %d steps.",
                    stage.name, len(trainable), stage.train, total)
        if fsdp and self.wrapped is None:
            self.wrapped = acc.prepare(self.student)
            acc.free_memory()  # keeps the wrapper; the prepare below registers it again
        model = self.student if self.wrapped is None else self.wrapped
        optimizer = make_optimizer(model, stage.lr, stage.weight_decay, self.matrices)
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(stage.warmup_ratio * total), total)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if fsdp:
            self.wrapped = model
        return model, optimizer, scheduler


def collate_tokens(dataset: TargetDataset, indices: list[int]):
    """Corpus rows -> ({input_ids, attention_mask}, {"teacher": (B, D_target)}): the rows' token
    ids, computed once for the corpus (dataset.tokens), padded to the batch's longest."""
    _, target = dataset.collate(indices)
    return dataset.tokens.pad(indices), {"teacher": target}


def collate_features(dataset, indices: list[int]):
    """FeatureDataset rows -> ({pooled: (B, H)}, {"teacher": (B, D_target)})."""
    features, target = dataset.collate(indices)
    return {"pooled": features}, {"teacher": target}


@dataclass
class StageData:
    """What a stage trains on: its datasets and how a list of rows becomes (inputs, targets).

    collate(dataset, rows) -> ({model input: tensor}, {target source: (B, D)}); `sampler` orders
    the rows (a pure function of the step, so resuming replays the same batches). `lengths`: each
    training row's token count, where rows are texts (train.group_by_length groups by it).
    """

    train: Any
    dev: Any | None
    collate: Callable
    sampler: type[StepBatchSampler] = StepBatchSampler
    lengths: np.ndarray | None = None


def _forward_global(model, inputs, targets, heads: set[str], device):
    """Student outputs and targets of the global batch: local rows gathered from every process
    (learned logit scales, the same on every process, as they are)."""
    local = model(**{k: v.to(device, non_blocking=True) for k, v in inputs.items()})
    # Sorted: a set iterates in per-process hash order, and collectives must match across ranks.
    outputs = {h: gather_with_grad(local[h].float()) for h in sorted(heads)}
    outputs |= {k: v for k, v in local.items() if k.startswith(LOGIT_SCALE)}
    return outputs, {k: gather_with_grad(targets[k].to(device, non_blocking=True)) for k in sorted(targets)}


def _forward_pairs(model, inputs, targets, objective: Objective, device):
    """A pair batch's global outputs: the anchors' (every head the objective reads) with their
    targets, and PairOutputs with the positives' and hard negatives' vectors of the heads that
    train the pair term, and every row's group."""
    outputs, targets = _forward_global(model, inputs["anchor"], targets, objective.heads_used, device)
    heads = {h for h, names in objective.heads.items() if "pair" in names}
    columns = {c: _forward_global(model, inputs[c], {}, heads, device)[0] for c in ("positive", "negative")
               if c in inputs}
    columns = {c: {h: v for h, v in out.items() if h in heads} for c, out in columns.items()}
    groups = gather(inputs["groups"].to(device))
    return outputs, targets, PairOutputs(columns["positive"], columns.get("negative"), groups)


class _TermMeans:
    """Running mean of every loss term over the optimizer steps since the last log row, and the
    first micro-step since then whose loss was not finite.

    Both stay on the device: reading a value makes the host wait for the accelerator, so they are
    read only where a row is written or a checkpoint saved (`check`, `pop`), not every step. Sums
    are float64 (float32 where the device has no float64), as exact as the Python floats they
    replace. Counts its own steps: right after a resume or at a job's stop a row covers fewer than
    train.log_every steps.
    """

    def __init__(self, device: torch.device):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.steps = 0
        self.bad_step: torch.Tensor | None = None  # 1-based step of the first non-finite loss, or 0
        self.bad_terms: torch.Tensor | None = None  # its terms

    def add(self, terms: dict[str, torch.Tensor], scale: float, step: int) -> None:
        """One micro-step's terms (device scalars) at 1-based optimizer step `step`."""
        if self.sums is None:
            self.names = list(terms)
            self.sums = torch.zeros(len(terms), dtype=self.dtype, device=terms["loss"].device)
            self.bad_step = torch.zeros((), dtype=torch.int64, device=self.sums.device)
            self.bad_terms = torch.zeros_like(self.sums)
        values = torch.stack([terms[k].detach() for k in self.names]).to(self.dtype)
        self.sums += values * scale
        first = (self.bad_step == 0) & ~torch.isfinite(terms["loss"].detach())
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_terms = torch.where(first, values, self.bad_terms)

    def check(self) -> tuple[int, dict[str, float]] | None:
        """(step, terms) of the first non-finite loss since the last check, or None."""
        if self.bad_step is None:
            return None
        step = int(self.bad_step)
        if not step:
            return None
        return step, dict(zip(self.names, self.bad_terms.tolist(), strict=True))

    def pop(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        row = {k: v / self.steps for k, v in zip(self.names, self.sums.tolist(), strict=True)}
        self.sums.zero_()
        self.steps = 0
        return row


class StageRunner:
    """Trains one stage from `start` to its end (or to the job's step budget)."""

    def __init__(self, accelerator, student: PreparedStudent, stage: StageConfig, index: int,
                 tcfg: TrainConfig, data: Callable[[Student], StageData], n_train: int, run_dir: Path,
                 fingerprint: dict):
        """data(student) builds the stage's data once the student holds this stage's start weights
        (image stages read the frozen text side's caption vectors from it); n_train: its rows;
        fingerprint: what the data is, recorded in every checkpoint (see data_fingerprint)."""
        self.acc, self.prepared, self.run_dir = accelerator, student, run_dir
        self.fingerprint = fingerprint
        self.stage, self.index, self.tcfg = stage, index, tcfg
        self.make_data, self.data = data, None
        self.objective = Objective.from_stage(stage)
        self.total = stage_steps(stage, n_train, tcfg.grad_accum)
        self.queues: dict[str, TargetQueue] = {}  # ckd's earlier targets, by target source

    def _sampler(self, start: int, stop: int, seed: int, batch: int, grouped: bool) -> StepBatchSampler:
        args = (len(self.data.train), batch, seed, start, stop, self.acc.process_index,
                self.acc.num_processes)
        if grouped:
            return LengthGroupedSampler(*args, lengths=self.data.lengths)
        return self.data.sampler(*args)

    def _loader(self, start: int, stop: int, seed: int, batch: int):
        dataset = self.data.train
        grouped = self.tcfg.group_by_length and self.data.lengths is not None
        sampler = self._sampler(start, stop, seed, batch, grouped)
        if self.data.lengths is not None and self.acc.is_main_process:
            self._log_padding(start, stop, seed, batch)
        # Its own generator: iterating a DataLoader draws a base seed, which from the global RNG
        # would shift the dropout stream of a resumed run (restored RNG state, then one more draw).
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        workers = self.tcfg.num_workers
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=partial(self.data.collate, dataset),
            num_workers=workers, generator=generator, pin_memory=self.acc.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if workers else None)

    def _log_padding(self, start: int, stop: int, seed: int, batch: int) -> None:
        """Say how much of the stage's token positions are padding, with and without grouping."""
        shares = [padding_share(self._sampler(start, stop, seed, batch, grouped), self.data.lengths)
                  for grouped in (False, True)]
        logger.info("Stage %s: padding is %.1f%% of the tokens in random batches and %.1f%% in "
                    "length-grouped ones (train.group_by_length=%s).", self.stage.name,
                    100 * shares[0], 100 * shares[1], str(self.tcfg.group_by_length).lower())

    def run(self, start: int, resume_from: Path | None, step_budget: int | None) -> Position:
        set_seed(self.tcfg.seed + self.index)  # a stage starts the same whether resumed or not
        model, optimizer, scheduler = self.prepared.prepare(self.stage, self.total)
        if resume_from is not None:
            if self.acc.distributed_type == DistributedType.FSDP:
                # Accelerate reads a sharded FSDP optimizer into the state the optimizer holds,
                # and a new AdamW has none before its first step: the moments would come back
                # empty. Make them now (zero gradients, lr 0), as torch's own loader does.
                _init_optim_state(optimizer.optimizer)
            with reading_weights(resume_from, CHECKPOINT_FIX):
                self.acc.load_state(str(resume_from))
            if self.stage.queue_size:
                self.queues = load_queues(resume_from, self.objective.queue_sources, self.stage.queue_size,
                                          self.acc.device, CHECKPOINT_FIX)
            logger.info("Resumed stage %s at step %d from %s", self.stage.name, start, resume_from)
        self.data = self.make_data(self.acc.unwrap_model(model))
        stop = self.total if step_budget is None else min(self.total, start + step_budget)
        accum = self.tcfg.grad_accum
        loader = self._loader(start * accum, stop * accum, self.tcfg.seed + 7919 * self.index,
                              self.stage.batch_size)
        bar = tqdm(total=self.total, initial=start, desc=f"stage {self.stage.name}",
                   disable=not self.acc.is_local_main_process)
        means = _TermMeans(self.acc.device)
        step, micro = start, 0
        self._train_mode(model)
        for batch, target in loader:
            # Accelerate's accumulation: no gradient sync before the last micro-batch (DDP, FSDP),
            # the loss divided by grad_accum, and under DeepSpeed the engine steps at the last.
            with self.acc.accumulate(model):
                terms = self._micro_step(model, batch, target, step, micro)
                if self.acc.sync_gradients:
                    self._optimizer_step(model, optimizer, scheduler)
            means.add(terms, 1 / accum, step + 1)
            if not self.acc.sync_gradients:
                micro += 1
                continue
            step, micro = step + 1, 0
            means.steps += 1
            bar.update(1)
            self._after_step(model, step, means, scheduler, stop, bar)
        bar.close()
        end = Position(self.index, step, done=step >= self.total, name=self.stage.name)
        if end.done:
            _save_stage_end(self.acc, model, self.run_dir, end, self.fingerprint)
        return end

    def _train_mode(self, model) -> None:
        model.train()  # the wrapper too (DDP reads its own flag)
        set_train_mode(self.acc.unwrap_model(model))

    def _micro_step(self, model, batch, target, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of one micro-batch; its loss terms stay on the device (no
        host sync: a non-finite loss is found by _TermMeans.check before anything is written)."""
        generator = torch.Generator(device=self.acc.device).manual_seed(
            (self.tcfg.seed * 1_000_003 + step) * 64 + micro)  # same pair samples on all ranks
        # The prepared model's forward runs under autocast already; the objective turns it off.
        pairs = None
        if "anchor" in batch:  # a pair stage
            outputs, target, pairs = _forward_pairs(model, batch, target, self.objective, self.acc.device)
        else:
            outputs, target = _forward_global(model, batch, target, self.objective.heads_used,
                                              self.acc.device)
        terms = self.objective(outputs, target, generator=generator, queues=self._negatives(), pairs=pairs)
        self.acc.backward(terms["loss"])  # divided by grad_accum there (by the engine under DeepSpeed)
        self._push(outputs, target)
        return {k: v.detach() for k, v in terms.items()}

    def _negatives(self) -> dict[str, torch.Tensor]:
        return {source: queue.negatives() for source, queue in self.queues.items()}

    def _push(self, outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
        """Queue this global batch's targets, after its loss: no batch meets itself in the queue."""
        if not self.stage.queue_size:
            return
        for source, vectors in self.objective.queue_batch(outputs, target).items():
            if source not in self.queues:
                self.queues[source] = TargetQueue(self.stage.queue_size, vectors.shape[1], self.acc.device)
            self.queues[source].push(vectors)

    def _optimizer_step(self, model, optimizer, scheduler) -> None:
        if self.tcfg.max_grad_norm is not None:
            self.acc.clip_grad_norm_(model.parameters(), self.tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _after_step(self, model, step: int, means: _TermMeans, scheduler, stop: int, bar) -> None:
        log = step % self.tcfg.log_every == 0 or step == stop
        evaluate = self.tcfg.eval_every and step % self.tcfg.eval_every == 0 or step == self.total
        save = step < self.total and (step % self.tcfg.save_every == 0 or step == stop)
        if not (log or evaluate or save):
            return
        # Nothing is logged or saved after a non-finite loss (the stage-end save follows a log).
        bad = means.check()
        if bad is not None:
            self._non_finite(*bad)
        if log:
            row = means.pop()
            self._log(step, row | {"lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if evaluate:
            self._log(step, self.evaluate(model), prefix="dev/")
        if save:
            _save_mid_stage(self.acc, self.run_dir, Position(self.index, step, name=self.stage.name),
                            self.tcfg.keep_checkpoints, self.fingerprint, self.queues)

    def _log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not values:
            return
        row = {"stage": self.index, "stage_name": self.stage.name, "step": step}
        row |= {prefix + k: v for k, v in values.items()}
        if self.acc.is_main_process:
            append_jsonl(self.run_dir / LOG_FILE, row)
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
            queues = self._negatives()
            values = {k: float(v) for k, v in self.objective(outputs, target, queues=queues).items()}
            # Which term drives training: its share of the gradient at the student's vectors.
            values |= {f"share/{k}": v for k, v in
                       self.objective.gradient_shares(outputs, target, queues).items()}
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / n
        self._train_mode(model)
        return totals

    def _non_finite(self, step: int, values: dict[str, float]) -> None:
        """step: 1-based, the optimizer step whose loss was first not finite."""
        last = latest_checkpoint(self.run_dir)
        raise NonFiniteLossError(
            f"Non-finite loss in stage {self.stage.name!r} at step {step}: {values}. "
            f"Nothing was saved after the last good checkpoint "
            f"({last[0] if last else 'none yet'}). Lower stages.{self.index}.lr, keep "
            "train.max_grad_norm set, or use bf16 rather than fp16; then rerun with --resume."
        )


# ---------------------------------------------------------------------------------------------
# All stages


def _has_gpu() -> bool:
    """Whether Accelerate will run on an accelerator, asked without creating its state (a
    PartialState made before the Accelerator would fix the process layout and precision)."""
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return False
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def check_precision(tcfg: TrainConfig) -> None:
    """Refuse fp16 where there is no GPU: Accelerate would run in float32 without a word, while
    the run's config.yaml says fp16. Checked before the Accelerator exists: a refused run leaves
    the process free to start a corrected one (Accelerate keeps one precision per process)."""
    if tcfg.mixed_precision == "fp16" and not _has_gpu():
        raise ConfigError("train.mixed_precision=fp16 needs a GPU, and this run is on the CPU, where "
                          "it would be silently ignored. Use train.mixed_precision=bf16 (faster on "
                          "recent CPUs) or train.mixed_precision=no.")


def _process_group_kwargs(tcfg: TrainConfig) -> InitProcessGroupKwargs:
    """The process group's settings. Its timeout applies to every collective (train.timeout_minutes;
    NCCL's default, 10 minutes, is shorter than some waits of a big run). DeepSpeed launched on CPUs
    (its CPU accelerator): Accelerate picks no process-group backend there and would count every
    process as a lone one; gloo is the one DeepSpeed's CPU side uses."""
    timeout = timedelta(minutes=tcfg.timeout_minutes)
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if launched and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and not _has_gpu():
        return InitProcessGroupKwargs(backend="gloo", timeout=timeout)
    return InitProcessGroupKwargs(timeout=timeout)


def _configure_backend(accelerator: Accelerator, tcfg: TrainConfig) -> None:
    """What FSDP and DeepSpeed need from mtd's config, set before anything is prepared.

    FSDP: use_orig_params, so that stages can freeze parts of a model wrapped once. DeepSpeed:
    accumulation and clipping are the engine's, so its config must say train.grad_accum and
    train.max_grad_norm (a different number there is refused); ZeRO-3 gathers full 16-bit weights
    for the stage-end checkpoints. Batch sizes are set per stage (_deepspeed_batch).
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.is_fsdp2:
            raise ConfigError(
                "FSDP version 2 (fsdp_version: 2 in the accelerate config) is not supported: "
                "resuming a run whose stages freeze parts of the student broke its optimizer "
                "(torch 2.13, Accelerate 1.15). Use fsdp_version: 1, as "
                "configs/accelerate/fsdp.yaml does.")
        plugin = accelerator.state.fsdp_plugin
        if not plugin.use_orig_params:
            logger.info("FSDP: setting use_orig_params=True (stages freeze parts of the student).")
            plugin.use_orig_params = True
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    wanted = (("gradient_accumulation_steps", tcfg.grad_accum, "train.grad_accum"),
              ("gradient_clipping", tcfg.max_grad_norm or 0.0, "train.max_grad_norm"))
    for key, value, field in wanted:
        have = config.get(key, "auto")
        if have != "auto" and have != value:
            raise ConfigError(
                f"The DeepSpeed config sets {key}={have} and the run config {field}="
                f"{getattr(tcfg, field.split('.')[1])}: mtd takes it from {field}. Set {key} to "
                f"auto in the DeepSpeed config (or leave it out), or set {field} to match.")
        config[key] = value
    if plugin.zero_stage == 3:
        if plugin.zero3_init_flag:
            raise ConfigError(
                "DeepSpeed ZeRO-3 with zero3_init_flag: true would build the student already "
                "partitioned, and mtd builds it whole (keeping layers, adding heads) before "
                "preparing it. Set zero3_init_flag: false in the accelerate config (as "
                "configs/accelerate/deepspeed-zero3.yaml does).")
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        # Accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says,
        # and transformers then builds every model partitioned (a collective): the student, the
        # teachers, and the main process's lone rebuild for the export, which would wait forever.
        unset_hf_deepspeed_config()


def _deepspeed_batch(accelerator: Accelerator, batch_size: int) -> None:
    """DeepSpeed's batch keys for a stage of global batch `batch_size` per micro-step: mtd's own
    loader feeds the engine (no prepared DataLoader to fill "auto" from) and stages differ."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = batch_size // accelerator.num_processes
    config["train_micro_batch_size_per_gpu"] = micro
    config["train_batch_size"] = micro * accelerator.num_processes * accelerator.gradient_accumulation_steps


def make_accelerator(tcfg: TrainConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator: DDP, FSDP or DeepSpeed as launched (`accelerate launch
    --config_file configs/accelerate/...`), gradient accumulation by train.grad_accum."""
    check_precision(tcfg)
    # step_scheduler_with_optimizer=False: the scheduler counts global optimizer steps (batch sizes
    # are global); Accelerate's default steps it once per process per step, so 2 processes ran
    # the cosine schedule twice as fast (lr 0 halfway through a stage, then rising again).
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, log_with=tcfg.report_to,
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False,
                              gradient_accumulation_steps=tcfg.grad_accum,
                              kwargs_handlers=[_process_group_kwargs(tcfg)])
    if world_size() != accelerator.num_processes:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: torch.distributed is up,
        # but Accelerate runs every process as a lone main process (each would write the run).
        raise RuntimeError(
            f"{world_size()} processes were launched but Accelerate sees {accelerator.num_processes}. "
            "On CPUs launch with ACCELERATE_USE_CPU=1 (e.g. `ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N train.py ...`); note that `accelerate launch --cpu` starts "
            "one process unless it runs under mpirun."
        )
    if accelerator.gradient_accumulation_steps != tcfg.grad_accum:
        raise ConfigError(
            f"The launch asks for gradient accumulation over {accelerator.gradient_accumulation_steps} "
            f"batches (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, from `accelerate launch "
            f"--gradient_accumulation_steps` or its config) and the run config for "
            f"train.grad_accum={tcfg.grad_accum}: mtd takes it from train.grad_accum. Remove it from "
            "the launch.")
    _configure_backend(accelerator, tcfg)
    return accelerator


def runs_student_outside_steps(accelerator: Accelerator) -> bool:
    """Whether the student can encode outside the training step (DDP or one process): under FSDP
    and ZeRO-3 its modules hold shards of the weights, and DeepSpeed's are 16-bit."""
    return accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_backend(accelerator: Accelerator, stages: list[StageConfig]) -> None:
    """Image stages only under DDP or one process: they encode images and captions with the
    student outside the training step (see runs_student_outside_steps)."""
    kind = accelerator.distributed_type
    if runs_student_outside_steps(accelerator):
        return
    for i, stage in enumerate(stages):
        if stage.data == "images":
            raise ConfigError(
                f"stages.{i} ({stage.name}) is an image stage, and mtd trains those with DDP or one "
                f"process, not {kind.value}. Train the image stages in a run of their own without "
                "the FSDP/DeepSpeed launch config (student.init: run, student.path: the text run).")


def train_stages(accelerator: Accelerator, student: Student, stages: list[StageConfig],
                 tcfg: TrainConfig, run_dir: Path, data_for: Callable[[int], tuple[Callable, int]],
                 found: Checkpoint | None, fingerprint: dict) -> bool:
    """Run every stage not yet finished, from checkpoint `found` (verified: see resolve_resume)
    or from the start. Returns True when all stages are done.

    data_for(index) -> (data, n_train): a builder of stage `index`'s StageData from the student
    (see StageRunner) and the number of its training rows.
    """
    pos = found.pos if found else Position()
    if found and found.pos.done:
        student.load_state_dict(load_safetensors(found.path / "model.safetensors", CHECKPOINT_FIX))
        pos = Position(found.pos.stage + 1)
    if found and accelerator.is_main_process:
        logger.info("Resuming from %s", found.path)
    budget = tcfg.max_steps_per_job
    if tcfg.compile:
        # In place (nn.Module.compile): parameter names, and so every state_dict, checkpoint and
        # export, stay those of the plain module (torch.compile(module) would add "_orig_mod.").
        student.encoder.compile()
    prepared = PreparedStudent(accelerator, student)
    for index in range(pos.stage, len(stages)):
        start = pos.step if index == pos.stage else 0
        resume_from = found.path if found and not found.pos.done and index == found.pos.stage else None
        runner = StageRunner(accelerator, prepared, stages[index], index, tcfg, *data_for(index), run_dir,
                             fingerprint)
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


