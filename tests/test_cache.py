"""Tests for mtd.targets.cache: the on-disk, resumable, validated teacher target cache."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mtd.io
from mtd.config import TeacherConfig
from mtd.errors import MtdError
from mtd.io import hash_folder, hash_texts, read_json
from mtd.targets import cache, teachers
from mtd.targets.cache import (
    PAGE,
    CacheError,
    Processes,
    build_teacher_cache,
    cached_targets,
    length_order,
    open_cache,
    placement_ranges,
)
from mtd.training import distributed

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


def _interrupted_fill(cfg: TeacherConfig, texts: list[str], root: Path, monkeypatch,
                      fail_on: int = 3) -> Path:
    """The folder of a fill killed (Ctrl-C) at encode call `fail_on`: chunks before it are finished."""
    monkeypatch.setattr(teachers, "encode", CountingEncode(fail_on=fail_on))
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(cfg, texts, root, chunk_size=32)
    (folder,) = _folders(root)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: equal before and after means nothing was lost."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, dst)
    return dst


def _folders(root: Path) -> list[Path]:
    """The cache folders under root (beside them: the teachers' weight-hash memo)."""
    return sorted(p for p in root.iterdir() if p.is_dir())


# --- a clean build ----------------------------------------------------------------------------------


def test_round_trip_matches_sentence_transformers(built, tiny_assets, texts):
    arr = open_cache(built, texts)
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
    open_cache(again, texts)


def test_changed_corpus_or_prompt_gets_a_new_folder(built, tiny_assets, texts, tmp_path):
    root = _copy(built, tmp_path).parent
    old = root / built.name
    other_texts = texts[:-1] + ["a different text"]
    other_corpus = build_teacher_cache(_cfg(tiny_assets), other_texts, root, chunk_size=32)
    prompted = build_teacher_cache(_cfg(tiny_assets, prompt="query: "), texts, root, chunk_size=32)
    assert len({old, other_corpus, prompted}) == 3
    assert _folders(root) == sorted((old, other_corpus, prompted))
    for folder, corpus in ((old, texts), (other_corpus, other_texts), (prompted, texts)):
        open_cache(folder, corpus)  # the old one is untouched and still valid
    np.testing.assert_array_equal(open_cache(old, texts), open_cache(built, texts))
    # the prompt really reaches the teacher
    p = np.asarray(open_cache(prompted, texts), dtype=np.float32)
    np.testing.assert_allclose(p, _reference(tiny_assets, "teacher_a", texts, prompt="query: "), atol=2e-3)
    assert np.abs(p - np.asarray(open_cache(old, texts), dtype=np.float32)).max() > 1e-2


def test_interrupted_fill_resumes_only_missing_chunks(built, tiny_assets, texts, tmp_path, monkeypatch):
    cfg = _cfg(tiny_assets)
    folder = _interrupted_fill(cfg, texts, tmp_path, monkeypatch)
    assert read_json(folder / "manifest.json")["complete"] is False
    assert sorted(p.name for p in (folder / "chunks").iterdir()) == ["000000", "000001"]
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(folder, texts)

    resumed = CountingEncode()
    monkeypatch.setattr(teachers, "encode", resumed)
    # chunk size is the manifest's: a different one now must not re-chunk a fill in progress
    again = build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    assert again == folder
    assert resumed.calls == [_chunk(texts, 2), _chunk(texts, 3)]
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))


def test_unreadable_unfinished_fill_stops_and_keeps_its_chunks(tiny_assets, texts, tmp_path, monkeypatch):
    cfg = _cfg(tiny_assets)
    folder = _interrupted_fill(cfg, texts, tmp_path, monkeypatch)
    (folder / "manifest.json").write_text('{"version": 1, "rows"', encoding="utf-8")  # cut short
    before = _snapshot(folder)
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    with pytest.raises(CacheError, match=r"manifest.json unreadable .*left as they are\. Delete that folder"):
        build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    assert _snapshot(folder) == before  # its 2 finished chunks are not thrown away


class Threads:
    """n threads standing in for n processes. The collectives are mtd.training.distributed's own
    (main_decides, all_succeed); only torch.distributed's object exchange under them is replaced
    by its effect (pickled, as over the wire), over a barrier."""

    def __init__(self, n: int, monkeypatch):
        self.n, self.local = n, threading.local()
        self.barrier = threading.Barrier(n, timeout=120)
        self.board: list = [None] * n
        monkeypatch.setattr(distributed, "world_size", lambda: n)
        monkeypatch.setattr(distributed.dist, "get_rank", lambda: self.local.rank)
        monkeypatch.setattr(distributed.dist, "broadcast_object_list",
                            lambda objects, src: objects.__setitem__(slice(None),
                                                                     self._exchange(objects)[src]))
        monkeypatch.setattr(distributed.dist, "all_gather_object",
                            lambda out, obj: out.__setitem__(slice(None), self._exchange(obj)))

    def _exchange(self, obj):
        self.board[self.local.rank] = pickle.dumps(obj)
        self.barrier.wait()
        seen = [pickle.loads(b) for b in self.board]
        self.barrier.wait()
        return seen

    def run(self, body) -> list:
        """body(processes) on every rank at once: what each returned, or the error it raised."""
        outcome: list = [None] * self.n

        def work(rank: int) -> None:
            self.local.rank = rank
            try:
                processes = Processes(rank, self.n, distributed.main_decides, distributed.all_succeed)
                outcome[rank] = body(processes)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                outcome[rank] = e
                if not isinstance(e, MtdError):  # not a collective's answer: free the others
                    self.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outcome


def test_two_processes_fill_a_cache_together_never_writing_the_same_page(tiny_assets, texts, tmp_path,
                                                                          monkeypatch):
    """teacher_b: 96-byte rows, so a row straddles the page boundary between the two parts."""
    cfg = _cfg(tiny_assets, "teacher_b")
    alone = build_teacher_cache(cfg, texts, tmp_path / "alone", chunk_size=32)
    threads = Threads(2, monkeypatch)
    encoded, written = {0: [], 1: []}, {0: [], 1: []}
    real_encode, real_pwrite = teachers.encode, os.pwrite

    def encode(model, chunk_texts, cfg):
        encoded[threads.local.rank].append(list(chunk_texts))
        return real_encode(model, chunk_texts, cfg)

    def pwrite(fd, data, offset):
        n = real_pwrite(fd, data, offset)
        written[threads.local.rank].append((offset, offset + n))
        return n

    monkeypatch.setattr(teachers, "encode", encode)
    monkeypatch.setattr(os, "pwrite", pwrite)
    root = tmp_path / "together"
    outcome = threads.run(lambda p: build_teacher_cache(cfg, texts, root, chunk_size=32, processes=p))
    (folder,) = _folders(root)
    assert outcome == [folder, folder]
    # rank 0: chunks 0 and 2, rank 1: chunks 1 and 3, each once
    assert encoded == {0: [_chunk(texts, 0), _chunk(texts, 2)], 1: [_chunk(texts, 1), _chunk(texts, 3)]}
    assert read_json(folder / "manifest.json")["complete"] is True
    assert not list((folder / "pending").iterdir())
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(alone, texts))
    # Every byte of the rows written once, and no page written by both processes.
    arr = np.load(folder / "vectors.npy", mmap_mode="r")
    spans = sorted(written[0] + written[1])
    assert spans[0][0] == arr.offset and spans[-1][1] == arr.offset + arr.nbytes
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    pages = [{p for lo, hi in written[r] for p in range(lo // PAGE, (hi - 1) // PAGE + 1)} for r in (0, 1)]
    assert pages[0] and pages[1] and not pages[0] & pages[1]
    straddling = (PAGE - arr.offset) // 96  # the row across the first page boundary
    assert arr.offset + straddling * 96 < PAGE < arr.offset + (straddling + 1) * 96
    assert max(hi for _, hi in written[0]) == PAGE == min(lo for lo, _ in written[1])


@pytest.mark.parametrize("offset", [128, 4096, 200])
@pytest.mark.parametrize("row_bytes", [64, 96, 2304, 2050])
@pytest.mark.parametrize("rows", [1, 100, 12345])
def test_placement_ranges_cover_the_rows_and_share_no_page(offset, row_bytes, rows):
    for count in (1, 2, 3, 5, 8):
        ranges = placement_ranges(offset, rows, row_bytes, count)
        assert len(ranges) == count
        used = [(lo, hi) for lo, hi in ranges if lo < hi]
        assert used[0][0] == offset and used[-1][1] == offset + rows * row_bytes
        for (_, hi), (lo, _) in zip(used, used[1:], strict=False):
            assert hi == lo and lo % PAGE == 0  # cut on a page boundary: nothing shared
        if rows * row_bytes >= count * 2 * PAGE:  # enough pages: every process gets a share
            assert len(used) == count


def test_an_error_reaches_every_process(built, tiny_assets, texts, tmp_path, monkeypatch):
    """Neither process waits forever: the main process's error (an untrusted cache) and another
    process's error (a teacher's zero vector while encoding) stop both."""
    cfg = _cfg(tiny_assets)
    threads = Threads(2, monkeypatch)
    folder = _copy(built, tmp_path / "damaged")
    (folder / "manifest.json").write_text("[1, 2]")
    outcome = threads.run(lambda p: build_teacher_cache(cfg, texts, folder.parent, chunk_size=32,
                                                        processes=p))
    assert isinstance(outcome[0], CacheError) and "manifest.json unreadable" in str(outcome[0])
    assert type(outcome[1]) is MtdError
    assert str(outcome[1]) == f"The main process stopped: {outcome[0]}"

    real = teachers.encode
    bad_text = _chunk(texts, 1)[3]  # chunk 1 is rank 1's

    def encode(model, chunk_texts, cfg):
        vecs = real(model, chunk_texts, cfg)
        if bad_text in chunk_texts:
            vecs[chunk_texts.index(bad_text)] = 0.0
        return vecs

    monkeypatch.setattr(teachers, "encode", encode)
    outcome = threads.run(lambda p: build_teacher_cache(cfg, texts, tmp_path / "fresh", chunk_size=32,
                                                        processes=p))
    assert isinstance(outcome[1], CacheError) and "gave a zero or non-finite vector" in str(outcome[1])
    assert type(outcome[0]) is MtdError and str(outcome[0]) == f"Process 1 stopped: {outcome[1]}"


def test_one_process_alone_does_not_mark_a_two_process_fill_complete(tiny_assets, texts, tmp_path):
    with pytest.raises(CacheError, match="2 chunks were not encoded. Run every process"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32,
                            processes=Processes(rank=0, count=2))
    (folder,) = _folders(tmp_path)
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
    (folder,) = _folders(tmp_path)
    failed = list(length_order(texts)).index(45) // 32  # chunks before it were kept
    assert sorted(p.name for p in (folder / "chunks").iterdir()) == [f"{c:06d}" for c in range(failed)]


def test_wrong_shape_from_teacher(tiny_assets, texts, tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "encode", lambda m, t, c: np.ones((len(t), 5), dtype=np.float32))
    with pytest.raises(CacheError, match=r"returned \(32, 5\), expected \(32, 32\)"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)


# --- damaged caches: nothing is deleted, damaged chunks are named or encoded again alone -----------------


def _no_teacher(*a, **k):
    raise AssertionError("teacher loaded although the run must stop first")


def _rows_of(texts: list[str], c: int, size: int = 32) -> np.ndarray:
    """The corpus rows of cache chunk c, ascending."""
    return np.sort(length_order(texts)[c * size : (c + 1) * size])


def _edit_manifest(folder: Path, **changes) -> None:
    m = read_json(folder / "manifest.json")
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _damage(folder: Path, texts: list[str], kind: str) -> list[int]:
    """Damages a finished cache in place; returns the chunks hit. All but 'nan row' keep every row
    a finite unit vector, which only the checksums can catch."""
    one, two = _rows_of(texts, 1), _rows_of(texts, 2)
    arr = np.load(folder / "vectors.npy", mmap_mode="r+")
    hit = [2]
    if kind == "scrambled":
        arr[one[[0, 1]]] = arr[one[[1, 0]]]
        hit = [1]
    elif kind == "duplicated":
        arr[two[0]] = arr[two[1]]
    elif kind == "sign-flipped":
        arr[two[5]] *= -1
    elif kind == "chunks swapped":
        arr[one], arr[two] = arr[two], arr[one].copy()
        hit = [1, 2]
    elif kind == "nan row":
        arr[two[3], 7] = np.nan
    elif kind == "checksum changed":
        sums = read_json(folder / "manifest.json")["checksums"]
        _edit_manifest(folder, checksums=sums[:2] + ["0" * 32] + sums[3:])
    arr.flush()
    del arr
    return hit


DAMAGE = ["scrambled", "duplicated", "sign-flipped", "chunks swapped", "nan row", "checksum changed"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_open_cache_names_damaged_chunks(built, texts, tmp_path, kind):
    folder = _copy(built, tmp_path)
    clean = _snapshot(folder)
    hit = _damage(folder, texts, kind)
    damaged = _snapshot(folder)
    assert damaged != clean
    with pytest.raises(CacheError, match=rf"{len(hit)} of 4 chunks fail verification \(chunk {hit[0]}: "
                       r".*\)\. Run `python -m mtd.cache CONFIG --verify` .* re-encodes just those chunks"):
        open_cache(folder, texts)
    assert _snapshot(folder) == damaged


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_encodes_again_just_the_damaged_chunks_of_a_finished_cache(
    built, tiny_assets, texts, tmp_path, monkeypatch, caplog, kind
):
    folder = _copy(built, tmp_path)
    hit = _damage(folder, texts, kind)
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    # A start trusts a complete cache's manifest: no row is read, the damage goes unseen ...
    assert build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32) == folder
    assert counting.calls == []
    # ... until it is verified.
    with caplog.at_level(logging.WARNING, logger="mtd.targets.cache"):
        again = build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32, verify=True)
    assert again == folder
    assert f"is finished but {len(hit)} of 4 chunks fail verification (chunk {hit[0]}: " in caplog.text
    assert counting.calls == [_chunk(texts, c) for c in hit]  # the others are kept
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))
    assert read_json(folder / "manifest.json")["checksums"] == read_json(built / "manifest.json")["checksums"]


def test_a_repair_cut_short_is_resumed_not_trusted(built, tiny_assets, texts, tmp_path, monkeypatch):
    """verify=True found chunk 2 damaged and was stopped while encoding it again: the cache is no
    longer marked complete, so the next start resumes the repair instead of trusting it."""
    folder = _copy(built, tmp_path)
    _damage(folder, texts, "sign-flipped")
    monkeypatch.setattr(teachers, "encode", CountingEncode(fail_on=1))
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32, verify=True)
    assert read_json(folder / "manifest.json")["complete"] is False
    resumed = CountingEncode()
    monkeypatch.setattr(teachers, "encode", resumed)
    build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32)
    assert resumed.calls == [_chunk(texts, 2)]
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))


def _hashed_files(monkeypatch) -> list[Path]:
    """The files mtd.io hashes from now on, in order."""
    hashed, real = [], mtd.io._hash_into
    monkeypatch.setattr(mtd.io, "_hash_into", lambda h, path: (hashed.append(path), real(h, path)))
    return hashed


def forbid_all_but_the_manifest(monkeypatch) -> list[Path]:
    """Reading a cache's rows or markers, or loading a teacher, fails the test from now on;
    returns the list of files hashed from now on."""
    def no_rows(*a, **k):
        raise AssertionError("rows, a marker or a teacher read although the cache is complete")

    monkeypatch.setattr(cache, "_chunk_problem", no_rows)
    monkeypatch.setattr(cache, "_marker", no_rows)
    monkeypatch.setattr(teachers, "load_teacher", no_rows)
    return _hashed_files(monkeypatch)


def test_a_complete_cache_starts_from_its_manifest_alone(built, tiny_assets, texts, monkeypatch):
    """No row read, no marker read, no weight file hashed (the memo has the teacher's hash), no
    teacher loaded."""
    hashed = forbid_all_but_the_manifest(monkeypatch)
    assert build_teacher_cache(_cfg(tiny_assets), texts, built.parent, chunk_size=32) == built
    assert hashed == []
    assert (built.parent / "teacher-hashes.json").is_file()


def test_weights_hash_memo_follows_the_files(tiny_assets, tmp_path, monkeypatch):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_assets / "teacher_a", folder)
    memo = tmp_path / "memo.json"
    first = hash_folder(folder, memo)
    assert first == hash_folder(folder) and memo.is_file()
    hashed = _hashed_files(monkeypatch)
    assert hash_folder(folder, memo) == first and hashed == []  # unchanged files: not read again
    # Rewritten in place, same size: the mtime tells.
    weights = next(folder.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = hash_folder(folder, memo)
    assert changed != first and weights in hashed
    assert changed == hash_folder(folder)
    (folder / "added.json").write_text("{}")
    assert hash_folder(folder, memo) == hash_folder(folder) != changed
    memo.write_text("{not json")  # a damaged memo is ignored (and replaced)
    assert hash_folder(folder, memo) == hash_folder(folder)
    assert read_json(memo)[str(folder.resolve())]["sha256"] == hash_folder(folder)


@pytest.mark.parametrize("where", ["pending file", "placed rows", "marker"])
def test_resume_encodes_again_a_finished_chunk_whose_rows_changed(
    built, tiny_assets, texts, tmp_path, monkeypatch, caplog, where
):
    """An unfinished fill is checked in full when it resumes: chunk 1's rows (still in its pending
    file, or already placed in vectors.npy) or its marker no longer match."""
    cfg = _cfg(tiny_assets)
    if where == "placed rows":  # stopped after placing every chunk, before it was marked complete
        folder = _copy(built, tmp_path)
        _edit_manifest(folder, complete=False, checksums=None)
        arr = np.load(folder / "vectors.npy", mmap_mode="r+")
        arr[_rows_of(texts, 1)[4]] *= -1
        arr.flush()
        del arr
        again = [1]
    else:
        folder = _interrupted_fill(cfg, texts, tmp_path, monkeypatch)
        again = [1, 2, 3]
        if where == "pending file":
            data = np.load(folder / "pending" / "000001.npy")
            data[4] *= -1
            np.save(folder / "pending" / "000001.npy", data)
        else:
            (folder / "chunks" / "000001").write_text("0123\n")
    resumed = CountingEncode()
    monkeypatch.setattr(teachers, "encode", resumed)
    with caplog.at_level(logging.WARNING, logger="mtd.targets.cache"):
        build_teacher_cache(cfg, texts, folder.parent, chunk_size=32)
    assert "chunk 1 fails verification (rows do not match the checksum in its marker" in caplog.text
    assert resumed.calls == [_chunk(texts, c) for c in again]  # chunk 0 kept
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))


def test_a_fill_stopped_after_its_last_chunk_is_finished_without_a_teacher(built, tiny_assets, texts,
                                                                           tmp_path, monkeypatch):
    folder = _copy(built, tmp_path)
    _edit_manifest(folder, complete=False, checksums=None)
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    assert build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32) == folder
    assert read_json(folder / "manifest.json") == read_json(built / "manifest.json")


def test_cache_from_before_checksums_is_reused(built, tiny_assets, texts, tmp_path, monkeypatch):
    """Empty markers and no 'checksum(s)' in the manifest: the rows' own check vouches for them,
    once; then their checksums are recorded, and a start needs nothing else."""
    folder = _copy(built, tmp_path)
    m = read_json(folder / "manifest.json")
    del m["checksum"], m["checksums"]
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    for marker in (folder / "chunks").iterdir():
        marker.write_text("")
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32)
    assert counting.calls == []
    assert read_json(folder / "manifest.json") == read_json(built / "manifest.json")
    _damage(folder, texts, "nan row")
    build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32, verify=True)
    assert counting.calls == [_chunk(texts, 2)]
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNTRUSTED = {
    "manifest cut": (lambda f: (f / "manifest.json").write_bytes(b'{"complete": tr'),
                     r"manifest.json unreadable \(.*\); its vectors and chunks are left as they are"),
    "manifest binary": (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"),
                        "manifest.json unreadable"),
    "manifest a list": (lambda f: (f / "manifest.json").write_bytes(b"[1, 2]"),
                        "manifest.json unreadable .not an object with integer"),
    "manifest missing": (lambda f: (f / "manifest.json").unlink(),
                         "manifest.json is missing but 4 chunks are marked finished"),
    "other corpus": (lambda f: _edit_manifest(f, corpus_sha256="0" * 64),
                     r"manifest.json was written for another teacher or corpus \(corpus_sha256 differ"),
    "other teacher": (lambda f: _edit_manifest(f, teacher=read_json(f / "manifest.json")["teacher"]
                                               | {"weights_sha256": "0" * 64}),
                      r"another teacher or corpus \(teacher differ"),
    "vectors truncated": (lambda f: _truncate(f / "vectors.npy"), "vectors.npy unreadable"),
    "vectors wrong dims": (lambda f: np.save(f / "vectors.npy", np.load(f / "vectors.npy")[:, :16]),
                           r"vectors.npy is \(100, 16\) float16, manifest says \(100, 32\) float16"),
}


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
@pytest.mark.parametrize("kind", list(UNTRUSTED))
def test_untrusted_cache_stops_the_build_keeping_every_file(built, tiny_assets, texts, tmp_path,
                                                              monkeypatch, kind, finished):
    damage, match = UNTRUSTED[kind]
    folder = _copy(built, tmp_path)
    _edit_manifest(folder, complete=finished)
    damage(folder)
    before = _snapshot(folder)
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    with pytest.raises(CacheError, match=match) as e:
        build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32)
    assert f"Target cache {folder}: " in str(e.value)
    assert str(e.value).endswith("Delete that folder to have it rebuilt (other caches and runs are not "
                                 "affected).")
    assert _snapshot(folder) == before


def test_resume_with_another_dim_stops(tiny_assets, texts, tmp_path, monkeypatch):
    cfg = _cfg(tiny_assets)
    folder = _interrupted_fill(cfg, texts, tmp_path, monkeypatch, fail_on=2)
    _edit_manifest(folder, dim=48)
    np.save(folder / "vectors.npy", np.full((N_TEXTS, 48), np.nan, dtype=np.float16))
    before = _snapshot(folder)
    with pytest.raises(CacheError, match="manifest.json says dim 48, teacher teacher_a gives 32"):
        build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    assert _snapshot(folder) == before


def test_a_start_killed_before_its_manifest_starts_again(built, tiny_assets, texts, tmp_path):
    """No manifest and no markers: nothing finished, so the placeholder is simply overwritten."""
    folder = _copy(built, tmp_path)
    (folder / "manifest.json").unlink()
    for marker in (folder / "chunks").iterdir():
        marker.unlink()
    _truncate(folder / "vectors.npy")
    build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32)
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))


# --- full disk, read-only or wrong cache_dir ------------------------------------------------------------


def test_too_little_free_space_is_refused_before_allocating(tiny_assets, texts, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=15000))
    with pytest.raises(CacheError, match=r"100 x 32 float16 vectors need 17,696 bytes \(0\.0 MB\) while they "
                       r"are written \(twice their size, until the end\), but only 15,000 bytes \(0\.0 MB\) "
                       r"are free on that disk\. Free space there, or set cache_dir"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    assert not list(tmp_path.rglob("vectors.npy"))


def test_disk_full_while_writing_a_chunk_keeps_the_finished_ones(built, tiny_assets, texts, tmp_path,
                                                                  monkeypatch):
    real, writes = cache.atomic_save_npy, []

    def save(path, array):
        writes.append(path)
        if len(writes) > 3:  # texts.npy, chunks 0 and 1 fit on the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, array)

    monkeypatch.setattr(cache, "atomic_save_npy", save)
    with pytest.raises(CacheError, match=r"writing chunk 2 failed; the 2 chunks finished so far are kept\. "
                       r"Cannot write .*teacher_a-\w+/pending/000002.npy \(No space left on device\): the "
                       r"disk is full"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    monkeypatch.setattr(cache, "atomic_save_npy", real)
    (folder,) = _folders(tmp_path)
    assert sorted(p.name for p in (folder / "chunks").iterdir()) == ["000000", "000001"]
    resumed = CountingEncode()
    monkeypatch.setattr(teachers, "encode", resumed)
    build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    assert resumed.calls == [_chunk(texts, 2), _chunk(texts, 3)]
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))


def test_disk_full_while_placing_rows_keeps_every_encoded_chunk(built, tiny_assets, texts, tmp_path,
                                                                 monkeypatch):
    real, writes = os.pwrite, []

    def pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) > 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(CacheError, match=r"placing rows in vectors.npy failed; the 4 chunks finished so far "
                       r"are kept\. Cannot write .*vectors.npy \(No space left on device\)"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    monkeypatch.setattr(os, "pwrite", real)
    (folder,) = _folders(tmp_path)
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)  # every chunk waits in its pending file
    build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    np.testing.assert_array_equal(open_cache(folder, texts), open_cache(built, texts))
    assert not list((folder / "pending").iterdir())


def test_cache_dir_that_is_a_file(tiny_assets, texts, tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    path = tmp_path / "cache"
    path.write_text("my notes", encoding="utf-8")
    with pytest.raises(CacheError, match=r"cache_dir: .*cache is a file, not a folder\. Set cache_dir to a "
                       r"folder \(e\.g\. cache_dir=.*cache-cache\), or move the file"):
        build_teacher_cache(_cfg(tiny_assets), texts, path, chunk_size=32)
    assert path.read_text(encoding="utf-8") == "my notes"


def _read_only(monkeypatch, code: int) -> None:
    """Every new file fails as on a read-only disk (root writes through chmod, so it is simulated)."""
    def refuse(*a, dir=None, **k):
        raise OSError(code, os.strerror(code), str(dir))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # atomic writes


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_cache_dir_stops_before_the_teacher_loads(tiny_assets, texts, tmp_path, monkeypatch, code):
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    _read_only(monkeypatch, code)
    with pytest.raises(CacheError, match=rf"cache_dir {tmp_path} is not writable \({os.strerror(code)}: "
                       rf"{tmp_path}\), .* set cache_dir to a writable folder"):
        build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_unwritable_cache_dir_for_real(tiny_assets, texts, tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(CacheError, match=r"is not writable \(Permission denied"):
            build_teacher_cache(_cfg(tiny_assets), texts, tmp_path, chunk_size=32)
    finally:
        tmp_path.chmod(0o700)


def test_finished_cache_is_reused_from_a_read_only_cache_dir(built, tiny_assets, texts, tmp_path,
                                                               monkeypatch):
    folder = _copy(built, tmp_path)
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher)
    _read_only(monkeypatch, errno.EROFS)
    assert build_teacher_cache(_cfg(tiny_assets), texts, folder.parent, chunk_size=32) == folder


# --- open_cache rejects what it can not read -----------------------------------------------------------


def _rejects(folder: Path, texts: list[str], match: str) -> None:
    with pytest.raises(CacheError, match=match) as e:
        open_cache(folder, texts)
    msg = str(e.value)
    assert str(folder) in msg and "Delete that folder" in msg


def test_open_cache_accepts_the_clean_copy(built, texts, tmp_path):
    open_cache(_copy(built, tmp_path), texts)  # the corruptions below are the cause


def _spoil_row(folder: Path, row: int, edit: str) -> None:
    """Row `row` of folder's vectors.npy made a NaN row or scaled (no longer a unit vector)."""
    arr = np.load(folder / "vectors.npy", mmap_mode="r+")
    if edit == "nan":
        arr[row, 3] = np.nan
    else:
        arr[row] *= {"double": 2.0, "half": 0.5}[edit]
    arr.flush()
    del arr


@pytest.mark.parametrize(("row", "edit"), [(57, "nan"), (80, "double")])
def test_bad_row_is_described(built, texts, tmp_path, row, edit):
    folder = _copy(built, tmp_path)
    _spoil_row(folder, row, edit)
    c = list(length_order(texts)).index(row) // 32
    with pytest.raises(CacheError, match=rf"chunk {c}: rows do not match the checksum in the manifest; "
                       rf"1 rows are not finite unit vectors \(first: row {row}\)"):
        open_cache(folder, texts)


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01garbage" * 100, b"\x93NUMPY\x01\x00{bad header"])
def test_garbage_vectors(built, texts, tmp_path, garbage):
    folder = _copy(built, tmp_path)
    (folder / "vectors.npy").write_bytes(garbage)
    _rejects(folder, texts, "vectors.npy unreadable")


def test_vectors_wrong_shape_or_dtype(built, texts, tmp_path):
    folder = _copy(built, tmp_path)
    arr = np.array(open_cache(folder, texts))  # a copy: the file is rewritten below
    np.save(folder / "vectors.npy", arr[:, :16])
    _rejects(folder, texts, "manifest says")
    np.save(folder / "vectors.npy", arr.astype(np.float32))
    _rejects(folder, texts, "float32")


def test_missing_vectors(built, texts, tmp_path):
    folder = _copy(built, tmp_path)
    (folder / "vectors.npy").unlink()
    _rejects(folder, texts, "vectors.npy unreadable")


def test_incomplete_manifest(built, texts, tmp_path):
    folder = _copy(built, tmp_path)
    _edit_manifest(folder, complete=False)
    _rejects(folder, texts, "incomplete")


@pytest.mark.parametrize(
    "content",
    [b'{"complete": tr', b"\xff\xfe\x00garbage", b"[1, 2]", b'{"complete": true}', None],
    ids=["cut", "binary", "list", "no-rows", "missing"],
)
def test_unreadable_manifest(built, texts, tmp_path, content):
    folder = _copy(built, tmp_path)
    if content is None:
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_bytes(content)
    _rejects(folder, texts, "manifest.json unreadable")


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t + ["one more"], f"has {N_TEXTS} rows, the corpus has {N_TEXTS + 1}"),
    (lambda t: t[:-1] + ["another text"], r"built for another corpus \(corpus_sha256 differs\)"),
])
def test_wrong_corpus(built, texts, tmp_path, change, match):
    with pytest.raises(CacheError, match=match + r"\. Pass the texts it was built from"):
        open_cache(built, change(texts))


# --- cached_targets -----------------------------------------------------------------------------------------


def test_cached_targets_shapes(tiny_assets, texts, tmp_path):
    cfgs = [_cfg(tiny_assets, "teacher_a"), _cfg(tiny_assets, "teacher_b")]
    arrays = cached_targets(cfgs, texts[:40], tmp_path, chunk_size=16)
    assert [a.shape for a in arrays] == [(40, 32), (40, 48)]
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 for a in arrays)
    assert len(_folders(tmp_path)) == 2
    np.testing.assert_allclose(np.asarray(arrays[1], dtype=np.float32),
                               _reference(tiny_assets, "teacher_b", texts[:40]), atol=2e-3)


# --- rows copied from other caches of the same teacher ----------------------------------------------------


@pytest.fixture(scope="module")
def grown(tiny_assets, texts, tmp_path_factory) -> SimpleNamespace:
    """Corpus B: 80 of `texts` (the `built` cache's corpus, A) in another order among 30 new texts,
    and a cache of B filled in an empty root (nothing to copy from)."""
    new = tiny_assets.joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()[N_TEXTS : N_TEXTS + 30]
    assert not set(new) & set(texts)
    b = new[:15] + texts[79::-1] + new[15:]
    fresh = build_teacher_cache(_cfg(tiny_assets), b, tmp_path_factory.mktemp("cache-b"), chunk_size=32)
    return SimpleNamespace(texts=b, new=new, fresh=fresh)


def _encoded(counting: CountingEncode) -> list[str]:
    return sorted(t for call in counting.calls for t in call)


def _as_float(folder: Path, texts: list[str]) -> np.ndarray:
    return np.asarray(open_cache(folder, texts), dtype=np.float32)


def _no_teacher_needed(*a, **k):
    raise AssertionError("teacher loaded although every row is in another cache of it")


def test_texts_npy_holds_the_hash_of_each_text(built, texts):
    hashes = np.load(built / "texts.npy")
    assert hashes.dtype == np.dtype("<u8") and hashes.shape == (N_TEXTS,)
    assert hashes[7] == int.from_bytes(hashlib.blake2b(texts[7].encode("utf-8"), digest_size=8).digest(),
                                       "little")
    np.testing.assert_array_equal(hashes, cache.text_hashes(texts))
    assert len(set(hashes.tolist())) == N_TEXTS


def test_a_grown_corpus_copies_the_rows_it_shares_and_encodes_only_the_new_texts(
    built, grown, tiny_assets, texts, tmp_path, monkeypatch, caplog
):
    root = _copy(built, tmp_path).parent
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    with caplog.at_level(logging.INFO, logger="mtd.targets.cache"):
        folder = build_teacher_cache(_cfg(tiny_assets), grown.texts, root, chunk_size=32)
    assert folder.name == grown.fresh.name and _folders(root) == sorted([root / built.name, folder])
    assert _encoded(counting) == sorted(grown.new)
    assert (f"80 rows copied from other caches of this teacher (80 from {root / built.name}), "
            "30 encoded") in caplog.text
    np.testing.assert_allclose(_as_float(folder, grown.texts), _as_float(grown.fresh, grown.texts),
                               atol=2e-3, rtol=0)
    np.testing.assert_array_equal(np.load(folder / "texts.npy"), cache.text_hashes(grown.texts))
    # and the copied rows are A's own, bit for bit
    a = open_cache(built, texts)
    np.testing.assert_array_equal(open_cache(folder, grown.texts)[15:95], a[79::-1])


def test_a_corpus_of_known_texts_never_loads_the_teacher(built, tiny_assets, texts, tmp_path, monkeypatch):
    root = _copy(built, tmp_path).parent
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher_needed)
    monkeypatch.setattr(teachers, "encode", _no_teacher_needed)
    subset = texts[90:5:-3] + texts[:3]
    folder = build_teacher_cache(_cfg(tiny_assets), subset, root, chunk_size=8)
    rows = [texts.index(t) for t in subset]
    np.testing.assert_array_equal(open_cache(folder, subset), open_cache(built, texts)[rows])
    # a complete cache that got every row from others gives them in turn
    again = build_teacher_cache(_cfg(tiny_assets), subset[::-1], root, chunk_size=8)
    np.testing.assert_array_equal(open_cache(again, subset[::-1]), open_cache(built, texts)[rows[::-1]])


@pytest.mark.parametrize("other", [{"prompt": "query: "}, {"max_length": 16}], ids=["prompt", "max_length"])
def test_a_cache_of_another_teacher_identity_gives_no_rows(built, tiny_assets, texts, tmp_path,
                                                           monkeypatch, other):
    """Same teacher name and weights (so its folder sits among this one's), another identity."""
    root = _copy(built, tmp_path).parent
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    subset = texts[40:]
    folder = build_teacher_cache(_cfg(tiny_assets, **other), subset, root, chunk_size=32)
    assert folder.name.split("-")[0] == built.name.split("-")[0]
    assert _encoded(counting) == sorted(subset)
    if "prompt" in other:
        np.testing.assert_allclose(_as_float(folder, subset),
                                   _reference(tiny_assets, "teacher_a", subset, other["prompt"]), atol=2e-3)


@pytest.mark.parametrize("edit", ["nan", "half"])
def test_a_damaged_row_of_another_cache_is_encoded_not_copied(built, tiny_assets, texts, tmp_path,
                                                              monkeypatch, caplog, edit):
    donor = _copy(built, tmp_path)
    row = 57
    _spoil_row(donor, row, edit)
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    subset = texts[30:70]
    with caplog.at_level(logging.INFO, logger="mtd.targets.cache"):
        folder = build_teacher_cache(_cfg(tiny_assets), subset, donor.parent, chunk_size=32)
    assert counting.calls == [[texts[row]]]
    assert (f"Target cache {donor}: 1 of the rows found there are not finite unit vectors "
            f"(first: {texts[row]!r}); their texts were encoded instead") in caplog.text
    assert "39 rows copied from other caches of this teacher" in caplog.text and "1 encoded" in caplog.text
    np.testing.assert_allclose(_as_float(folder, subset), _reference(tiny_assets, "teacher_a", subset),
                               atol=2e-3, rtol=0)


def _no_longer_a_donor(folder: Path, how: str) -> None:
    if how == "incomplete":
        _edit_manifest(folder, complete=False)
    elif how == "texts.npy missing":  # a cache filled before texts.npy
        (folder / "texts.npy").unlink()
    elif how == "texts.npy changed":
        hashes = np.load(folder / "texts.npy")
        hashes[[3, 4]] = hashes[[4, 3]]
        np.save(folder / "texts.npy", hashes)
    elif how in ("texts.npy short", "texts.npy int64"):  # and its checksum in the manifest to match
        hashes = np.load(folder / "texts.npy")
        hashes = hashes[1:] if how == "texts.npy short" else hashes.view("<i8")
        np.save(folder / "texts.npy", hashes)
        _edit_manifest(folder, texts_checksum=hashlib.blake2b(hashes, digest_size=16).hexdigest())
    elif how == "manifest unreadable":
        (folder / "manifest.json").write_text("[1, 2]")
    elif how == "vectors short":
        np.save(folder / "vectors.npy", np.load(folder / "vectors.npy")[:-1])


@pytest.mark.parametrize("how", ["incomplete", "texts.npy missing", "texts.npy changed", "texts.npy short",
                                 "texts.npy int64", "manifest unreadable", "vectors short"])
def test_a_cache_that_can_not_be_trusted_gives_no_rows(built, tiny_assets, texts, tmp_path, monkeypatch, how):
    donor = _copy(built, tmp_path)
    _no_longer_a_donor(donor, how)
    before = _snapshot(donor)
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    subset = texts[:60][::-1]
    folder = build_teacher_cache(_cfg(tiny_assets), subset, donor.parent, chunk_size=32)
    assert _encoded(counting) == sorted(subset)
    np.testing.assert_allclose(_as_float(folder, subset), _reference(tiny_assets, "teacher_a", subset),
                               atol=2e-3, rtol=0)
    assert _snapshot(donor) == before  # left as it is


def test_two_processes_copy_and_encode_each_their_own_chunks(built, grown, tiny_assets, texts, tmp_path,
                                                             monkeypatch, caplog):
    """Rank r fills chunks r and r + 2: it encodes just their new texts, and loads the teacher only
    if they have any."""
    root = _copy(built, tmp_path).parent
    threads = Threads(2, monkeypatch)
    encoded, loaded = {0: [], 1: []}, []
    real_encode, real_load = teachers.encode, teachers.load_teacher

    def encode(model, chunk_texts, cfg):
        encoded[threads.local.rank] += chunk_texts
        return real_encode(model, chunk_texts, cfg)

    def load(*a, **k):
        loaded.append(threads.local.rank)
        return real_load(*a, **k)

    monkeypatch.setattr(teachers, "encode", encode)
    monkeypatch.setattr(teachers, "load_teacher", load)
    cfg = _cfg(tiny_assets)

    def fill(corpus: list[str], size: int) -> list:
        for seen in (loaded, encoded[0], encoded[1]):
            seen.clear()
        return threads.run(lambda p: build_teacher_cache(cfg, corpus, root, chunk_size=size, processes=p))

    with caplog.at_level(logging.INFO, logger="mtd.targets.cache"):
        outcome = fill(grown.texts, 32)
    folder = root / grown.fresh.name
    assert outcome == [folder, folder]
    new = {r: sorted(t for c in (r, r + 2) for t in _chunk(grown.texts, c) if t in grown.new) for r in (0, 1)}
    assert {r: sorted(encoded[r]) for r in (0, 1)} == new
    assert sorted(loaded) == [r for r in (0, 1) if new[r]]
    for r in (0, 1):
        shared = sum(len(_chunk(grown.texts, c)) for c in (r, r + 2)) - len(new[r])
        assert (f"Teacher teacher_a (process {r} of 2): {shared} rows copied from other caches of this "
                f"teacher ({shared} from {root / built.name}), {len(new[r])} encoded.") in caplog.text
    np.testing.assert_allclose(_as_float(folder, grown.texts), _as_float(grown.fresh, grown.texts),
                               atol=2e-3, rtol=0)
    # 3 new texts, shorter than the rest, so in the last chunk (2, rank 0's): rank 1 loads no teacher
    known = texts[:37]
    corpus = tiny_assets.joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()
    shortest = sorted(corpus[N_TEXTS:], key=len)[:3]
    assert max(map(len, shortest)) < min(map(len, known))
    outcome = fill(known + shortest, 16)
    assert loaded == [0] and {r: sorted(encoded[r]) for r in (0, 1)} == {0: sorted(shortest), 1: []}
    np.testing.assert_allclose(_as_float(outcome[0], known + shortest),
                               _reference(tiny_assets, "teacher_a", known + shortest), atol=2e-3, rtol=0)
    # a corpus of known texts: neither process loads it
    subset = grown.texts[::-2]
    outcome = fill(subset, 16)
    assert loaded == [] and encoded == {0: [], 1: []} and outcome[0] == outcome[1]
    np.testing.assert_array_equal(open_cache(outcome[0], subset), open_cache(folder, grown.texts)[::-2])


def test_a_fill_started_before_texts_npy_records_it_when_it_resumes(tiny_assets, texts, tmp_path,
                                                                    monkeypatch):
    cfg = _cfg(tiny_assets)
    folder = _interrupted_fill(cfg, texts, tmp_path, monkeypatch)
    (folder / "texts.npy").unlink()
    m = read_json(folder / "manifest.json")
    del m["texts_checksum"]
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    monkeypatch.setattr(teachers, "encode", CountingEncode())
    build_teacher_cache(cfg, texts, tmp_path, chunk_size=32)
    np.testing.assert_array_equal(np.load(folder / "texts.npy"), cache.text_hashes(texts))
    # so it gives its rows from now on
    monkeypatch.setattr(teachers, "load_teacher", _no_teacher_needed)
    subset = texts[::-1][:50]
    other = build_teacher_cache(cfg, subset, tmp_path, chunk_size=32)
    np.testing.assert_array_equal(open_cache(other, subset), open_cache(folder, texts)[::-1][:50])


def test_caches_of_one_teacher_that_disagree_on_its_dim_give_no_rows(built, tiny_assets, texts, tmp_path,
                                                                     monkeypatch, caplog):
    """Two caches of the same identity, one of them (edited by hand) 16-d: neither is trusted."""
    donor = _copy(built, tmp_path)
    edited = donor.with_name(donor.name[:-1] + ("0" if donor.name[-1] != "0" else "1"))
    shutil.copytree(donor, edited)
    cut = np.load(edited / "vectors.npy")[:, :16].astype(np.float32)
    np.save(edited / "vectors.npy", (cut / np.linalg.norm(cut, axis=1, keepdims=True)).astype(np.float16))
    _edit_manifest(edited, dim=16)
    counting = CountingEncode()
    monkeypatch.setattr(teachers, "encode", counting)
    subset = texts[:50]
    with caplog.at_level(logging.WARNING, logger="mtd.targets.cache"):
        folder = build_teacher_cache(_cfg(tiny_assets), subset, donor.parent, chunk_size=32)
    assert "Target caches of teacher teacher_a disagree on its dim" in caplog.text
    assert _encoded(counting) == sorted(subset)
    np.testing.assert_allclose(_as_float(folder, subset), _reference(tiny_assets, "teacher_a", subset),
                               atol=2e-3, rtol=0)
