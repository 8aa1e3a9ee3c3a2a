"""STS and retrieval sets from the Hugging Face hub, in MTEB's layouts.

    STS         one config, columns sentence1, sentence2, score (e.g. mteb/stsbenchmark-sts)
    retrieval   configs "corpus" (_id, title?, text), "queries" (_id, text) and "default", the
                qrels (query-id, corpus-id, score) per split (e.g. mteb/scifact)

A data set is read with ``datasets.load_dataset``, so NAME may also be a local folder laid out like
a hub repo (data files, and a README.md whose YAML ``configs:`` map configs to files). The records
then go through the same rules as the folder loaders (:func:`mtd.evaluation.sts.load_sts`,
:func:`mtd.evaluation.retrieval.load_beir`); errors name ``<name>/<part>`` and the row (from 1).
``datasets`` is imported only here, when a hub set is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtd.errors import MtdError
from mtd.evaluation import sts
from mtd.evaluation.retrieval import BeirSet, BeirSources, Record, RetrievalFormatError, beir_from_records
from mtd.evaluation.sts import StsFormatError, StsSet

logger = logging.getLogger(__name__)

__all__ = ["HubDataError", "load_hub_beir", "load_hub_sts"]

STS_LAYOUT = "an STS folder: <split>.jsonl|csv|tsv with sentence1, sentence2, score"
BEIR_LAYOUT = "a BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv"


class HubDataError(MtdError, ValueError):
    """A hub data set cannot be loaded (unknown name, offline, missing config or split)."""


class MissingDatasetsError(HubDataError, ImportError):
    """--hub without the `datasets` package."""


def _load_dataset(name: str, config: str | None, split: str | None, layout: str) -> Any:
    """``datasets.load_dataset(name, config, split=split)``, with errors that say what to do."""
    try:
        import datasets
    except ImportError as exc:
        raise MissingDatasetsError(
            f"Loading the hub data set {name!r} needs the datasets package: pip install datasets "
            f"(or download the data and pass {layout} under --data)"
        ) from exc
    what = " ".join(p for p in (f"config {config!r}" if config else "",
                                f"split {split!r}" if split else "") if p)
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, missing config or split: all end here
        raise HubDataError(
            f"Cannot load the data set {name!r}{f' ({what})' if what else ''}: "
            f"{type(exc).__name__}: {exc}. Check the name and the connection to the hub "
            f"(HF_HUB_OFFLINE=1 allows only cached sets), or use a local folder instead: {layout}."
        ) from exc


def _set_name(name: str, split: str) -> str:
    """``<hub name>/<split>``; a local folder is named by its last component, as folders are."""
    path = Path(name)
    return f"{path.name if path.is_dir() else name.strip('/')}/{split}"


def _check_columns(columns: Sequence[str], needed: Sequence[str], error: type[ValueError],
                   where: str, layout: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise error(where, f"missing column(s) {', '.join(map(repr, missing))} (found {list(columns)}); "
                           f"expected {layout}")


def load_hub_sts(name: str, split: str = "test") -> StsSet:
    """The ``split`` of hub STS set ``name`` (columns sentence1, sentence2, score).

    Sentences must be strings and scores finite numbers, as in :func:`mtd.evaluation.sts.load_sts`. The set
    is named ``"<name>/<split>"`` (a local folder: ``"<folder name>/<split>"``).

    Raises:
        ImportError: ``datasets`` is not installed.
        HubDataError: the data set or split cannot be loaded.
        StsFormatError: a column is missing, a sentence is not a string, a score not a finite
            number, or the split is empty; the message names ``<name>/<split>`` and the row.
    """
    ds = _load_dataset(name, None, split, STS_LAYOUT)
    where = f"{name}/{split}"
    _check_columns(ds.column_names, sts.FIELDS, StsFormatError, where,
                   "the columns sentence1, sentence2, score (MTEB's STS layout)")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for row, rec in enumerate(ds.select_columns(list(sts.FIELDS)), start=1):
        try:
            s1.append(sts._sentence(Path(where), "sentence1", rec["sentence1"], row))
            s2.append(sts._sentence(Path(where), "sentence2", rec["sentence2"], row))
            scores.append(sts._score(Path(where), rec["score"], row))
        except StsFormatError as exc:  # the same checks as files; rows, not lines
            raise StsFormatError(exc.path, exc.problem, exc.line, unit="row") from None
    if not scores:
        raise StsFormatError(where, "empty split (no sentence pairs)")
    data = StsSet(_set_name(name, split), s1, s2, np.asarray(scores, dtype=np.float64))
    logger.info("loaded %s: %d pairs from the hub data set %s", data.name, len(data), name)
    return data


def _only_split(dd: Any, part: str, name: str, split: str) -> Any:
    """The split of a corpus/queries config: named like the part (MTEB), the only one, or ``split``."""
    for key in (part, *(list(dd) if len(dd) == 1 else []), split):
        if key in dd:
            return dd[key]
    raise RetrievalFormatError(
        f"{name}/{part}",
        f"the {part!r} config has splits {list(dd)}; expected one named {part!r} or {split!r}, "
        "or a single split",
    )


def _records(ds: Any, columns: Sequence[str]) -> Iterator[Record]:
    yield from enumerate(ds.select_columns([c for c in columns if c in ds.column_names]), start=1)


def load_hub_beir(name: str, split: str = "test") -> BeirSet:
    """The ``split`` of hub retrieval set ``name`` in MTEB's layout, validated like a BEIR folder.

    Reads the configs ``corpus`` and ``queries`` (their split named ``corpus``/``queries``, their
    only split, or ``split``) and the qrels from config ``default``, split ``split``. Documents
    are ``(title + " " + text).strip()``; only queries with a positive judgment are kept; ids are
    compared as text. The set is named ``"<name>/<split>"`` (a local folder: ``"<folder>/<split>"``).

    Raises:
        ImportError: ``datasets`` is not installed.
        HubDataError: the data set, a config or the split cannot be loaded.
        RetrievalFormatError: a column is missing or a record breaks
            :func:`mtd.evaluation.retrieval.load_beir`'s
            rules (duplicate or unknown ids, non-integer score, no positive judgment...); the
            message names ``<name>/corpus``, ``<name>/queries`` or ``<name>/qrels/<split>`` and the row.
    """
    where = BeirSources(f"{name}/corpus", f"{name}/queries", f"{name}/qrels/{split}", unit="row")
    layout = "MTEB's retrieval layout: configs corpus (_id, title, text), queries (_id, text), " \
             "default (query-id, corpus-id, score)"
    corpus = _only_split(_load_dataset(name, "corpus", None, BEIR_LAYOUT), "corpus", name, split)
    queries = _only_split(_load_dataset(name, "queries", None, BEIR_LAYOUT), "queries", name, split)
    qrels = _load_dataset(name, "default", split, BEIR_LAYOUT)
    for ds, source, needed in ((corpus, where.corpus, ("_id", "text")),
                               (queries, where.queries, ("_id", "text")),
                               (qrels, where.qrels, ("query-id", "corpus-id", "score"))):
        _check_columns(ds.column_names, needed, RetrievalFormatError, source, layout)
    return beir_from_records(
        _set_name(name, split),
        _records(corpus, ("_id", "title", "text")),
        _records(queries, ("_id", "text")),
        _records(qrels, ("query-id", "corpus-id", "score")),
        where=where,
    )
