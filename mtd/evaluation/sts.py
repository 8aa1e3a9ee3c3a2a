"""Semantic textual similarity (STS) evaluation.

Loads STS pair files (``.jsonl``, ``.csv``, ``.tsv`` with the fields ``sentence1``,
``sentence2`` and ``score``), scores any ``encode(list[str]) -> np.ndarray`` callable on them
(Spearman/Pearson x100 of the row-wise cosine similarity against the gold scores) and formats
results as a Markdown table.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from mtd.io import DataFormatError, jsonl_objects

logger = logging.getLogger(__name__)

__all__ = [
    "FIELDS",
    "SUFFIXES",
    "StsFormatError",
    "StsSet",
    "evaluate_sts",
    "find_sts_sets",
    "format_table",
    "load_sts",
    "pearson_cosine",
    "spearman_cosine",
    "st_encoder",
]

FIELDS = ("sentence1", "sentence2", "score")
SUFFIXES = (".jsonl", ".csv", ".tsv")

Encoder = Callable[[list[str]], np.ndarray]


class StsFormatError(DataFormatError):
    """An STS file or hub set cannot be read; the message names it and, where known, the line."""


@dataclass(frozen=True)
class StsSet:
    """One STS set: ``len(scores)`` sentence pairs with gold similarity scores."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if not (len(self.sentences1) == len(self.sentences2) == len(self.scores)):
            raise ValueError(
                f"StsSet {self.name!r}: column lengths differ "
                f"({len(self.sentences1)}, {len(self.sentences2)}, {len(self.scores)})"
            )

    def __len__(self) -> int:
        return len(self.scores)


# --------------------------------------------------------------------------- loading


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # utf-8-sig strips a leading BOM (3 bytes), which shifts exc.start by 3.
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise StsFormatError(
            path, f"not valid UTF-8 (byte 0x{data[offset]:02x} at byte offset {offset})", line
        ) from exc


def _score(path: Path, value: Any, line: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise StsFormatError(path, f"non-numeric score {value!r}", line)
    try:
        score = float(value)
    except ValueError:
        raise StsFormatError(path, f"non-numeric score {value!r}", line) from None
    if not math.isfinite(score):
        raise StsFormatError(path, f"score is not finite: {value!r}", line)
    return score


def _sentence(path: Path, key: str, value: Any, line: int) -> str:
    if not isinstance(value, str):
        raise StsFormatError(path, f"{key!r} must be a string, got {type(value).__name__}", line)
    return value


def _rows_jsonl(path: Path, text: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    return jsonl_objects(path, enumerate(text.splitlines(), start=1), StsFormatError, FIELDS)


def _rows_delimited(
    path: Path, text: str, delimiter: str
) -> Iterable[tuple[int, Mapping[str, Any]]]:
    # TSV files are read without quote handling (STS sentences contain stray '"'); CSV files
    # use standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader, None)
        if header is None:
            raise StsFormatError(path, "empty file")
        header = [h.strip() for h in header]
        missing = [k for k in FIELDS if k not in header]
        if missing:
            raise StsFormatError(
                path,
                f"header is missing column(s) {', '.join(map(repr, missing))} (found {header})",
                reader.line_num,
            )
        index = {k: header.index(k) for k in FIELDS}
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(header):
                raise StsFormatError(
                    path,
                    f"expected {len(header)} fields, got {len(row)}",
                    reader.line_num,
                )
            yield reader.line_num, {k: row[i] for k, i in index.items()}
    except csv.Error as exc:
        raise StsFormatError(path, f"malformed {path.suffix[1:]}: {exc}", reader.line_num) from None


def load_sts(path: str | os.PathLike[str]) -> StsSet:
    """Read an STS set from ``.jsonl``, ``.csv`` or ``.tsv``.

    JSONL: one object per line with ``sentence1``, ``sentence2``, ``score`` (extra keys are
    ignored, blank lines skipped). CSV/TSV: a header row naming those columns (in any order, extra
    columns allowed). The set is named ``"<parent dir>/<file stem>"``, e.g. ``"stsb/test"``.

    Raises:
        FileNotFoundError: the file does not exist.
        StsFormatError: unknown suffix, undecodable UTF-8, empty file, missing key/column,
            non-string sentence or non-numeric score; the message names the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StsFormatError(path, f"unsupported file type {path.suffix!r} (use {SUFFIXES})")
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise StsFormatError(path, "empty file")

    if suffix == ".jsonl":
        rows = _rows_jsonl(path, text)
    else:
        rows = _rows_delimited(path, text, "\t" if suffix == ".tsv" else ",")

    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for line_no, rec in rows:
        s1.append(_sentence(path, "sentence1", rec["sentence1"], line_no))
        s2.append(_sentence(path, "sentence2", rec["sentence2"], line_no))
        scores.append(_score(path, rec["score"], line_no))
    if not scores:
        raise StsFormatError(path, "empty file (no sentence pairs)")

    name = f"{path.parent.name}/{path.stem}"
    logger.debug("loaded %s: %d pairs from %s", name, len(scores), path)
    return StsSet(name, s1, s2, np.asarray(scores, dtype=np.float64))


def find_sts_sets(root: str | os.PathLike[str], split: str = "test") -> list[Path]:
    """Every ``<root>/**/<split>.{jsonl,csv,tsv}``, sorted.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no such file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"STS data directory not found: {root}")
    found = sorted(
        p
        for p in root.rglob(f"{split}.*")
        if p.is_file() and p.stem == split and p.suffix.lower() in SUFFIXES
    )
    if not found:
        exts = ",".join(s[1:] for s in SUFFIXES)
        raise FileNotFoundError(f"no STS sets named {split}.{{{exts}}} under {root}")
    return found


# --------------------------------------------------------------------------- scoring


def _row_cosine(emb1: Any, emb2: Any) -> np.ndarray:
    a = np.asarray(emb1, dtype=np.float64)
    b = np.asarray(emb2, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"embeddings must be two 2-D arrays of equal shape, got {a.shape}, {b.shape}"
        )
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", a, b)


def _check_scores(cos: np.ndarray, scores: Any) -> np.ndarray:
    gold = np.asarray(scores, dtype=np.float64).reshape(-1)
    if gold.shape[0] != cos.shape[0]:
        raise ValueError(f"{cos.shape[0]} embedding pairs but {gold.shape[0]} scores")
    if gold.shape[0] < 2:
        raise ValueError("need at least 2 pairs to compute a correlation")
    return gold


def spearman_cosine(emb1: Any, emb2: Any, scores: Any) -> float:
    """Spearman rank correlation x100 of row-wise cosine(emb1, emb2) against gold ``scores``."""
    cos = _row_cosine(emb1, emb2)
    gold = _check_scores(cos, scores)
    return float(stats.spearmanr(cos, gold).statistic) * 100.0


def pearson_cosine(emb1: Any, emb2: Any, scores: Any) -> float:
    """Pearson correlation x100 of row-wise cosine(emb1, emb2) against gold ``scores``."""
    cos = _row_cosine(emb1, emb2)
    gold = _check_scores(cos, scores)
    return float(stats.pearsonr(cos, gold).statistic) * 100.0


def evaluate_sts(encode: Encoder, sts: StsSet, batch_size: int | None = 64) -> dict[str, Any]:
    """Score ``encode`` on ``sts``.

    Each distinct sentence (across both columns, first-seen order) is encoded exactly once and
    the embeddings are mapped back to the pairs. ``encode`` is called on chunks of
    ``batch_size`` texts with a progress bar; ``batch_size=None`` makes one call with all texts
    (best for encoders that batch themselves, e.g. :func:`st_encoder`, which then sorts the
    whole set by length and shows its own progress bar).

    Returns:
        ``{"spearman": float, "pearson": float, "pairs": int}`` (correlations x100).
    """
    unique = list(dict.fromkeys([*sts.sentences1, *sts.sentences2]))
    if batch_size is None or batch_size >= len(unique):
        emb = np.asarray(encode(unique))
    else:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        starts = range(0, len(unique), batch_size)
        parts = [
            np.asarray(encode(unique[i : i + batch_size]))
            for i in tqdm(starts, desc=f"encode {sts.name}", unit="batch")
        ]
        emb = np.concatenate(parts, axis=0)
    if emb.ndim != 2 or emb.shape[0] != len(unique):
        raise ValueError(
            f"encoder returned shape {emb.shape} for {len(unique)} texts; expected (N, D)"
        )
    row = {text: i for i, text in enumerate(unique)}
    e1 = emb[[row[s] for s in sts.sentences1]]
    e2 = emb[[row[s] for s in sts.sentences2]]
    result = {
        "spearman": spearman_cosine(e1, e2, sts.scores),
        "pearson": pearson_cosine(e1, e2, sts.scores),
        "pairs": len(sts),
    }
    logger.info(
        "%s: spearman %.2f, pearson %.2f (%d pairs, %d unique sentences)",
        sts.name,
        result["spearman"],
        result["pearson"],
        len(sts),
        len(unique),
    )
    return result


def st_encoder(model: Any, batch_size: int = 64, prompt: str | None = None) -> Encoder:
    """An ``encode(list[str]) -> np.ndarray`` callable backed by a ``SentenceTransformer``."""

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            show_progress_bar=True,
            prompt=prompt,
        )

    return encode


# --------------------------------------------------------------------------- reporting


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of Spearman x100 (2 decimals): one row per model, one column per set.

    ``rows`` are records with at least ``model``, ``set`` and ``spearman`` (as written by
    ``eval.py``); models and sets keep first-seen order, missing cells are left empty.
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    cells = {(r["model"], r["set"]): f"{float(r['spearman']):.2f}" for r in rows}
    lines = [
        "| " + " | ".join(["model", *map(_cell, sets)]) + " |",
        "|" + "---|" + "---:|" * len(sets),
    ]
    for m in models:
        values = [cells.get((m, s), "") for s in sets]
        lines.append("| " + " | ".join([_cell(m), *values]) + " |")
    return "\n".join(lines)
