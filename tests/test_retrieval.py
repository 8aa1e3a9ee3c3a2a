"""Tests for mtd.evaluation.retrieval (offline; the one slow test needs the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from mtd.evaluation.retrieval import (
    BeirSet,
    RetrievalFormatError,
    build_index,
    default_nlist,
    default_pq_m,
    evaluate_retrieval,
    load_beir,
    recall_vs_exact,
    retrieval_metrics,
    search,
)

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"


@pytest.fixture
def one_faiss_thread():
    """Single-threaded FAISS, so HNSW insertion order and k-means are reproducible."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _clustered(n: int, q: int, dim: int = 64, clusters: int = 400, seed: int = 0):
    """(corpus (n, dim), queries (q, dim)) drawn around ``clusters`` random centres (~10 each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n + q)] + 0.4 * rng.standard_normal((n + q, dim))
    return x[:n].astype(np.float32), x[n:].astype(np.float32)


def _exact_topk(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k in float64: (scores (Q, k), indices (Q, k))."""
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ c.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


# --------------------------------------------------------------------------- indexes


def test_flat_search_equals_numpy_bruteforce():
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((500, 32)) * 3.0  # not unit-norm: build_index must normalize
    queries = rng.standard_normal((20, 32))
    scores, indices = search(build_index(corpus, "flat"), queries, 15)
    want_scores, want_idx = _exact_topk(corpus, queries, 15)
    assert scores.shape == indices.shape == (20, 15)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_search_caps_k_and_leaves_inputs_untouched():
    corpus = np.arange(12, dtype=np.float64).reshape(4, 3) + 1.0
    before = corpus.copy()
    scores, indices = search(build_index(corpus, "flat"), corpus, 10)
    assert indices.shape == (4, 4)  # k capped at the corpus size, no -1 padding
    np.testing.assert_array_equal(indices[:, 0], np.arange(4))  # each vector finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    np.testing.assert_array_equal(corpus, before)


@pytest.mark.parametrize(("kind", "floor"), [("hnsw", 90.0), ("ivfpq", 60.0)])
def test_approximate_index_recall_on_clustered_data(kind, floor, one_faiss_thread):
    corpus, queries = _clustered(4000, 100)
    _, exact = _exact_topk(corpus, queries, 10)
    _, approx = search(build_index(corpus, kind), queries, 10)
    assert recall_vs_exact(exact, approx) > floor


# A small HNSW graph and beam, so its recall is not trivially 100.
@pytest.mark.parametrize(("kind", "params"), [("hnsw", {"M": 4, "efSearch": 10}), ("ivfpq", {})])
def test_evaluate_reports_recall_vs_exact_as_computed_here(kind, params, one_faiss_thread):
    corpus, queries = _clustered(3000, 40, seed=2)
    rng = np.random.default_rng(3)
    data = BeirSet(
        "clustered",
        [f"d{i}" for i in range(len(corpus))],
        [f"doc {i}" for i in range(len(corpus))],
        [f"q{j}" for j in range(len(queries))],
        [f"query {j}" for j in range(len(queries))],
        {f"q{j}": {f"d{rng.integers(len(corpus))}": 1} for j in range(len(queries))},
    )
    result = evaluate_retrieval(
        lambda t: queries, lambda t: corpus, data, index=kind, k=10, index_params=params
    )

    _, exact = _exact_topk(corpus, queries, 10)
    _, approx = search(build_index(corpus, kind, **params), queries, 10)
    ids = np.array(data.corpus_ids)
    overlap = [len(set(ids[e]) & set(ids[a])) / 10 for e, a in zip(exact, approx, strict=True)]
    assert result["recall@10_vs_exact"] == pytest.approx(100 * np.mean(overlap), abs=1e-9)
    assert 0 < result["recall@10_vs_exact"] < 100
    assert result["index"] == kind and result["k"] == 10


def test_index_parameters_are_applied(one_faiss_thread):
    corpus, _ = _clustered(1000, 0, dim=32)
    hnsw = build_index(corpus, "hnsw")
    assert (hnsw.hnsw.efSearch, hnsw.hnsw.efConstruction, hnsw.ntotal) == (128, 40, 1000)
    assert hnsw.metric_type == faiss.METRIC_INNER_PRODUCT
    ivfpq = build_index(corpus, "ivfpq")
    assert (ivfpq.nlist, ivfpq.nprobe, ivfpq.pq.M, ivfpq.pq.nbits) == (25, 16, 4, 8)
    assert ivfpq.metric_type == faiss.METRIC_INNER_PRODUCT and ivfpq.is_trained
    custom = build_index(corpus, "ivfpq", nlist=8, nprobe=32, m=8)
    assert (custom.nlist, custom.nprobe, custom.pq.M) == (8, 8, 8)  # nprobe capped at nlist
    assert build_index(corpus, "flat").metric_type == faiss.METRIC_INNER_PRODUCT


def test_default_index_parameters():
    assert default_pq_m(384) == 48  # 8 dims per subquantizer
    assert default_pq_m(768) == 96
    assert default_pq_m(100) == 10  # 100 / 8 = 12.5: largest divisor below is 10
    assert default_pq_m(7) == 1
    assert default_nlist(1460) == 37  # 4 * sqrt(1460) = 153, capped at 1460 // 39
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(10) == 1


@pytest.mark.parametrize(
    ("vectors", "kind", "params", "error", "match"),
    [
        (np.ones((4, 8), dtype=np.int64), "flat", {}, TypeError, "floating point"),
        (np.ones(8), "flat", {}, ValueError, r"2-D array \(N, D\)"),
        (np.ones((0, 8)), "flat", {}, ValueError, "non-empty"),
        (np.full((4, 8), np.nan), "flat", {}, ValueError, "NaN or inf"),
        (np.ones((4, 8)), "ivf", {}, ValueError, "unknown index kind 'ivf'"),
        (np.ones((4, 8)), "hnsw", {"nprobe": 4}, ValueError, r"unknown parameter.*nprobe.*efSearch"),
        (np.ones((4, 8)), "flat", {"M": 4}, ValueError, r"allowed: none"),
        (np.ones((300, 8)), "ivfpq", {"m": 3}, ValueError, "m to divide"),
        (np.ones((100, 8)), "ivfpq", {}, ValueError, "at least 256 corpus vectors"),
    ],
)
def test_build_index_rejects_bad_input(vectors, kind, params, error, match):
    with pytest.raises(error, match=match):
        build_index(vectors, kind, **params)


def test_search_rejects_dimension_mismatch_and_bad_k():
    index = build_index(np.eye(4), "flat")
    with pytest.raises(ValueError, match="dimension 3 but the index holds 4-d"):
        search(index, np.ones((2, 3)), 2)
    with pytest.raises(ValueError, match="positive integer"):
        search(index, np.ones((2, 4)), 0)


# --------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    qrels = {
        "q1": {"a": 2, "b": 1, "c": 0},
        "q2": {"x": 1},
        "q3": {"y": 1, "z": 1},  # never retrieved: scores 0 but counts in every mean
        "q4": {"a": 0},  # no positive: not evaluated at all
    }
    run = {
        "q1": {"b": 0.9, "n1": 0.8, "a": 0.7, "c": 0.6},
        # x at rank 11: outside every @10 measure, inside recall@100 and MAP
        "q2": {**{f"n{i}": 1.0 - i / 100 for i in range(10)}, "x": 0.5},
        "q4": {"a": 1.0},
        "unjudged": {"a": 1.0},
    }
    # q1: DCG = 1/log2(2) + 2/log2(4) = 2; ideal = 2/log2(2) + 1/log2(3)
    ndcg_q1 = 2.0 / (2.0 + 1.0 / math.log2(3))
    ap_q1 = (1 / 1 + 2 / 3) / 2  # relevant at ranks 1 and 3
    ap_q2 = (1 / 11) / 1
    want = {
        "ndcg@10": 100 * ndcg_q1 / 3,
        "mrr@10": 100 * (1.0 + 0.0 + 0.0) / 3,  # q2's reciprocal rank 1/11 is cut to 0
        "recall@1": 100 * (0.5 + 0 + 0) / 3,
        "recall@10": 100 * (1.0 + 0 + 0) / 3,
        "recall@100": 100 * (1.0 + 1.0 + 0) / 3,
        "map@100": 100 * (ap_q1 + ap_q2 + 0) / 3,
    }
    got = retrieval_metrics(qrels, run)
    assert got == pytest.approx(want, abs=1e-9)


def test_at_100_measures_cut_at_rank_100():
    # A run deeper than 100 (k > 100): the relevant doc at rank 101 counts for neither.
    run = {"q": {**{f"n{i:03d}": 1.0 - i / 1000 for i in range(100)}, "r": 0.01}}
    got = retrieval_metrics({"q": {"r": 1}}, run)
    assert (got["recall@100"], got["map@100"]) == (0.0, 0.0)
    run["q"]["n099"] = 0.0  # now r is at rank 100
    got = retrieval_metrics({"q": {"r": 1}}, run)
    assert got["recall@100"] == pytest.approx(100.0)
    assert got["map@100"] == pytest.approx(100.0 / 100)


def test_mrr_cut_follows_trec_eval_tie_order():
    # Eleven docs tie; trec_eval ranks ties by doc id descending, so "r" (> every "n*") is first.
    run = {"q": {**{f"n{i:02d}": 0.5 for i in range(10)}, "r": 0.5}}
    assert retrieval_metrics({"q": {"r": 1}}, run)["mrr@10"] == pytest.approx(100.0)
    run = {"q": {**{f"n{i:02d}": 0.5 for i in range(10)}, "a": 0.5}}  # "a" sorts last: rank 11
    assert retrieval_metrics({"q": {"a": 1}}, run)["mrr@10"] == 0.0


def _reference_ndcg_ap(qrels, run, cut=10, map_cut=100):
    """Plain-Python nDCG@cut (gain = grade, discount log2(rank + 1)) and AP@map_cut per query."""
    ndcgs, aps = [], []
    for q, judged in qrels.items():
        positives = sorted((g for g in judged.values() if g > 0), reverse=True)
        ranked = sorted(run.get(q, {}), key=lambda d: -run[q][d])
        dcg = sum(max(judged.get(d, 0), 0) / math.log2(r + 2) for r, d in enumerate(ranked[:cut]))
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(positives[:cut]))
        ndcgs.append(dcg / idcg)
        hits, precision_sum = 0, 0.0
        for r, d in enumerate(ranked[:map_cut]):
            if judged.get(d, 0) > 0:
                hits += 1
                precision_sum += hits / (r + 1)
        aps.append(precision_sum / len(positives))
    return 100 * np.mean(ndcgs), 100 * np.mean(aps)


def test_ndcg_and_map_match_reference_on_random_graded_qrels():
    rng = np.random.default_rng(7)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for j in range(20):
        q = f"q{j}"
        judged = rng.choice(len(docs), size=12, replace=False)
        grades = rng.integers(0, 4, size=12)
        grades[0] = rng.integers(1, 4)  # at least one positive, so every query is evaluated
        qrels[q] = {docs[i]: int(g) for i, g in zip(judged, grades, strict=True)}
        retrieved = rng.choice(len(docs), size=30, replace=False)  # some judged docs are missed
        run[q] = {docs[i]: float(s) for i, s in zip(retrieved, rng.random(30), strict=True)}
    want_ndcg, want_map = _reference_ndcg_ap(qrels, run)
    got = retrieval_metrics(qrels, run)
    assert got["ndcg@10"] == pytest.approx(want_ndcg, abs=1e-9)
    assert got["map@100"] == pytest.approx(want_map, abs=1e-9)
    assert 0 < got["ndcg@10"] < 100


def test_metrics_need_a_positive_judgment():
    with pytest.raises(ValueError, match="no query with a positive"):
        retrieval_metrics({"q": {"d": 0}}, {"q": {"d": 1.0}})


# --------------------------------------------------------------------------- loading


def _write_beir(
    folder: Path,
    corpus: list | None = None,
    queries: list | None = None,
    qrels: list[str] | None = None,
) -> Path:
    """A BEIR folder; list items that are str are written verbatim, others as JSON."""
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Dewey", "text": " Decimal classification. "},
        {"_id": "d2", "text": "  No title here.  "},
        {"_id": "d3", "title": "", "text": "Empty title."},
        {"_id": "d4", "title": "Only a title", "text": ""},
    ]
    queries = queries if queries is not None else [
        {"_id": "q1", "text": "what is dewey"},
        {"_id": "q2", "text": "untitled"},
        {"_id": "q3", "text": "judged, nothing relevant"},
        {"_id": "q4", "text": "never judged"},
    ]
    qrels = qrels if qrels is not None else [
        "query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t0", "q2\td2\t1", "q3\td3\t0",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (folder / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text("".join(f"{r}\n" for r in qrels), encoding="utf-8")
    return folder


def test_load_beir_joins_titles_and_skips_queries_without_positives(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mtd.evaluation.retrieval"):
        data = load_beir(_write_beir(tmp_path / "toy"))
    assert data.name == "toy/test"
    assert data.corpus_ids == ["d1", "d2", "d3", "d4"]
    assert data.corpus_texts == [
        "Dewey  Decimal classification.",  # title + " " + text, then strip (as BEIR/MTEB)
        "No title here.",
        "Empty title.",
        "Only a title",
    ]
    assert data.query_ids == ["q1", "q2"]
    assert data.query_texts == ["what is dewey", "untitled"]
    assert data.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1}}
    assert "2 of 4 queries evaluated" in caplog.text


def test_load_beir_numeric_ids_and_repeated_identical_qrels(tmp_path):
    folder = _write_beir(
        tmp_path / "num",
        corpus=[{"_id": 1, "text": "one"}],
        queries=[{"_id": 7, "text": "seven"}],
        qrels=["query-id\tcorpus-id\tscore", "7\t1\t1", "7\t1\t1"],
    )
    data = load_beir(folder)
    assert data.corpus_ids == ["1"] and data.qrels == {"7": {"1": 1}}


BAD_INPUTS = {
    "no corpus": ("corpus.jsonl", None, "missing corpus.jsonl; a BEIR folder holds"),
    "no queries": ("queries.jsonl", None, "missing queries.jsonl"),
    "no qrels": ("qrels/test.tsv", None, r"missing qrels/test\.tsv"),
    "bad json": ("corpus.jsonl", {"corpus": [{"_id": "d1", "text": "a"}, "{oops"]}, "line 2: invalid JSON"),
    "not an object": ("queries.jsonl", {"queries": ["[1, 2]"]}, "line 1: expected a JSON object"),
    "no _id": ("queries.jsonl", {"queries": [{"text": "q"}]}, "line 1: missing key.*'_id'"),
    "no text": ("corpus.jsonl", {"corpus": [{"_id": "d1", "title": "t"}]}, "line 1: missing key.*'text'"),
    "text not str": ("corpus.jsonl", {"corpus": [{"_id": "d1", "text": 3}]}, "'text' must be a string"),
    "dup doc": (
        "corpus.jsonl",
        {"corpus": [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}]},
        "line 3: duplicate _id 'd1' \\(first on line 1\\)",
    ),
    "dup query": (
        "queries.jsonl",
        {"queries": [{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]},
        "line 2: duplicate _id 'q1'",
    ),
    "unknown query": (
        "test.tsv",
        {"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t1", "zz\td1\t1"]},
        "line 3: 1 query id\\(s\\) not in queries.jsonl: 'zz'",
    ),
    "unknown docs": (
        "test.tsv",
        {"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t1"] + [f"q1\tx{i}\t1" for i in range(7)]},
        "line 3: 7 corpus id\\(s\\) not in corpus.jsonl: 'x0', 'x1', 'x2', 'x3', 'x4' and 2 more",
    ),
    "float score": (
        "test.tsv",
        {"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t1.5"]},
        "line 2: score must be an integer, got '1.5'",
    ),
    "no header": ("test.tsv", {"qrels": ["q1\td1\t1"]}, "line 1: header must be"),
    "two fields": ("test.tsv", {"qrels": ["query-id\tcorpus-id\tscore", "q1 d1\t1"]}, "line 2: expected 3"),
    "conflicting grades": (
        "test.tsv",
        {"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td1\t2"]},
        "line 3: .*judged 2 here and 1 on line 2",
    ),
    "no positives": (
        "test.tsv",
        {"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t0", "q2\td2\t-1"]},
        "no query has a positive",
    ),
    "empty corpus": ("corpus.jsonl", {"corpus": []}, "empty corpus"),
    "empty qrels": ("test.tsv", {"qrels": []}, "empty file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_load_beir_errors_name_the_file(tmp_path, case):
    file, change, match = BAD_INPUTS[case]
    folder = _write_beir(tmp_path / "set", **(change or {}))
    if change is None:
        (folder / file).unlink()
    with pytest.raises(RetrievalFormatError, match=match) as err:
        load_beir(folder)
    # Layout errors name the folder (and the missing file in the message); others the file itself.
    assert file in str(err.value)
    if change is not None:
        assert err.value.path.name == Path(file).name


def test_load_beir_missing_split_lists_the_present_ones(tmp_path):
    folder = _write_beir(tmp_path / "set")
    with pytest.raises(RetrievalFormatError, match=r"missing qrels/dev\.tsv.*present: test"):
        load_beir(folder, split="dev")


def test_load_beir_not_utf8_names_the_line(tmp_path):
    folder = _write_beir(tmp_path / "set")
    with (folder / "queries.jsonl").open("ab") as f:
        f.write(b'{"_id": "q9", "text": "caf\xe9"}\n')
    with pytest.raises(RetrievalFormatError, match=r"queries\.jsonl, line 5: not valid UTF-8"):
        load_beir(folder)


# --------------------------------------------------------------------------- end to end


def test_evaluate_retrieval_keeps_docs_sharing_the_query_id():
    # Query "1" and document "1" share an id (as in CISI); BEIR's ignore_identical_ids would drop
    # the only relevant document and score 0.
    vectors = {"doc one": [1.0, 0.0, 0.0], "doc two": [0.0, 1.0, 0.0], "doc three": [0.0, 0.0, 1.0]}
    queries = {"about one": [0.9, 0.1, 0.0], "about three": [0.1, 0.0, 0.9]}
    data = BeirSet(
        "toy",
        ["1", "2", "3"],
        list(vectors),
        ["1", "2"],
        list(queries),
        {"1": {"1": 1}, "2": {"3": 1}},
    )
    result = evaluate_retrieval(
        lambda t: np.array([queries[s] for s in t]), lambda t: np.array([vectors[s] for s in t]), data
    )
    assert result["ndcg@10"] == pytest.approx(100.0)
    assert result["mrr@10"] == pytest.approx(100.0)
    assert (result["queries"], result["corpus"], result["index"], result["k"]) == (2, 3, "flat", 3)
    assert result["search_seconds"] >= 0
    assert "recall@10_vs_exact" not in result


def test_evaluate_retrieval_rejects_wrong_encoder_shape():
    data = BeirSet("toy", ["1", "2"], ["a", "b"], ["q"], ["x"], {"q": {"1": 1}})
    with pytest.raises(ValueError, match=r"documents encoder returned shape \(3, 4\) for 2 texts"):
        evaluate_retrieval(lambda t: np.ones((1, 4)), lambda t: np.ones((3, 4)), data)


@pytest.mark.slow
def test_minilm_cisi_reference_score():
    data_dir = DATA_ROOT / "retrieval" / "cisi"
    if not data_dir.is_dir() or not MINILM.is_dir():
        pytest.skip(f"needs {data_dir} and {MINILM}")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MINILM), device="cpu")
    data = load_beir(data_dir)
    assert (len(data.corpus_ids), len(data.query_ids)) == (1460, 76)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, normalize_embeddings=True, batch_size=64, convert_to_numpy=True)

    start = time.perf_counter()
    result = evaluate_retrieval(encode, encode, data)
    logging.getLogger(__name__).info("CISI MiniLM: %s in %.1fs", result, time.perf_counter() - start)
    assert math.isclose(result["ndcg@10"], 41.93, abs_tol=0.1), result
