"""On-disk teacher target cache: each teacher encodes the corpus once, into a float16 file.

Layout of one cache folder (CACHE_ROOT/<teacher>-<key>/):
    vectors.npy    (N, D) float16, L2-normalized teacher vectors; created full of NaN, so a row
                   that was never written can not pass for data
    chunks/NNNNNN  marker per finished chunk, written after its rows reached the disk; it holds the
                   blake2b checksum of the chunk's rows (in row order), so a marker is only trusted
                   while the rows still match it
    manifest.json  teacher identity (weights hash, pooling, prompt, max length, dtype), corpus
                   fingerprint, dim, chunk size, rows written, complete flag

The key hashes the teacher identity and the corpus fingerprint, so a changed teacher or corpus gets
a new folder (the old one is left alone) and an interrupted fill resumes chunk by chunk. With
several processes, chunk c is encoded by rank c % world_size; markers make that safe without locks.
Vectors are stored normalized because the multi-teacher target only uses directions, and unit rows
can not overflow float16.

A finished cache costs hours of teacher time, so nothing here deletes one. A folder that can not be
trusted as a whole (manifest unreadable or for another teacher/corpus, vectors of the wrong shape)
stops the run with a message naming the file and the folder to delete; a chunk whose rows fail their
checksum is re-encoded alone, with a warning, and the other chunks are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtd.config import TeacherConfig
from mtd.errors import MtdError, explain_os_error
from mtd.io import atomic_write_json, atomic_write_text, hash_texts, read_json
from mtd.targets import teachers

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: chunks follow the corpus's length order
VECTORS = "vectors.npy"
MANIFEST = "manifest.json"
CHUNKS = "chunks"
CHECKSUM = "blake2b-128"  # manifests without it predate checksums: their markers are empty
NOT_WRITTEN = "not written"


class CacheError(MtdError, RuntimeError):
    """A cache folder that is incomplete, corrupt, or does not match what the run needs."""


def cache_folder(root: Path, identity: dict[str, Any], corpus_sha256: str, rows: int) -> Path:
    key_src = json.dumps([CACHE_VERSION, identity, corpus_sha256, rows], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity["name"])
    return Path(root) / f"{safe}-{key}"


_REBUILD = "Delete that folder to have it rebuilt (other caches and runs are not affected)."


def _fail(folder: Path, problem: str, fix: str = _REBUILD) -> CacheError:
    return CacheError(f"Target cache {folder}: {problem}. {fix}")


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, or an error saying what is wrong with it (never a reason to start again:
    it is written atomically, so an unreadable one is damage, and the chunks beside it are kept)."""
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        problem = f"{MANIFEST} unreadable ({e}); its vectors and chunks are left as they are"
        raise _fail(folder, problem) from None
    ints = ("rows", "dim", "chunk_size")
    if not (isinstance(manifest, dict) and all(isinstance(manifest.get(k), int) for k in ints)
            and manifest["chunk_size"] > 0):
        raise _fail(folder, f"{MANIFEST} unreadable (not an object with integer "
                    f"{', '.join(map(repr, ints))}); its vectors and chunks are left as they are")
    return manifest


def _load_vectors(folder: Path, manifest: dict[str, Any]) -> np.ndarray:
    """vectors.npy, read-only, after checking it has the manifest's shape and dtype."""
    try:
        arr = np.load(folder / VECTORS, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise _fail(folder, f"{VECTORS} unreadable ({e})") from None
    expected = (manifest["rows"], manifest["dim"])
    if arr.shape != expected or arr.dtype != np.float16:
        raise _fail(folder, f"{VECTORS} is {arr.shape} {arr.dtype}, manifest says {expected} float16")
    return arr


def _chunk_rows(order: np.ndarray, chunk: int) -> list[np.ndarray]:
    """The corpus rows of each chunk, ascending (the order they are written and checksummed in)."""
    return [np.sort(order[c : c + chunk]) for c in range(0, len(order), chunk)]


def _digest(data: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(data), digest_size=16).hexdigest()


def _marker(folder: Path, c: int) -> Path:
    return folder / CHUNKS / f"{c:06d}"


def _markers(folder: Path) -> list[Path]:
    return list((folder / CHUNKS).glob("[0-9]" * 6))


def _row_damage(data: np.ndarray, rows: np.ndarray) -> str | None:
    """Rows that are not finite unit vectors (unwritten NaN rows, bit rot), described, or None."""
    part = data.astype(np.float32)
    bad = ~np.isfinite(part).all(axis=1) | (np.abs(np.linalg.norm(part, axis=1) - 1.0) > 1e-2)
    if not bad.any():
        return None
    return f"{int(bad.sum())} rows are not finite unit vectors (first: row {rows[np.flatnonzero(bad)[0]]})"


def _chunk_problem(folder: Path, arr: np.ndarray, c: int, rows: np.ndarray, checksummed: bool) -> str | None:
    """Why chunk c's rows can not be trusted, or None when its marker vouches for them."""
    try:
        recorded = _marker(folder, c).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return NOT_WRITTEN
    except (OSError, ValueError) as e:
        return f"marker unreadable ({e})"
    data = arr[rows]
    if recorded == _digest(data):
        return None
    if not recorded and not checksummed:  # a marker from before checksums: the rows must do
        return _row_damage(data, rows)
    problem = "rows do not match the checksum in its marker" if recorded else "marker has no checksum"
    damage = _row_damage(data, rows)
    return f"{problem}{f'; {damage}' if damage else ''}"


def _problems(folder: Path, arr: np.ndarray, manifest: dict[str, Any], chunks: list[np.ndarray],
              which: Sequence[int] | None = None) -> dict[int, str]:
    """{chunk: problem} over `which` chunks (default all): missing markers and failed checks."""
    checksummed = manifest.get("checksum") == CHECKSUM
    found = {}
    for c in range(len(chunks)) if which is None else which:
        problem = _chunk_problem(folder, arr, c, chunks[c], checksummed)
        if problem is not None:
            found[c] = problem
    return found


def _describe(problems: dict[int, str], n_chunks: int) -> str:
    listed = "; ".join(f"chunk {c}: {p}" for c, p in list(problems.items())[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return f"{len(problems)} of {n_chunks} chunks fail verification ({listed}{more})"


def open_cache(folder: str | Path, texts: Sequence[str]) -> np.ndarray:
    """The (N, D) float16 memmap of a finished cache of `texts`, after checking it end to end:
    manifest, corpus fingerprint, shape, and every chunk against the checksum in its marker."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    other = "Pass the texts it was built from, or build a cache for these with build_teacher_cache."
    if manifest["rows"] != len(texts):
        raise _fail(folder, f"has {manifest['rows']} rows, the corpus has {len(texts)}", other)
    if manifest.get("corpus_sha256") != hash_texts(texts):
        raise _fail(folder, "was built for another corpus (corpus_sha256 differs)", other)
    if not manifest.get("complete"):
        raise _fail(folder, f"incomplete ({manifest.get('rows_written', 0)} of "
                    f"{manifest['rows']} rows); rerun to resume filling it instead")
    arr = _load_vectors(folder, manifest)
    chunks = _chunk_rows(length_order(texts), manifest["chunk_size"])
    problems = _problems(folder, arr, manifest, chunks)
    if problems:
        raise _fail(folder, _describe(problems, len(chunks)), "Run build_teacher_cache (what train.py "
                    "runs) again: it re-encodes just those chunks and keeps the others.")
    return arr


def _existing_manifest(folder: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a fill already started in `folder` for this teacher and corpus (its vectors
    of the right shape), or None when there is none. A folder that can not be trusted stops the
    run, before any teacher loads, every file kept."""
    if not (folder / MANIFEST).exists():
        markers = _markers(folder)
        if markers:  # killed before the manifest is written, there are none
            raise _fail(folder, f"{MANIFEST} is missing but {len(markers)} chunks are marked finished")
        return None  # nothing finished: a fill starts (again) from scratch
    manifest = _read_manifest(folder)
    wrong = [k for k, v in expected.items() if manifest.get(k) != v]
    if wrong:
        raise _fail(folder, f"{MANIFEST} was written for another teacher or corpus ({', '.join(wrong)} "
                    "differ from this run's), so its vectors can not be trusted")
    _load_vectors(folder, manifest)
    return manifest


def _check_writable(root: Path, folder: Path) -> None:
    """Before a teacher loads (minutes): cache_dir must be a folder that takes new files."""
    for path in (root, folder):
        if path.exists() and not path.is_dir():
            raise CacheError(f"cache_dir: {path} is a file, not a folder. Set cache_dir to a folder "
                             f"(e.g. cache_dir={root.with_name(root.name + '-cache')}), or move the file.")
    path = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        for path in (root, folder, folder / CHUNKS):
            if path.is_dir():
                tempfile.TemporaryFile(dir=path).close()
        path = folder / VECTORS
        if path.exists():
            open(path, "r+b").close()
    except OSError as e:
        raise CacheError(
            f"cache_dir {root} is not writable ({e.strerror}: {path}), and teacher vectors are stored "
            "there. Fix its permissions, or set cache_dir to a writable folder "
            "(e.g. cache_dir=/path/on/a/writable/disk)."
        ) from None


@contextmanager
def _explained(folder: Path, doing: str, path: Path) -> Iterator[None]:
    """Environment OSErrors (disk full, read-only...) while `doing` something to `path`, as one
    CacheError that says what is kept."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or str(path)  # os.pwrite's errors name no file
        why = explain_os_error(e)
        if why is None:
            raise
        done = len(_markers(folder))
        kept = f"; the {done} chunks finished so far are kept" if done else ""
        raise CacheError(f"Target cache {folder}: {doing} failed{kept}. {why}") from e


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:,.1f} MB)"


def _check_free_space(folder: Path, rows: int, dim: int) -> None:
    """A full disk must stop the fill now, with the numbers, not hours later."""
    needed = rows * dim * np.dtype(np.float16).itemsize + 4096  # + header, manifest, markers
    old = folder / VECTORS  # a placeholder left by a killed start is overwritten
    free = shutil.disk_usage(folder.parent).free + (old.stat().st_size if old.exists() else 0)
    if needed > free:
        raise CacheError(
            f"Target cache {folder}: {rows} x {dim} float16 vectors need {_size(needed)}, but only "
            f"{_size(free)} are free on that disk. Free space there, or set cache_dir to a folder on "
            "a disk with room (e.g. cache_dir=/other/disk/cache)."
        )


def _allocate(path: Path, rows: int, dim: int, block_bytes: int = 1 << 24) -> None:
    """vectors.npy full of NaN, written for real: the space is taken now (a full disk raises here),
    and later row writes never fill a hole in a sparse file (which dies with SIGBUS under mmap)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (rows, dim)}
    nan_rows = np.full((max(1, block_bytes // (2 * dim)), dim), np.nan, dtype=np.float16)
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, rows, len(nan_rows)):
                f.write(nan_rows[: rows - start])
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # only NaN placeholder: freeing the space loses nothing
        raise


def _start(folder: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, no fill started: the NaN-filled array, then the manifest that makes it a fill."""
    _check_free_space(folder, manifest["rows"], manifest["dim"])
    (folder / CHUNKS).mkdir(parents=True, exist_ok=True)
    with _explained(folder, f"allocating {VECTORS}", folder / VECTORS):
        _allocate(folder / VECTORS, manifest["rows"], manifest["dim"])
    atomic_write_json(folder / MANIFEST, manifest)


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Longest first (stable): chunk c holds rows order[c*chunk:(c+1)*chunk].

    Sorting the whole corpus, not each chunk, keeps padding as low as one big encode() call
    (which sorts by length itself); the order is a pure function of the texts, so resumes agree.
    """
    return np.argsort([-len(t) for t in texts], kind="stable")


def _encode_checked(model, cfg: TeacherConfig, texts: list[str], rows: np.ndarray, dim: int):
    """(n, dim) unit float16 rows, or an error naming the corpus row the teacher failed on."""
    vecs = teachers.encode(model, texts, cfg)
    if vecs.shape != (len(texts), dim):
        raise CacheError(f"teacher {cfg.name} returned {vecs.shape}, expected {(len(texts), dim)}.")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    bad = ~np.isfinite(vecs).all(axis=1) | (norms[:, 0] == 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CacheError(
            f"teacher {cfg.name} gave a zero or non-finite vector for text {rows[i]} "
            f"({texts[i][:80]!r}). "
            "Try dtype: float32 for this teacher, or drop the text."
        )
    return (vecs / norms).astype(np.float16)


def _write_rows(path: Path, offset: int, rows: np.ndarray, data: np.ndarray) -> None:
    """Row i of `data` to row rows[i] of the .npy at `path`, on disk when this returns.

    Plain writes, not the memmap: a full disk raises ENOSPC here instead of SIGBUS later."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for row, vec in zip(rows, data, strict=True):
            view, pos = memoryview(vec).cast("B"), 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], offset + int(row) * len(view) + pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def _todo(folder: Path, arr: np.ndarray, manifest: dict[str, Any], chunks: list[np.ndarray],
          mine: range) -> list[int]:
    """This rank's chunks to encode: unwritten ones, and (loudly) those whose marker is not borne
    out by their rows, which are encoded again alone."""
    problems = _problems(folder, arr, manifest, chunks, mine)
    for c, problem in problems.items():
        if problem != NOT_WRITTEN:
            logger.warning("Target cache %s: chunk %d fails verification (%s); encoding it again "
                           "(the other chunks are kept).", folder, c, problem)
    return list(problems)


def _fill_chunks(model, cfg: TeacherConfig, texts: Sequence[str], folder: Path,
                 manifest: dict[str, Any], rank: int, world: int) -> None:
    arr = np.load(folder / VECTORS, mmap_mode="r")
    order = length_order(texts)
    chunk = manifest["chunk_size"]  # a resumed fill keeps its chunking
    chunks = _chunk_rows(order, chunk)
    todo = _todo(folder, arr, manifest, chunks, range(rank, len(chunks), world))
    bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc=f"teacher {cfg.name}", unit="text",
               disable=rank != 0)
    for c in todo:
        in_length_order = order[c * chunk : (c + 1) * chunk]  # similar lengths batch together
        vecs = _encode_checked(model, cfg, [texts[i] for i in in_length_order], in_length_order,
                               arr.shape[1])
        data = vecs[np.argsort(in_length_order)]  # rows ascending, as chunks[c]
        with _explained(folder, f"writing chunk {c}", folder):
            _write_rows(folder / VECTORS, arr.offset, chunks[c], data)
            atomic_write_text(_marker(folder, c), _digest(data) + "\n")  # after the rows are on disk
        bar.update(len(data))
    bar.close()


def _finish(folder: Path, texts: Sequence[str]) -> None:
    """Rank 0, all ranks' chunks written: check every chunk, then mark the cache complete."""
    manifest = _read_manifest(folder)
    chunks = _chunk_rows(length_order(texts), manifest["chunk_size"])
    problems = _problems(folder, _load_vectors(folder, manifest), manifest, chunks)
    unwritten = sum(p == NOT_WRITTEN for p in problems.values())
    if unwritten:
        raise _fail(folder, f"only {len(chunks) - unwritten} chunks finished",
                    "Run every rank (world_size processes) to fill the rest; finished chunks are kept.")
    if problems:
        raise _fail(folder, _describe(problems, len(chunks)),
                    "Run the same command again: it re-encodes just those chunks.")
    manifest.update(rows_written=len(texts), complete=True)
    atomic_write_json(folder / MANIFEST, manifest)


def _verified_complete(folder: Path, manifest: dict[str, Any] | None, texts: Sequence[str]) -> bool:
    """Whether a finished cache can be reused as it is; damaged chunks are logged (and then
    re-encoded by the caller)."""
    if manifest is None or manifest.get("complete") is not True:
        return False
    chunks = _chunk_rows(length_order(texts), manifest["chunk_size"])
    problems = _problems(folder, _load_vectors(folder, manifest), manifest, chunks)
    if problems:
        logger.warning("Target cache %s is finished but %s; encoding just those again.",
                       folder, _describe(problems, len(chunks)))
    return not problems


def build_teacher_cache(
    cfg: TeacherConfig,
    texts: Sequence[str],
    root: str | Path,
    *,
    chunk_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    device: str | None = None,
) -> Path:
    """Fill (or reuse, resume or repair) this teacher's cache for `texts`; returns the folder,
    every chunk of it checked against its checksum.

    Every process must call this (collectively, same arguments but rank). `barrier` synchronizes
    them; its default suits a single process.
    """
    if not texts:
        raise CacheError("Cannot build a target cache for an empty corpus.")
    root = Path(root)
    model_folder = teachers.teacher_folder(cfg)
    identity = json.loads(json.dumps(teachers.teacher_identity(cfg, model_folder)))  # as stored
    corpus_sha = hash_texts(texts)
    folder = cache_folder(root, identity, corpus_sha, len(texts))
    expected = {"version": CACHE_VERSION, "teacher": identity, "corpus_sha256": corpus_sha,
                "rows": len(texts)}
    manifest = _existing_manifest(folder, expected)
    if _verified_complete(folder, manifest, texts):
        logger.info("Teacher %s: reusing target cache %s", cfg.name, folder)
        return folder
    _check_writable(root, folder)
    logger.info("Teacher %s: encoding %d texts into %s", cfg.name, len(texts), folder)
    model = teachers.load_teacher(cfg, model_folder, device=device)
    dim = teachers.embedding_dim(model)
    if manifest is not None and manifest["dim"] != dim:
        raise _fail(folder, f"{MANIFEST} says dim {manifest['dim']}, teacher {cfg.name} gives {dim}")
    if manifest is not None:
        logger.info("Resuming target cache %s.", folder)
    elif rank == 0:
        _start(folder, expected | {"dim": dim, "chunk_size": chunk_size, "normalized": True,
                                   "checksum": CHECKSUM, "rows_written": 0, "complete": False})
    barrier()
    _fill_chunks(model, cfg, texts, folder, _read_manifest(folder), rank, world_size)
    barrier()
    if rank == 0:
        _finish(folder, texts)
    barrier()
    return folder


def cached_targets(
    teacher_cfgs: Sequence[TeacherConfig],
    texts: Sequence[str],
    root: str | Path,
    **kwargs: Any,
) -> list[np.ndarray]:
    """One verified (N, D_k) float16 memmap per teacher, building caches that are missing."""
    arrays = []
    for cfg in teacher_cfgs:
        folder = build_teacher_cache(cfg, texts, root, **kwargs)  # checks every chunk
        arrays.append(np.load(folder / VECTORS, mmap_mode="r"))
    return arrays
