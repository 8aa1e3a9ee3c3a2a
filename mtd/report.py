"""The end-of-run report: the student's scores beside its teachers'.

With STS sets available (eval.sts_dir), every set of the chosen split is scored for the exported
student and for each teacher (teacher scores are cached by teacher identity and file hash, so the
slow teachers are scored once). Without them, agreement with the teachers on the held-out corpus
texts is reported instead: Spearman x100 between the student's and a teacher's pairwise cosines,
which needs no labels and reuses the cached teacher vectors.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from mtd import sts, teachers
from mtd.config import EvalConfig, RunConfig, TeacherConfig
from mtd.io import DataFormatError, atomic_write_json, read_json
from mtd.student import encode, load_student

logger = logging.getLogger(__name__)

MAX_AGREEMENT_TEXTS = 1000  # 500k pairs: plenty for a stable rank correlation


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_sts(cfg: TeacherConfig, sets: list[Path], ecfg: EvalConfig, cache_dir: Path) -> list[dict]:
    """STS rows for one teacher, computed once per (teacher identity, STS file)."""
    folder = teachers.resolve_model_folder(cfg.path)
    identity = teachers.teacher_identity(cfg, folder)
    model, rows = None, []
    for path in sets:
        key = hashlib.sha256(f"{identity}|{_file_sha(path)}".encode()).hexdigest()[:20]
        cached = cache_dir / "eval" / f"{cfg.name}-{key}.json"
        if cached.is_file():
            rows.append(read_json(cached))
            continue
        model = model or teachers.load_teacher(cfg, folder)
        data = sts.load_sts(path)
        row = {"model": f"teacher {cfg.name}", "set": data.name}
        row |= sts.evaluate_sts(sts.st_encoder(model, ecfg.batch_size, cfg.prompt or None), data,
                                batch_size=None)
        atomic_write_json(cached, row)
        rows.append(row)
    return rows


def student_sts(run_dir: Path, sets: list[Path], batch_size: int, export_head: str) -> list[dict]:
    """The export in final/ through sentence-transformers, and every other head through mtd."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(run_dir / "final"), device="cpu")
    student, tokenizer, max_length = load_student(run_dir / "student")
    encoders = {f"student {export_head} (final/)": sts.st_encoder(model, batch_size)}
    for head in student.heads:
        if head != export_head:
            encoders[f"student {head}"] = partial(encode, student, tokenizer, head=head,
                                                  max_length=max_length, batch_size=batch_size)
    rows = []
    for path in sets:
        data = sts.load_sts(path)
        for name, encoder in encoders.items():
            row = {"model": name, "set": data.name}
            rows.append(row | sts.evaluate_sts(encoder, data, batch_size=None))
    return rows


def pairwise_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman x100 between the pairwise cosines of two embeddings of the same texts."""
    def sims(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (x @ x.T)[np.triu_indices(len(x), k=1)]

    return float(stats.spearmanr(sims(a), sims(b)).statistic) * 100


def agreement_rows(model_dir: Path, texts: list[str], teacher_vecs: list[np.ndarray],
                   names: list[str]) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    texts = texts[:MAX_AGREEMENT_TEXTS]
    student = SentenceTransformer(str(model_dir), device="cpu").encode(texts, batch_size=64)
    rows = []
    for name, vecs in zip(names, teacher_vecs, strict=True):
        vecs = np.asarray(vecs[: len(texts)], dtype=np.float32)
        rows.append({"model": "student", "set": f"agreement with {name}",
                     "spearman": pairwise_agreement(student, vecs), "pairs": len(texts)})
    return rows


def final_report(cfg: RunConfig, run_dir: Path, dev_targets: list[np.ndarray],
                 dev_texts: list[str], export_head: str) -> list[dict[str, Any]]:
    """Score run_dir/final (and the other heads), write results.json, log the Markdown table."""
    ecfg = cfg.eval
    sts_dir = Path(ecfg.sts_dir) if ecfg.sts_dir else None
    rows = []
    if sts_dir is not None and sts_dir.is_dir():
        try:
            sets = sts.find_sts_sets(sts_dir, ecfg.split)
            rows = student_sts(run_dir, sets, ecfg.batch_size, export_head)
            for t in cfg.teachers if ecfg.teachers else []:
                rows += teacher_sts(t, sets, ecfg, Path(cfg.cache_dir))
        except (FileNotFoundError, DataFormatError) as e:  # the student is saved; still report
            logger.warning("STS data unusable (%s); reporting agreement instead.", e)
            rows = []
    if not rows and dev_texts:
        logger.info("No STS data at %s: reporting agreement with the teachers on %d held-out "
                    "texts instead.", sts_dir, min(len(dev_texts), MAX_AGREEMENT_TEXTS))
        rows = agreement_rows(run_dir / "final", dev_texts, dev_targets, [t.name for t in cfg.teachers])
    elif not rows:
        logger.warning("Nothing to report: no STS data (eval.sts_dir) and no dev texts (data.dev_size).")
        return []
    atomic_write_json(run_dir / "results.json", rows)
    logger.info("Results (Spearman x100; also in %s):\n%s", run_dir / "results.json",
                sts.format_table(rows))
    return rows
