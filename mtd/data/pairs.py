"""Labeled text pairs for contrastive fine-tuning (in-batch negatives InfoNCE).

Each row is an (anchor, positive) pair of texts, optionally with a hard negative. Sources:

    jsonl     one ``{"anchor": ..., "positive": ...[, "negative": ...]}`` per line (field names
              are arguments); every row of all files has a negative, or none does
    STS       ``{"sentence1", "sentence2", "score"}`` lines (the ../shared/data/sts layout); rows
              scoring at least ``min_score`` become (sentence1, sentence2) pairs
    captions  image-caption files (the coco_mini layout): two captions of one image are a pair;
              the images are not opened
    hub       a ``datasets.load_dataset`` split (or a local folder laid out like a hub repo)

Groups: rows that share an anchor or positive text (exact string, after stripping), directly or
through other rows, form one group; a training batch must not use a row as the in-batch negative
of a row of its own group (the captions of one image, STS pairs that share a sentence).
Texts are stripped of surrounding whitespace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtd.data.image_text import load_image_text
from mtd.io import DataFormatError, jsonl_objects

logger = logging.getLogger(__name__)

_STS_FIELDS = ("sentence1", "sentence2", "score")


class PairsError(DataFormatError):
    """Pairs that cannot be used: the message names the source (file, hub set), the line or row
    where known, and the fix."""


@dataclass(frozen=True)
class Pairs:
    """N (anchor, positive[, negative]) text rows.

    anchor, positive: N texts each. negative: N texts, or None when no row has a hard negative.
    group: int64 (N,), numbered 0..G-1 in order of first appearance; rows of one group are never
    each other's in-batch negatives. name: what the rows were read from, for logs and messages.
    """

    anchor: list[str]
    positive: list[str]
    negative: list[str] | None
    group: np.ndarray = field(repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.anchor)
        if len(self.positive) != n or (self.negative is not None and len(self.negative) != n):
            raise ValueError(f"Pairs {self.name!r}: anchor, positive and negative lengths differ")
        if self.group.shape != (n,) or self.group.dtype != np.int64:
            raise ValueError(f"Pairs {self.name!r}: group must be int64 of shape ({n},), "
                             f"got {self.group.dtype} {self.group.shape}")

    def __len__(self) -> int:
        return len(self.anchor)


# --- groups -------------------------------------------------------------------------------------

def _find(parent: list[int], i: int) -> int:
    """Root of row i, halving the path on the way (amortized near-constant)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _groups(keys: Iterable[Iterable[Hashable]]) -> np.ndarray:
    """int64 (N,) group per row: rows sharing any key (directly or transitively) share a group.

    keys: per row, the hashables that tie it to other rows (its anchor and positive texts). Each
    root is the smallest row of its group, so groups are numbered in order of first appearance.
    """
    parent: list[int] = []
    first: dict[Hashable, int] = {}
    for i, row_keys in enumerate(keys):
        parent.append(i)
        for key in row_keys:
            a, b = _find(parent, first.setdefault(key, i)), _find(parent, i)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.fromiter((_find(parent, i) for i in range(len(parent))), np.int64, len(parent))
    return np.unique(roots, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _pairs(anchor: list[str], positive: list[str], negative: list[str] | None, name: str) -> Pairs:
    return Pairs(anchor, positive, negative, _groups(zip(anchor, positive, strict=True)), name)


def _name(paths: Sequence[Path]) -> str:
    return "+".join(f"{p.parent.name}/{p.stem}" for p in paths)


# --- files --------------------------------------------------------------------------------------

def _records(path: Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line of a jsonl file; PairsError names a bad one."""
    if not path.is_file():
        raise PairsError(path, "file not found; check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PairsError(path, f"not valid UTF-8 (byte offset {e.start}); save it as UTF-8") from None
    return jsonl_objects(path, enumerate(text.splitlines(), start=1), PairsError, required)


def _text(where: str | Path, value: Any, key: str, line: int, fix: str, unit: str = "line") -> str:
    """`value` stripped; a non-string or empty one is a PairsError naming field, line and fix."""
    if not isinstance(value, str):
        raise PairsError(where, f"{key!r} must be a string, got {type(value).__name__}. {fix}", line,
                         unit=unit)
    text = value.strip()
    if not text:
        raise PairsError(where, f"{key!r} is empty. Give every row a text, or drop the row. {fix}",
                         line, unit=unit)
    return text


def read_jsonl_pairs(paths: list[str], anchor: str = "anchor", positive: str = "positive",
                     negative: str = "negative") -> Pairs:
    """Pairs from jsonl files: one object per line with `anchor` and `positive` strings and,
    optionally, a `negative` string (a null negative counts as none). Blank lines are skipped.

    Raises:
        PairsError: a missing file, bad JSON, a missing field, a non-string or empty text
            (naming file, line and field); negatives on some rows but not others (naming the first
            row without one); no rows at all.
    """
    fix = (f"The field names are set by anchor={anchor!r}, positive={positive!r}, "
           f"negative={negative!r}.")
    files = [Path(p) for p in paths]
    a: list[str] = []
    b: list[str] = []
    neg: list[str | None] = []
    first: dict[bool, tuple[Path, int]] = {}  # has a negative -> (file, line) of the first such row
    for path in files:
        for line, rec in _records(path):
            missing = [k for k in (anchor, positive) if k not in rec]
            if missing:
                raise PairsError(path, f"missing field(s) {missing} (found {sorted(rec)}). {fix}", line)
            a.append(_text(path, rec[anchor], anchor, line, fix))
            b.append(_text(path, rec[positive], positive, line, fix))
            value = rec.get(negative)
            neg.append(None if value is None else _text(path, value, negative, line, fix))
            first.setdefault(value is not None, (path, line))
    if not a:
        raise PairsError(_name(files) or "read_jsonl_pairs", "no pairs (every file is empty); give "
                         "files with one JSON object per line")
    _all_or_none(first, neg, negative)
    return _pairs(a, b, None if first.get(False) else neg, _name(files))  # type: ignore[arg-type]


def _all_or_none(first: dict[bool, tuple[Path, int]], neg: list[str | None], key: str) -> None:
    """A PairsError naming the first row without a negative when another row has one."""
    if len(first) == 2:
        (path, line), (has, has_line) = first[False], first[True]
        raise PairsError(path, f"no {key!r} field, while {has} line {has_line} has one: every row "
                         f"needs a hard negative or none does. Add {key!r} to every row, or drop it "
                         f"from all rows ({neg.count(None)} of {len(neg)} lack it)", line)


def _sts_file(path: Path) -> Path:
    """A folder stands for its train.jsonl."""
    return path / "train.jsonl" if path.is_dir() else path


def _score(path: Path, value: Any, line: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PairsError(path, f"'score' must be a finite number, got {value!r}; fix or drop the row",
                         line)
    return float(value)


def _sentence(path: Path, value: Any, key: str, line: int, fix: str) -> str:
    """`value` stripped (maybe empty: such rows are skipped); a non-string is a PairsError."""
    return value.strip() if isinstance(value, str) else _text(path, value, key, line, fix)


def _read_sts_file(path: Path, min_score: float) -> tuple[list[str], list[str], int]:
    """(sentence1s, sentence2s, rows skipped for an empty sentence) of rows scoring >= min_score."""
    fix = "STS lines are {\"sentence1\": str, \"sentence2\": str, \"score\": number}."
    s1: list[str] = []
    s2: list[str] = []
    empty, best = 0, -math.inf
    for line, rec in _records(path, _STS_FIELDS):
        score = _score(path, rec["score"], line)
        texts = [_sentence(path, rec[k], k, line, fix) for k in _STS_FIELDS[:2]]
        best = max(best, score)
        if score < min_score:
            continue
        if not all(texts):
            empty += 1
            continue
        s1.append(texts[0])
        s2.append(texts[1])
    if not s1:
        found = "no rows" if best == -math.inf else f"the highest score is {best:g}"
        raise PairsError(path, f"no pair with a non-empty sentence scores at least min_score="
                         f"{min_score:g} ({found}); lower min_score or choose another file")
    return s1, s2, empty


def read_sts_pairs(paths: list[str], min_score: float) -> Pairs:
    """Pairs from STS jsonl files (``{"sentence1", "sentence2", "score"}`` per line; a path may be a
    folder holding train.jsonl): every row scoring at least `min_score` is a (sentence1,
    sentence2) pair, without negatives. Rows with an empty sentence are skipped and counted.

    Raises:
        PairsError: a missing file, bad JSON, a missing field, a non-string sentence, a score that
            is not a finite number, or a file where no row passes (naming its highest score).
    """
    files = [_sts_file(Path(p)) for p in paths]
    a: list[str] = []
    b: list[str] = []
    empty = 0
    for path in files:
        s1, s2, skipped = _read_sts_file(path, min_score)
        a += s1
        b += s2
        empty += skipped
    if empty:
        logger.warning("STS pairs %s: skipped %d rows with an empty sentence", _name(files), empty)
    logger.info("STS pairs %s: %d pairs scoring >= %g", _name(files), len(a), min_score)
    return _pairs(a, b, None, _name(files))


def _caption_pairs(captions: list[str]) -> list[tuple[str, str]]:
    """n >= 3 captions: the ring (c_k, c_{k+1 mod n}); two captions: one pair; fewer: none."""
    n = len(captions)
    if n == 2:
        return [(captions[0], captions[1])]
    return [(captions[k], captions[(k + 1) % n]) for k in range(n)] if n > 2 else []


def read_caption_pairs(paths: list[str]) -> Pairs:
    """Pairs of captions of one image from image-caption jsonl files (the coco_mini layout,
    read by :func:`mtd.data.image_text.load_image_text`; the images are not opened).

    An image with captions c0..c{n-1} gives (c_k, c_{(k+1) % n}) for each k when n > 2, (c0, c1)
    when n == 2. Empty captions are dropped (counted); images left with fewer than 2 captions are
    skipped (counted). No negatives.

    Raises:
        PairsError: a missing file, or no image with 2 captions in all the files.
        ImageTextFormatError: a malformed line (naming file and line).
    """
    files = [Path(p) for p in paths]
    rows: list[tuple[str, str]] = []
    empty = few = 0
    for path in files:
        if not path.is_file():
            raise PairsError(path, "image-caption file not found; check the path")
        data = load_image_text(path)
        per_image: list[list[str]] = [[] for _ in range(data.n_images)]
        for caption, image in zip(data.captions, data.caption_image.tolist(), strict=True):
            per_image[image].append(caption.strip())
        for caps in per_image:
            kept = [c for c in caps if c]
            empty += len(caps) - len(kept)
            few += len(kept) < 2
            rows += _caption_pairs(kept)
    if empty or few:
        logger.warning("Caption pairs %s: dropped %d empty captions; skipped %d images with fewer than "
                       "2 captions", _name(files), empty, few)
    if not rows:
        raise PairsError(_name(files) or "read_caption_pairs", "no image has 2 non-empty captions, so "
                         "there are no pairs; give files with several captions per image")
    return _pairs([r[0] for r in rows], [r[1] for r in rows], None, _name(files))


# --- hub ----------------------------------------------------------------------------------------

def read_hub_pairs(name: str, split: str, anchor: str, positive: str, negative: str | None) -> Pairs:
    """Pairs from the `split` of hub data set `name` (or a local folder laid out like a hub repo):
    text columns `anchor`, `positive` and, when given, `negative`. Errors name ``name/split``
    and the row (from 1).

    Raises:
        PairsError: the set cannot be loaded, a column is missing (listing the columns present),
            or a value is not a non-empty string (datasets itself refuses an empty split).
    """
    import datasets

    where = f"{name}/{split}"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for a missing repo, config or split
        raise PairsError(where, f"cannot be loaded ({type(e).__name__}: {e}). Check the name and the "
                         "split, or give a local folder of data files (jsonl, parquet, csv; not a "
                         "save_to_disk folder: write one with to_parquet)") from None
    columns = [c for c in (anchor, positive, negative) if c is not None]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise PairsError(where, f"no column(s) {missing}; its columns: {ds.column_names}. Set the "
                         "anchor/positive/negative column names to some of these")
    fix = f"Columns used: anchor={anchor!r}, positive={positive!r}, negative={negative!r}."
    ds = ds.select_columns(columns)
    texts = [[_text(where, v, c, row, fix, unit="row") for row, v in enumerate(ds[c], start=1)]
             for c in columns]
    out = _pairs(texts[0], texts[1], texts[2] if negative is not None else None, where)
    logger.info("Hub pairs %s: %d pairs", where, len(out))
    return out


# --- combining ----------------------------------------------------------------------------------

def _check_negatives(parts: list[Pairs]) -> bool:
    """Whether the parts have negatives: all of them, or none (else a PairsError)."""
    lack = [p.name for p in parts if p.negative is None]
    if lack and len(lack) < len(parts):
        have = [p.name for p in parts if p.negative is not None]
        raise PairsError("combine", f"the sources {lack} have no hard negatives while {have} have: "
                         "give hard negatives for all sources, or none")
    return not lack


def _subset(pairs: Pairs, rows: np.ndarray) -> Pairs:
    """The given rows (sorted), groups renumbered 0..G-1."""
    take = rows.tolist()
    negative = None if pairs.negative is None else [pairs.negative[i] for i in take]
    group = np.unique(pairs.group[rows], return_inverse=True)[1].astype(np.int64).reshape(-1)
    return Pairs([pairs.anchor[i] for i in take], [pairs.positive[i] for i in take], negative, group,
                 pairs.name)


def combine(parts: list[Pairs], max_pairs: int | None = None, seed: int = 0) -> Pairs:
    """The parts' rows, in order, as one Pairs; with `max_pairs`, a random subset of that many rows
    drawn with `seed` (kept in order). Groups of different parts stay distinct, except that rows
    of different parts sharing a text are joined too (one sentence is never its own negative).
    Groups are computed on all rows before the subset is drawn.

    Raises:
        PairsError: some parts have hard negatives and others not; no rows; max_pairs < 1.
    """
    if max_pairs is not None and max_pairs < 1:
        raise PairsError("combine", f"max_pairs={max_pairs}; give at least 1, or None for all pairs")
    if not parts or not sum(map(len, parts)):
        raise PairsError("combine", "no pairs in any source; give at least one non-empty source")
    with_negatives = _check_negatives(parts)
    anchor = [t for p in parts for t in p.anchor]
    positive = [t for p in parts for t in p.positive]
    negative = [t for p in parts for t in p.negative] if with_negatives else None  # type: ignore[union-attr]
    own = [(k, g) for k, p in enumerate(parts) for g in p.group.tolist()]
    group = _groups(zip(anchor, positive, own, strict=True))
    out = Pairs(anchor, positive, negative, group, "+".join(p.name for p in parts))
    if max_pairs is None or max_pairs >= len(out):
        return out
    rows = np.sort(np.random.default_rng(seed).choice(len(out), size=max_pairs, replace=False))
    return _subset(out, rows)
