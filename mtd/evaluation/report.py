"""The end-of-run report: the student's scores beside its teachers'.

With STS sets available (`sts_dir`), every set of the chosen split is scored through the
evaluation suite (`suite.run_sts`, the code behind eval.py) for the exported student, each other
head and each teacher; vectors are cached by model fingerprint and texts, so the slow teachers are
encoded once across runs. Without STS sets, agreement with the teachers on the held-out corpus
texts is reported instead: Spearman x100 between the student's and a teacher's pairwise cosines,
which needs no labels and reuses the cached teacher vectors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from mtd.config import TeacherConfig
from mtd.evaluation import sts, suite
from mtd.evaluation.specs import (
    Encoder,
    ImageTextEncoder,
    SentenceTransformerEncoder,
    StudentHeadEncoder,
    TeacherEncoder,
)
from mtd.io import DataFormatError, atomic_write_json, read_json
from mtd.models.student import STUDENT_FILE

logger = logging.getLogger(__name__)

MAX_AGREEMENT_TEXTS = 1000  # 500k pairs: plenty for a stable rank correlation


def report_models(run_dir: Path, export_head: str, teachers: list[TeacherConfig],
                  device: str | None = None) -> dict[str, Encoder]:
    """The export in final/ through sentence-transformers, every other head through mtd, and the
    teachers as the target cache runs them."""
    label = f"student {export_head} (final/)"
    models: dict[str, Encoder] = {label: SentenceTransformerEncoder(label, run_dir / "final", device)}
    student = run_dir / "student"
    for head in read_json(student / STUDENT_FILE)["heads"]:
        if head != export_head:
            models[f"student {head}"] = StudentHeadEncoder(f"student {head}", student, head, device)
    for t in teachers:
        models[f"teacher {t.name}"] = TeacherEncoder(f"teacher {t.name}", t, device)
    return models


def sts_rows(models: dict[str, Encoder], sets: list[Path], batch_size: int,
             cache_dir: Path | None) -> list[dict[str, Any]]:
    """Suite rows, each also under `set` (the key results.json and sts.format_table use)."""
    rows = []
    for label, model in models.items():
        rows += [r | {"set": r["dataset"]} for r in suite.run_sts(label, model, sets, batch_size, cache_dir)]
    return rows


def pairwise_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman x100 between the pairwise cosines of two embeddings of the same texts."""
    def sims(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (x @ x.T)[np.triu_indices(len(x), k=1)]

    return float(stats.spearmanr(sims(a), sims(b)).statistic) * 100


def agreement_rows(model_dir: Path, texts: list[str], teacher_vecs: list[np.ndarray],
                   names: list[str], device: str | None = None) -> list[dict]:
    texts = texts[:MAX_AGREEMENT_TEXTS]
    student = SentenceTransformerEncoder("student", model_dir, device).encode(texts)
    rows = []
    for name, vecs in zip(names, teacher_vecs, strict=True):
        vecs = np.asarray(vecs[: len(texts)], dtype=np.float32)
        rows.append({"model": "student", "set": f"agreement with {name}",
                     "spearman": pairwise_agreement(student, vecs), "pairs": len(texts)})
    return rows


def final_report(run_dir: Path, *, export_head: str, teachers: list[TeacherConfig],
                 sts_dir: str | None, split: str, batch_size: int, score_teachers: bool,
                 cache_dir: Path | None, dev_texts: list[str],
                 dev_targets: list[np.ndarray], image_eval: str | None = None,
                 device: str | None = None) -> list[dict[str, Any]]:
    """Score run_dir/final (and the other heads), write results.json, log the Markdown table.

    dev_targets: each teacher's cached vectors of `dev_texts` (for the agreement fallback).
    image_eval: an image-caption .jsonl whose image-text recall of the export is reported too.
    device: where the models run (the run's accelerator device; None: sentence-transformers' choice).
    """
    folder = Path(sts_dir) if sts_dir else None
    rows: list[dict[str, Any]] = []
    if folder is not None and folder.is_dir():
        try:
            sets = sts.find_sts_sets(folder, split)
            models = report_models(run_dir, export_head, teachers if score_teachers else [], device)
            rows = sts_rows(models, sets, batch_size, cache_dir)
        except (FileNotFoundError, DataFormatError) as e:  # the student is saved; still report
            logger.warning("STS data unusable (%s); reporting agreement instead.", e)
            rows = []
    if not rows and dev_texts:
        logger.info("No STS data at %s: reporting agreement with the teachers on %d held-out "
                    "texts instead.", folder, min(len(dev_texts), MAX_AGREEMENT_TEXTS))
        rows = agreement_rows(run_dir / "final", dev_texts, dev_targets, [t.name for t in teachers], device)
    elif not rows and not image_eval:
        logger.warning("Nothing to report: no STS data (eval.sts_dir) and no dev texts (data.dev_size).")
        return []
    images = image_rows(run_dir / "final", image_eval, device) if image_eval else []
    atomic_write_json(run_dir / "results.json", rows + images)
    logger.info("Results (Spearman x100; also in %s):\n%s", run_dir / "results.json",
                sts.format_table(rows))
    for r in images:
        logger.info("Image-text recall x100 on %s: %s", r["dataset"],
                    ", ".join(f"{k} {v:.1f}" for k, v in r.items() if "@" in k))
    return rows + images


def image_rows(final: Path, path: str, device: str | None = None) -> list[dict[str, Any]]:
    """Image-text Recall@1/5/10 of the export (with its image side) on one image-caption file."""
    model = ImageTextEncoder("student", final, device)
    return suite.run_image_text("student", model, [Path(path)])
