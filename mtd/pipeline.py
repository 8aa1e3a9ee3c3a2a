"""A whole run: corpus -> teacher target caches -> student -> stages -> export -> report.

`run(cfg)` is what train.py calls; every step is a function of its own so notebooks can call
the pieces (e.g. `load_corpus` and `build_targets` to study a corpus's targets).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mtd import cache, report
from mtd.config import RunConfig, check_dims, check_resume, dump_config
from mtd.data import Corpus, TargetDataset, read_corpus
from mtd.export import export_student
from mtd.io import atomic_write_text
from mtd.student import Student, build_encoder, resolve_head_dims, save_student
from mtd.synthetic import make_tiny_assets
from mtd.teachers import resolve_model_folder
from mtd.trainer import check_run_dir, latest_checkpoint, make_accelerator, train_stages

logger = logging.getLogger(__name__)


def load_corpus(cfg: RunConfig) -> Corpus:
    d = cfg.data
    return read_corpus(d.corpus, text_field=d.text_field, max_texts=d.max_texts,
                       dev_size=d.dev_size, max_chars=d.max_chars, shuffle=d.shuffle, seed=d.seed)


def build_student(cfg: RunConfig, target_dim: int) -> tuple[Student, object]:
    s = cfg.student
    path = s.path if s.init == "scratch" or s.path is None else str(
        resolve_model_folder(s.path, what="student"))
    encoder, tokenizer = build_encoder(s.init, path, s.layers, s.model_config, s.trust_remote_code)
    return Student(encoder, resolve_head_dims(s.heads, target_dim)), tokenizer


def run(cfg: RunConfig, resume: bool = False) -> Path:
    """Train every stage of `cfg` (resuming if asked), export, report. Returns the run folder."""
    run_dir = cfg.run_dir
    check_run_dir(run_dir, resume)
    accelerator = make_accelerator(cfg.train, run_dir)
    saved = run_dir / "config.yaml"
    if resume and saved.is_file() and latest_checkpoint(run_dir) is not None:
        check_resume(saved.read_text(encoding="utf-8"), cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, dump_config(cfg))
        if cfg.synthetic_assets:
            make_tiny_assets(cfg.synthetic_assets)
    accelerator.wait_for_everyone()
    if cfg.train.report_to:
        accelerator.init_trackers(cfg.name, config={"config": dump_config(cfg)})

    corpus = load_corpus(cfg)
    logger.info("Corpus: %d training texts, %d dev texts.", len(corpus.train), len(corpus.dev))
    arrays = cache.cached_targets(
        cfg.teachers, corpus.texts, cfg.cache_dir, chunk_size=cfg.cache_chunk_size,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone, device=str(accelerator.device),
    )
    weights = [t.weight for t in cfg.teachers]
    train_ds = TargetDataset(corpus.train, arrays, weights)
    dev_ds = TargetDataset(corpus.dev, arrays, weights, offset=len(corpus.train)) if corpus.dev else None
    # The init must not depend on what ran before (building assets or caches draws random numbers,
    # and only some runs or ranks do it): seed it, so equal configs start from equal students.
    set_seed(cfg.train.seed)
    target_dim = sum(a.shape[1] for a in arrays)
    check_dims(cfg, resolve_head_dims(cfg.student.heads, target_dim), target_dim)
    student, tokenizer = build_student(cfg, target_dim)

    finished = train_stages(accelerator, student, tokenizer, cfg, train_ds, dev_ds, resume)
    accelerator.end_training()
    if not finished or not accelerator.is_main_process:
        return run_dir
    # The last stage-end checkpoint holds full weights even where training sharded them (FSDP,
    # DeepSpeed), so the saved student is rebuilt from it rather than taken from memory.
    final_ckpt, _ = latest_checkpoint(run_dir)
    student, tokenizer = build_student(cfg, target_dim)
    student.load_state_dict(load_file(str(final_ckpt / "model.safetensors")))
    save_student(student, tokenizer, run_dir / "student", cfg.student.max_length)
    head = cfg.export_head or next(iter(student.heads))
    export_student(student, tokenizer, run_dir / "final", head, cfg.student.max_length)
    report.final_report(cfg, run_dir, dev_targets=[np.asarray(a[len(corpus.train):]) for a in arrays],
                        dev_texts=corpus.dev, export_head=head)
    return run_dir
