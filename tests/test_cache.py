"""Tests for mtd.targets.cache: the on-disk, resumable, validated teacher target cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtd.config import TeacherConfig
from mtd.io import hash_folder, hash_texts, read_json
from mtd.targets import teachers
from mtd.targets.cache import CacheError, build_teacher_cache, cached_targets, length_order, open_cache

N_TEXTS = 100


def _chunk(texts: list[str], c: int, size: int = 32) -> list[str]:
    """The texts of cache chunk c: chunks follow the corpus's length order."""
    return [texts[i] for i in length_order(texts)[c * size : (c + 1) * size]]


@pytest.fixture(scope="module")
def texts(tiny_assets: Path) -> list[str]:
    return tiny_assets.joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()[:N_TEXTS]


def _cfg(tiny_assets: Path, name: str = "teacher_a", **kw) -> TeacherConfig:
    return TeacherConfig(name=name, path=str(tiny_assets / name), batch_size=16, **kw)


def _reference(tiny_assets: Path, name: str, texts: list[str], prompt: str | None = None) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_assets / name), device="cpu")
    return model.encode(texts, normalize_embeddings=True, prompt=prompt, convert_to_numpy=True)


@pytest.fixture(scope="module")
def built(tiny_assets, texts, tmp_path_factory) -> Path:
    """One clean teacher_a cache over `texts`, chunk size 32 (4 chunks, last one short)."""
    root = tmp_path_factory.mktemp("cache-clean")
    return build_teacher_cache(_cfg(tiny_assets), texts, root, chunk_size=32)


class CountingEncode:
    """Stands in for mtd.targets.teachers.encode: records each chunk's texts, optionally fails on call k."""

    def __init__(self, fail_on: int | None = None, exc: type[BaseException] = KeyboardInterrupt):
        self.real = teachers.encode
        self.calls: list[list[str]] = []
        self.fail_on, self.exc = fail_on, exc

    def __call__(self, model, chunk_texts, cfg):
        self.calls.append(list(chunk_texts))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise self.exc()
        return self.real(model, chunk_texts, cfg)


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, dst)
    return dst


# --- a clean build ----------------------------------------------------------------------------------


def test_round_trip_matches_sentence_transformers(built, tiny_assets, texts):
    arr = open_cache(built, check_rows=N_TEXTS)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (N_TEXTS, 32)
    ref = _reference(tiny_assets, "teacher_a", texts)
    np.testing.assert_allclose(np.asarray(arr, dtype=np.float32), ref, atol=2e-3, rtol=0)
    # and not trivially: rows differ from each other
    assert np.abs(ref[0] - ref[1]).max() > 0.05


def test_manifest_fields(built, tiny_assets, texts):
    m = read_json(built / "manifest.json")
    assert m["teacher"]["weights_sha256"] == hash_folder(tiny_assets / "teacher_a")
    assert m["teacher"]["name"] == "teacher_a" and m["teacher"]["pooling"] == "mean"
    assert m["dim"] == 32 and m["rows"] == N_TEXTS == m["rows_written"]
    assert m["corpus_sha256"] == hash_texts(texts)
    assert m["complete"] is True and m["chunk_size"] == 32
    assert sorted(p.name for p in (built / "chunks").iterdir()) == [f"{c:06d}" for c in range(4)]
    assert built.name.startswith("teacher_a-")


def test_second_call_reuses_without_loading(built, tiny_assets, texts, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("teacher loaded although the cache is complete")

    monkeypatch.setattr(teachers, "load_teacher", boom)
    monkeypatch.setattr(teachers, "encode", boom)
    again = build_teacher_cache(_cfg(tiny_assets), texts, built.parent, chunk_size=32)
    assert again == built
    open_cache(again, check_rows=N_TEXTS)


def test_changed_corpus_or_prompt_gets_a_new_folder(built, tiny_assets, texts, tmp_path):
    root = _copy(built, tmp_path).parent
    old = root / built.name
    other_corpus = build_teacher_cache(_cfg(tiny_assets), texts[:-1] + ["a different text"], root,
                                       chunk_size=32)
    prompted = build_teacher_cache(_cfg(tiny_assets, prompt="query: "), texts, root, chunk_size=32)
    assert len({old, other_corpus, prompted}) == 3
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (old, other_corpus, prompted))
    for folder in (old, other_corpus, prompted):
        open_cache(folder, check_rows=N_TEXTS)  # the old one is untouched and still valid
    np.testing.assert_array_equal(open_cache(old), open_cache(built))
    # the prompt really reaches the teacher
    p = np.asarray(open_cache(prompted), dtype=np.float32)
    np.testing.assert_allclose(p, _reference(tiny_assets, "teacher_a", texts, prompt="query: "), atol=2e-3)
    assert np.abs(p - np.asarray(open_cache(old), dtype=np.float32)).max() > 1e-2


def test_interrupted_fill_resumes_only_missing_chunks(built, tiny_assets, texts, tmp_path, monkeypatch):
    cfg = _cfg(tiny_assets)
    failing = CountingEncode(fail_on=3)
    monkeypatch.setattr(teachers, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    (folder,) = tmp_path.iterdir()
    assert read_json(folder / "manifest.json")["complete"] is False
    assert sorted(p.name for p in (folder / "chunks").iterdir()) == ["000000", "000001"]
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(folder)

    resumed = CountingEncode()
    monkeypatch.setattr(teachers, "encode", resumed)
    # chunk size is the manifest's: a different one now must not re-chunk a fill in progress
    again = build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    assert again == folder
    assert resumed.calls == [_chunk(texts, 2), _chunk(texts, 3)]
    np.testing.assert_array_equal(open_cache(folder, check_rows=N_TEXTS), open_cache(built))


def test_unreadable_unfinished_fill_starts_again(built, tiny_assets, texts, tmp_path, monkeypatch):
    cfg = _cfg(tiny_assets)
    monkeypatch.setattr(teachers, "encode", CountingEncode(fail_on=2))
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    (folder,) = tmp_path.iterdir()
    (folder / "manifest.json").write_text('{"version": 1, "rows"', encoding="utf-8")  # cut short
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    assert build_teacher_cache(cfg, texts, tmp_path, chunk_size=32) == folder
    assert len(counting.calls) == 4  # everything again
    np.testing.assert_array_equal(open_cache(folder), open_cache(built))


def test_two_ranks_fill_alternate_chunks(built, tiny_assets, texts, tmp_path, monkeypatch):
    """Ranks run one after the other: rank 0's second barrier (after its own chunks) runs rank 1."""
    cfg = _cfg(tiny_assets)
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    barriers = []

    def barrier():
        barriers.append(len(counting.calls))
        if len(barriers) == 2:
            build_teacher_cache(cfg, texts, tmp_path, chunk_size=32, rank=1, world_size=2)

    folder = build_teacher_cache(cfg, texts, tmp_path, chunk_size=32, rank=0, world_size=2,
                                 barrier=barrier)
    assert barriers == [0, 2, 4]
    # rank 0: chunks 0 and 2; then rank 1: chunks 1 and 3
    assert counting.calls == [_chunk(texts, c) for c in (0, 2, 1, 3)]
    assert read_json(folder / "manifest.json")["complete"] is True
    np.testing.assert_array_equal(open_cache(folder, check_rows=N_TEXTS), open_cache(built))


def test_rank_0_alone_does_not_mark_a_two_rank_fill_complete(tiny_assets, texts, tmp_path):
    with pytest.raises(CacheError, match="only 2 chunks finished"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32, rank=0, world_size=2)
    (folder,) = tmp_path.iterdir()
    assert read_json(folder / "manifest.json")["complete"] is False


# --- failures while building -----------------------------------------------------------------------------


def test_empty_corpus(tiny_assets, tmp_path):
    with pytest.raises(CacheError, match="empty corpus"):
        build_teacher_cache(_cfg(tiny_assets), [], tmp_path)


@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_zero_or_nan_teacher_vector_names_the_text(tiny_assets, texts, tmp_path, monkeypatch, bad):
    real = teachers.encode

    def encode(model, chunk_texts, cfg):
        vecs = real(model, chunk_texts, cfg)
        if texts[45] in chunk_texts:
            vecs[chunk_texts.index(texts[45])] = bad
        return vecs

    monkeypatch.setattr(teachers, "encode", encode)
    with pytest.raises(CacheError) as e:
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    assert "text 45" in str(e.value) and repr(texts[45][:80]) in str(e.value)
    (folder,) = tmp_path.iterdir()
    failed = list(length_order(texts)).index(45) // 32  # chunks before it were kept
    assert sorted(p.name for p in (folder / "chunks").iterdir()) == [f"{c:06d}" for c in range(failed)]


def test_wrong_shape_from_teacher(tiny_assets, texts, tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "encode", lambda m, t, c: np.ones((len(t), 5), dtype=np.float32))
    with pytest.raises(CacheError, match=r"returned \(32, 5\), expected \(32, 32\)"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)


# --- corrupt caches are rejected by open_cache --------------------------------------------------------------


def _rejects(folder: Path, match: str, **kw) -> None:
    with pytest.raises(CacheError, match=match) as e:
        open_cache(folder, **kw)
    msg = str(e.value)
    assert str(folder) in msg and "Delete that folder" in msg


def test_open_cache_accepts_the_clean_copy(built, tmp_path):
    open_cache(_copy(built, tmp_path), check_rows=N_TEXTS)  # the corruptions below are the cause


def test_nan_row(built, tmp_path):
    folder = _copy(built, tmp_path)
    arr = np.load(folder / "vectors.npy", mmap_mode="r+")
    arr[57, 3] = np.nan
    arr.flush()
    del arr
    _rejects(folder, r"1 rows are not finite unit vectors \(first: 57\)")


def test_non_unit_row(built, tmp_path):
    folder = _copy(built, tmp_path)
    arr = np.load(folder / "vectors.npy", mmap_mode="r+")
    arr[80] *= 2
    arr.flush()
    del arr
    _rejects(folder, r"first: 80")


def test_truncated_vectors(built, tmp_path):
    folder = _copy(built, tmp_path)
    path = folder / "vectors.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _rejects(folder, "vectors.npy unreadable")


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01garbage" * 100, b"\x93NUMPY\x01\x00{bad header"])
def test_garbage_vectors(built, tmp_path, garbage):
    folder = _copy(built, tmp_path)
    (folder / "vectors.npy").write_bytes(garbage)
    _rejects(folder, "vectors.npy unreadable")


def test_vectors_wrong_shape_or_dtype(built, tmp_path):
    folder = _copy(built, tmp_path)
    arr = np.array(open_cache(folder))  # a copy: the file is rewritten below
    np.save(folder / "vectors.npy", arr[:, :16])
    _rejects(folder, "manifest says")
    np.save(folder / "vectors.npy", arr.astype(np.float32))
    _rejects(folder, "float32")


def test_missing_vectors(built, tmp_path):
    folder = _copy(built, tmp_path)
    (folder / "vectors.npy").unlink()
    _rejects(folder, "vectors.npy unreadable")


def test_incomplete_manifest(built, tmp_path):
    folder = _copy(built, tmp_path)
    m = read_json(folder / "manifest.json")
    m["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    _rejects(folder, "incomplete")


@pytest.mark.parametrize(
    "content",
    [b'{"complete": tr', b"\xff\xfe\x00garbage", b"[1, 2]", b'{"complete": true}', None],
    ids=["cut", "binary", "list", "no-rows", "missing"],
)
def test_unreadable_manifest(built, tmp_path, content):
    folder = _copy(built, tmp_path)
    if content is None:
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_bytes(content)
    _rejects(folder, "manifest")


def test_wrong_row_count(built, tmp_path):
    folder = _copy(built, tmp_path)
    _rejects(folder, f"has {N_TEXTS} rows, the corpus has {N_TEXTS + 1}", check_rows=N_TEXTS + 1)


# --- cached_targets -----------------------------------------------------------------------------------------


def test_cached_targets_shapes(tiny_assets, texts, tmp_path):
    cfgs = [_cfg(tiny_assets, "teacher_a"), _cfg(tiny_assets, "teacher_b")]
    arrays = cached_targets(cfgs, texts[:40], tmp_path, chunk_size=16)
    assert [a.shape for a in arrays] == [(40, 32), (40, 48)]
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 for a in arrays)
    assert len(list(tmp_path.iterdir())) == 2
    np.testing.assert_allclose(np.asarray(arrays[1], dtype=np.float32),
                               _reference(tiny_assets, "teacher_b", texts[:40]), atol=2e-3)
