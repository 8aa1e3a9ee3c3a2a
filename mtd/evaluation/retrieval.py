"""Retrieval evaluation in the BEIR/MTEB convention.

Loads a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), encodes queries
and documents with any ``encode(list[str]) -> np.ndarray`` callables, searches a FAISS index
(exact, HNSW or IVF-PQ) on L2-normalized vectors by inner product (= cosine similarity) and
scores the top-k run with pytrec_eval: nDCG@10, MRR@10, Recall@1/10/100 and MAP@100, all x100 and
averaged over the judged queries. :func:`beir_from_records` holds the loading rules, so a hub data
set in MTEB's layout (:mod:`mtd.evaluation.hub`) is validated exactly like a folder.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytrec_eval
from tqdm.auto import tqdm

from mtd.io import DataFormatError, jsonl_objects

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_KINDS",
    "METRICS",
    "BeirSet",
    "BeirSources",
    "RetrievalFormatError",
    "beir_from_records",
    "build_index",
    "default_nlist",
    "default_pq_m",
    "evaluate_retrieval",
    "load_beir",
    "recall_vs_exact",
    "retrieval_metrics",
    "search",
]

INDEX_KINDS = ("flat", "hnsw", "ivfpq")
# Our metric name -> pytrec_eval measure it is read from ("mrr@10" is recip_rank on a run cut to
# the top 10, see retrieval_metrics).
METRICS = {
    "ndcg@10": "ndcg_cut_10",
    "mrr@10": "recip_rank",
    "recall@1": "recall_1",
    "recall@10": "recall_10",
    "recall@100": "recall_100",
    "map@100": "map_cut_100",
}
QRELS_HEADER = ("query-id", "corpus-id", "score")
_LAYOUT = "corpus.jsonl, queries.jsonl and qrels/<split>.tsv (BEIR layout)"
_SEARCH_BATCH = 4096  # queries per FAISS call: bounds the (batch, k) result buffers

Encoder = Callable[[list[str]], np.ndarray]


class RetrievalFormatError(DataFormatError):
    """A BEIR file or hub set cannot be used; the message names it and, where known, the line."""


@dataclass(frozen=True)
class BeirSet:
    """One BEIR split: the corpus, the judged queries and their relevance judgments.

    ``corpus_texts[i]`` is ``(title + " " + text).strip()`` (just ``text.strip()`` without a
    title), as BEIR and MTEB feed documents to bi-encoders. ``query_ids`` holds only queries with
    at least one positive (score > 0) judgment, and ``qrels`` only their judgments:
    ``qrels[query_id][corpus_id] = score``.
    """

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str] = field(repr=False)
    query_ids: list[str]
    query_texts: list[str] = field(repr=False)
    qrels: dict[str, dict[str, int]] = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.corpus_ids) != len(self.corpus_texts):
            raise ValueError(
                f"BeirSet {self.name!r}: {len(self.corpus_ids)} corpus ids "
                f"but {len(self.corpus_texts)} texts"
            )
        if len(self.query_ids) != len(self.query_texts):
            raise ValueError(
                f"BeirSet {self.name!r}: {len(self.query_ids)} query ids "
                f"but {len(self.query_texts)} texts"
            )


# --------------------------------------------------------------------------- loading


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line, decoding line by line.

    Decoding each line on its own (instead of opening in text mode) keeps memory flat on large
    corpora and lets an encoding error name its exact line.
    """
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # BOM
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RetrievalFormatError(
                    path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", line_no
                ) from None
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_no, text


Record = tuple[int, Mapping[str, Any]]  # (line or row number from 1, record)


@dataclass(frozen=True)
class BeirSources:
    """What errors about a BEIR set's records name: one source per part, and what rows are called.

    Files: the three paths and ``unit="line"``. Hub splits: ``<name>/corpus``, ``<name>/queries``,
    ``<name>/qrels/<split>`` and ``unit="row"``. Messages about unknown qrels ids refer to the
    queries and corpus by the last component of their source (``queries.jsonl``, ``queries``).
    """

    corpus: str | os.PathLike[str]
    queries: str | os.PathLike[str]
    qrels: str | os.PathLike[str]
    unit: str = "line"


def _record_id(path: Path, record: Mapping[str, Any], line: int, unit: str) -> str:
    value = record["_id"]
    # Some BEIR exports write numeric ids; qrels always hold them as text, so compare as text.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RetrievalFormatError(
            path, f"'_id' must be a string, got {type(value).__name__}", line, unit=unit
        )
    value = str(value)
    if not value.strip():
        raise RetrievalFormatError(path, "'_id' is empty", line, unit=unit)
    return value


def _jsonl_records(path: Path) -> Iterator[Record]:
    """(line number, object) for each line of a BEIR corpus.jsonl or queries.jsonl."""
    lines = tqdm(_lines(path), desc=f"read {path.name}", unit=" lines", leave=False)
    return jsonl_objects(path, lines, RetrievalFormatError)


def _ids_and_texts(
    path: str | os.PathLike[str], records: Iterable[Record], kind: str, unit: str
) -> tuple[list[str], list[str]]:
    """(ids, texts) of corpus (kind="corpus") or queries (kind="queries") records."""
    path = Path(path)
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, record in records:
        missing = [key for key in ("_id", "text") if key not in record]
        if missing:
            raise RetrievalFormatError(
                path, f"missing key(s) {', '.join(map(repr, missing))}", line_no, unit=unit
            )
        doc_id = _record_id(path, record, line_no, unit)
        if doc_id in first_line:
            raise RetrievalFormatError(
                path,
                f"duplicate _id {doc_id!r} (first on {unit} {first_line[doc_id]})",
                line_no,
                unit=unit,
            )
        first_line[doc_id] = line_no
        ids.append(doc_id)
        texts.append(_record_text(path, record, kind, line_no, unit))
    return ids, texts


def _record_text(path: Path, record: Mapping[str, Any], kind: str, line: int, unit: str) -> str:
    text = record["text"]
    if not isinstance(text, str):
        raise RetrievalFormatError(
            path, f"'text' must be a string, got {type(text).__name__}", line, unit=unit
        )
    title = record.get("title") if kind == "corpus" else None
    if title is None or title == "":
        return text.strip()
    if not isinstance(title, str):
        raise RetrievalFormatError(
            path, f"'title' must be a string, got {type(title).__name__}", line, unit=unit
        )
    # BEIR/MTEB join with a single space and strip, so an empty text leaves just the title.
    return f"{title} {text}".strip()


def _qrels_records(path: Path) -> Iterator[Record]:
    """(line number, {query-id, corpus-id, score} as text) for each judgment of a BEIR qrels tsv."""
    lines = _lines(path)
    header = next(lines, None)
    if header is None:
        raise RetrievalFormatError(path, "empty file (expected a header row and judgments)")
    columns = tuple(c.strip().lower() for c in header[1].split("\t"))
    if columns != QRELS_HEADER:
        raise RetrievalFormatError(
            path,
            f"header must be {chr(9).join(QRELS_HEADER)!r} (tab separated), got {header[1]!r}",
            header[0],
        )
    for line_no, raw in lines:
        fields = raw.split("\t")
        if len(fields) != 3:
            raise RetrievalFormatError(
                path, f"expected 3 tab-separated fields, got {len(fields)}", line_no
            )
        yield line_no, dict(zip(QRELS_HEADER, (f.strip() for f in fields), strict=True))


def _qrels_id(path: Path, record: Mapping[str, Any], key: str, line: int, unit: str) -> str:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RetrievalFormatError(
            path, f"{key!r} must be a string, got {type(value).__name__}", line, unit=unit
        )
    return str(value).strip()


def _qrels_score(path: Path, value: Any, line: int, unit: str) -> int:
    """An integer grade: an int, the text of one, or (typed hub columns) an integral float."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    raise RetrievalFormatError(path, f"score must be an integer, got {value!r}", line, unit=unit)


def _collect_qrels(
    path: str | os.PathLike[str], records: Iterable[Record], unit: str
) -> dict[str, dict[str, tuple[int, int]]]:
    """qrels[query_id][corpus_id] = (score, line number), from {query-id, corpus-id, score} records."""
    path = Path(path)
    qrels: dict[str, dict[str, tuple[int, int]]] = {}
    for line_no, record in records:
        missing = [key for key in QRELS_HEADER if key not in record]
        if missing:
            raise RetrievalFormatError(
                path, f"missing key(s) {', '.join(map(repr, missing))}", line_no, unit=unit
            )
        query_id = _qrels_id(path, record, "query-id", line_no, unit)
        corpus_id = _qrels_id(path, record, "corpus-id", line_no, unit)
        score = _qrels_score(path, record["score"], line_no, unit)
        seen = qrels.setdefault(query_id, {}).get(corpus_id)
        if seen is None:
            qrels[query_id][corpus_id] = (score, line_no)
        elif seen[0] != score:
            # An identical repeat is harmless; two different grades for one pair are ambiguous.
            raise RetrievalFormatError(
                path,
                f"({query_id!r}, {corpus_id!r}) judged {score} here and {seen[0]} on {unit} {seen[1]}",
                line_no,
                unit=unit,
            )
    return qrels


def _check_qrels_ids(
    where: BeirSources,
    qrels: Mapping[str, Mapping[str, tuple[int, int]]],
    query_ids: set[str],
    corpus_ids: set[str],
) -> None:
    """Raise naming the first few qrels ids absent from the queries / corpus."""
    pairs = [(q, d, line) for q, docs in qrels.items() for d, (_, line) in docs.items()]
    for kind, column, known, source in (
        ("query", 0, query_ids, where.queries),
        ("corpus", 1, corpus_ids, where.corpus),
    ):
        unknown = [p for p in pairs if p[column] not in known]
        if not unknown:
            continue
        distinct = list(dict.fromkeys(p[column] for p in unknown))
        shown = ", ".join(repr(i) for i in distinct[:5])
        more = f" and {len(distinct) - 5} more" if len(distinct) > 5 else ""
        file = Path(source).name
        raise RetrievalFormatError(
            where.qrels,
            f"{len(distinct)} {kind} id(s) not in {file}: {shown}{more} "
            f"(fix the qrels, or use the {file} they were made for)",
            min(p[2] for p in unknown),
            unit=where.unit,
        )


def _require_layout(folder: Path, split: str) -> tuple[Path, Path, Path]:
    paths = (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv")
    if not folder.is_dir():
        raise RetrievalFormatError(folder, f"not a directory; a BEIR folder holds {_LAYOUT}")
    missing = [str(p.relative_to(folder)) for p in paths if not p.is_file()]
    if missing:
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        hint = f" (qrels splits present: {', '.join(splits)})" if splits else ""
        raise RetrievalFormatError(
            folder, f"missing {', '.join(missing)}; a BEIR folder holds {_LAYOUT}{hint}"
        )
    return paths


def load_beir(folder: str | os.PathLike[str], split: str = "test") -> BeirSet:
    """Read a BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

    Only queries with at least one positive (score > 0) judgment are kept, as BEIR does; queries
    keep their ``queries.jsonl`` order. The set is named ``"<folder name>/<split>"``.

    Raises:
        RetrievalFormatError: a file is missing, a line is not a JSON object, ``_id``/``text`` is
            missing or not a string, an id repeats, the qrels header or a score is malformed, the
            qrels name unknown query/corpus ids, the corpus is empty or no query has a positive
            judgment. The message names the file and, where known, the line.
    """
    folder = Path(folder)
    corpus_path, queries_path, qrels_path = _require_layout(folder, split)
    return beir_from_records(
        f"{folder.name}/{split}",
        _jsonl_records(corpus_path),
        _jsonl_records(queries_path),
        _qrels_records(qrels_path),
        where=BeirSources(corpus_path, queries_path, qrels_path),
    )


def beir_from_records(
    name: str,
    corpus: Iterable[Record],
    queries: Iterable[Record],
    qrels: Iterable[Record],
    *,
    where: BeirSources,
) -> BeirSet:
    """A validated :class:`BeirSet` from ``(line or row number, record)`` pairs.

    ``corpus`` and ``queries`` records hold ``_id`` (string or integer) and ``text``, corpus ones
    optionally ``title``; ``qrels`` records hold ``query-id``, ``corpus-id`` and an integer
    ``score``. They are read in that order, once (iterators are fine). The rules of
    :func:`load_beir` apply whatever the source: titles joined, ids unique, qrels ids known, only
    queries with a positive judgment kept. Errors name ``where``'s source and the line/row.
    """
    unit = where.unit
    corpus_ids, corpus_texts = _ids_and_texts(where.corpus, corpus, "corpus", unit)
    if not corpus_ids:
        raise RetrievalFormatError(where.corpus, "empty corpus (no documents)")
    all_query_ids, all_query_texts = _ids_and_texts(where.queries, queries, "queries", unit)
    judged = _collect_qrels(where.qrels, qrels, unit)
    _check_qrels_ids(where, judged, set(all_query_ids), set(corpus_ids))

    # pytrec_eval would score a query with no positive as 0 and drag the mean down; BEIR drops them.
    positive = {q for q, docs in judged.items() if any(s > 0 for s, _ in docs.values())}
    keep = [i for i, q in enumerate(all_query_ids) if q in positive]
    if not keep:
        raise RetrievalFormatError(
            where.qrels,
            f"no query has a positive (score > 0) judgment, so there is nothing to evaluate "
            f"({len(judged)} judged queries); check the split and the score column",
        )
    query_ids = [all_query_ids[i] for i in keep]
    qrels_kept = {q: {d: s for d, (s, _) in judged[q].items()} for q in query_ids}
    logger.info(
        "loaded %s: %d documents, %d of %d queries evaluated (the rest have no positive judgment)",
        name,
        len(corpus_ids),
        len(query_ids),
        len(all_query_ids),
    )
    empty = sum(1 for t in corpus_texts if not t)
    if empty:
        logger.warning("%s: %d documents have empty text and title", where.corpus, empty)
    return BeirSet(
        name, corpus_ids, corpus_texts, query_ids, [all_query_texts[i] for i in keep], qrels_kept
    )


# --------------------------------------------------------------------------- indexes

_INDEX_PARAMS = {
    "flat": {},
    "hnsw": {"M": 32, "efConstruction": 40, "efSearch": 128},
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": 16},
}


def _unit_rows(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """``x`` (N, D) as a fresh C-contiguous float32 array with unit-norm rows.

    A copy, so the caller's array is untouched; FAISS only takes float32. Zero rows stay zero.
    """
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array (N, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{what} must be floating point (float16/32/64), got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{what} have dimension {arr.shape[1]} but the index holds {dim}-d vectors; "
            "encode queries and corpus with the same model"
        )
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out).all(axis=1)).sum())
        raise ValueError(f"{what}: {bad} row(s) contain NaN or inf (after casting to float32)")
    faiss.normalize_L2(out)
    return out


def _index_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in _INDEX_PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {INDEX_KINDS}")
    unknown = sorted(set(params) - set(_INDEX_PARAMS[kind]))
    if unknown:
        allowed = ", ".join(_INDEX_PARAMS[kind]) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for a {kind!r} index (allowed: {allowed})")
    return {**_INDEX_PARAMS[kind], **params}


def default_pq_m(dim: int) -> int:
    """Subquantizers for IVF-PQ: the largest divisor of ``dim`` that is <= dim / 8.

    That is dim / 8 (8 dimensions per 1-byte code, a common size/recall trade-off: 48 bytes per
    384-d vector) whenever 8 divides ``dim``; otherwise the next smaller divisor, since FAISS
    needs ``dim % m == 0``.
    """
    target = max(1, dim // 8)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about 4 * sqrt(n), capped so each list gets >= 39 training points.

    FAISS's k-means warns below 39 points per centroid; the cap keeps small corpora well trained.
    """
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _ivfpq(x: np.ndarray, nlist: int | None, m: int | None, nbits: int, nprobe: int) -> faiss.Index:
    n, dim = x.shape
    nlist = default_nlist(n) if nlist is None else int(nlist)
    m = default_pq_m(dim) if m is None else int(m)
    if dim % m:
        raise ValueError(f"IVF-PQ needs m to divide the dimension: {dim} % {m} != 0")
    if not 1 <= nlist <= n:
        raise ValueError(f"IVF-PQ nlist must be in [1, {n}] for {n} vectors, got {nlist}")
    if n < 2**nbits:
        # FAISS's k-means refuses fewer points than centroids (2**nbits per subquantizer).
        raise ValueError(
            f"IVF-PQ with nbits={nbits} needs at least {2**nbits} corpus vectors to train, got {n}; "
            "use kind='flat' for a corpus this small, or pass a smaller nbits"
        )
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.nprobe = min(int(nprobe), nlist)
    logger.info("IVF-PQ: nlist=%d, m=%d, nbits=%d, nprobe=%d", nlist, m, nbits, index.nprobe)
    return index


def build_index(vectors: Any, kind: str = "flat", **params: Any) -> faiss.Index:
    """A FAISS inner-product index over ``vectors`` (N, D), L2-normalized first (cosine scores).

    Kinds and their ``params`` (defaults in brackets):

    - ``"flat"``: exact search (``IndexFlatIP``); no parameters.
    - ``"hnsw"``: ``IndexHNSWFlat`` graph; ``M`` [32], ``efConstruction`` [40, FAISS's],
      ``efSearch`` [128].
    - ``"ivfpq"``: ``IndexIVFPQ`` trained on ``vectors``; ``nlist`` [:func:`default_nlist`],
      ``m`` subquantizers [:func:`default_pq_m`], ``nbits`` [8], ``nprobe`` [16].

    Raises:
        ValueError: unknown kind or parameter, empty/non-2-D/non-finite vectors, or IVF-PQ
            parameters that do not fit the data (``D % m``, too few vectors to train).
        TypeError: non-floating-point vectors.
    """
    p = _index_params(kind, params)
    x = _unit_rows(vectors, "corpus vectors")
    n, dim = x.shape
    start = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["efConstruction"])
        index.hnsw.efSearch = int(p["efSearch"])
    else:
        index = _ivfpq(x, p["nlist"], p["m"], int(p["nbits"]), int(p["nprobe"]))
    index.add(x)
    logger.info(
        "built %s index over %d x %d vectors in %.2fs", kind, n, dim, time.perf_counter() - start
    )
    return index


def search(index: faiss.Index, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product of the L2-normalized ``queries`` (Q, D) against ``index``.

    ``k`` is capped at the index size. Returns ``(scores, indices)``, both (Q, min(k, N)), best
    first; scores are float32 cosine similarities, indices int64 rows of the indexed vectors, -1
    where an approximate index found fewer than k neighbours.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if index.ntotal == 0:
        raise ValueError("the index is empty; build it with build_index(corpus_vectors)")
    q = _unit_rows(queries, "query vectors", dim=index.d)
    k = min(int(k), index.ntotal)
    scores = np.empty((len(q), k), dtype=np.float32)
    indices = np.empty((len(q), k), dtype=np.int64)
    starts = range(0, len(q), _SEARCH_BATCH)
    for i in tqdm(starts, desc="search", unit="batch", disable=len(starts) < 2):
        scores[i : i + _SEARCH_BATCH], indices[i : i + _SEARCH_BATCH] = index.search(
            q[i : i + _SEARCH_BATCH], k
        )
    return scores, indices


# --------------------------------------------------------------------------- metrics


def _top(docs: Mapping[str, float], n: int) -> dict[str, float]:
    """The ``n`` best of one query's run, ranked the way trec_eval ranks.

    trec_eval sorts by score descending and breaks ties by doc id descending; cutting in the same
    order keeps recip_rank on the cut run equal to trec_eval's own ranking.
    """
    ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return dict(ranked[:n])


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@1/10/100 and MAP@100 (x100) of ``run`` against ``qrels``.

    ``qrels[query_id][doc_id]`` is an integer grade (> 0 relevant); ``run[query_id][doc_id]`` a
    score, higher is better. All measures come from pytrec_eval (trec_eval semantics: nDCG gain is
    the grade, discount log2(rank + 1)); MRR@10 is ``recip_rank`` on the run cut to each query's
    top 10, MAP@100 is ``map_cut_100`` (MTEB's ``map_at_100``; on a top-100 run it equals MAP).

    The mean is over the qrels queries with at least one positive judgment, as in BEIR; one the
    run leaves out (or retrieves nothing for) scores 0 -- pytrec_eval alone would skip it and
    inflate the mean. Run queries absent from the qrels are ignored.

    Returns:
        ``{"ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100"}`` -> float.
    """
    judged = {
        str(q): {str(d): int(s) for d, s in docs.items()}
        for q, docs in qrels.items()
        if any(s > 0 for s in docs.values())
    }
    if not judged:
        raise ValueError("qrels hold no query with a positive (> 0) judgment; nothing to evaluate")
    scored = {
        str(q): {str(d): float(s) for d, s in docs.items()}
        for q, docs in run.items()
        if str(q) in judged
    }
    per_query = pytrec_eval.RelevanceEvaluator(
        judged, {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}
    ).evaluate(scored)
    cut = {q: _top(docs, 10) for q, docs in scored.items()}
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(cut)
    result = {}
    for name, measure in METRICS.items():
        source = rr if name == "mrr@10" else per_query
        total = sum(source.get(q, {}).get(measure, 0.0) for q in judged)
        result[name] = 100.0 * total / len(judged)
    return result


# --------------------------------------------------------------------------- evaluation


def _encode(encode: Encoder, texts: list[str], what: str) -> np.ndarray:
    start = time.perf_counter()
    emb = np.asarray(encode(texts))
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(
            f"the {what} encoder returned shape {emb.shape} for {len(texts)} texts; expected (N, D)"
        )
    logger.info("encoded %d %s in %.1fs", len(texts), what, time.perf_counter() - start)
    return emb


def _run(data: BeirSet, scores: np.ndarray, indices: np.ndarray) -> dict[str, dict[str, float]]:
    """Search results (Q, k) as a pytrec_eval run: run[query_id][corpus_id] = score."""
    ids = data.corpus_ids
    return {
        q: {ids[j]: float(s) for s, j in zip(row_s, row_i, strict=True) if j >= 0}
        for q, row_s, row_i in zip(data.query_ids, scores, indices, strict=True)
    }


def recall_vs_exact(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> float:
    """Mean fraction (x100) of each query's exact top-``k`` that the approximate top-``k`` holds.

    ``exact`` and ``approx`` are (Q, >= k) corpus row indices, best first; -1 (no result) never
    counts. Rows stand for doc ids one-to-one (ids are unique), so this is recall by doc id.
    """
    fractions = []
    for e, a in zip(exact[:, :k], approx[:, :k], strict=True):
        truth = set(e[e >= 0].tolist())
        fractions.append(len(truth & set(a.tolist())) / len(truth) if truth else 1.0)
    return 100.0 * float(np.mean(fractions))


def evaluate_retrieval(
    encode_queries: Encoder,
    encode_corpus: Encoder,
    data: BeirSet,
    *,
    index: str = "flat",
    k: int = 100,
    index_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode ``data``, search the top ``k`` documents per query and score the run.

    ``encode_queries``/``encode_corpus`` map a list of N texts to an (N, D) array (prompts,
    batching and caching are the caller's); they are called once each, with all texts. No
    document is excluded from a query's results (unlike BEIR's optional "ignore identical ids":
    in CISI, query and document ids are separate namespaces that happen to overlap).

    For an approximate ``index`` ("hnsw", "ivfpq"), an exact flat index is searched too and
    ``"recall@10_vs_exact"`` reports how much of the exact top 10 the index recovers (x100).

    Returns:
        :func:`retrieval_metrics`' keys plus ``queries``, ``corpus``, ``index``, ``k``,
        ``index_seconds``, ``search_seconds`` (the top-k search alone) and, for approximate
        indexes, ``recall@10_vs_exact``.
    """
    if k < 100:
        logger.warning("k=%d < 100: recall@100 and map@100 only see the top %d", k, k)
    corpus = _encode(encode_corpus, data.corpus_texts, "documents")
    queries = _encode(encode_queries, data.query_texts, "queries")
    start = time.perf_counter()
    built = build_index(corpus, index, **dict(index_params or {}))
    index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores, indices = search(built, queries, k)
    search_seconds = time.perf_counter() - start

    result: dict[str, Any] = retrieval_metrics(data.qrels, _run(data, scores, indices))
    result.update(
        queries=len(data.query_ids),
        corpus=len(data.corpus_ids),
        index=index,
        k=int(scores.shape[1]),
        index_seconds=index_seconds,
        search_seconds=search_seconds,
    )
    if index != "flat":
        _, exact = search(build_index(corpus, "flat"), queries, 10)
        result["recall@10_vs_exact"] = recall_vs_exact(exact, indices, 10)
    logger.info(
        "%s (%s, top %d): %s",
        data.name,
        index,
        result["k"],
        ", ".join(f"{m} {result[m]:.2f}" for m in (*METRICS, "recall@10_vs_exact") if m in result),
    )
    return result
