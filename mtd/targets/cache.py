"""On-disk teacher target cache: each teacher encodes the corpus once, into a float16 memmap.

Layout of one cache folder (CACHE_ROOT/<teacher>-<key>/):
    vectors.npy    (N, D) float16, L2-normalized teacher vectors; created full of NaN, so a row
                   that was never written can not pass for data
    chunks/NNNNNN  empty marker per finished chunk, written after its rows are flushed
    manifest.json  teacher identity (weights hash, pooling, prompt, max length, dtype), corpus
                   fingerprint, dim, chunk size, rows written, complete flag

The key hashes the teacher identity and the corpus fingerprint, so a changed teacher or corpus gets
a new folder (the old one is left alone) and an interrupted fill resumes chunk by chunk. With
several processes, chunk c is encoded by rank c % world_size; markers make that safe without locks.
Vectors are stored normalized because the multi-teacher target only uses directions, and unit rows
can not overflow float16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtd.config import TeacherConfig
from mtd.errors import MtdError
from mtd.io import atomic_write_json, hash_texts, read_json
from mtd.targets import teachers

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: chunks follow the corpus's length order
VECTORS = "vectors.npy"
MANIFEST = "manifest.json"


class CacheError(MtdError, RuntimeError):
    """A cache folder that is incomplete, corrupt, or does not match what the run needs."""


def cache_folder(root: Path, identity: dict[str, Any], corpus_sha256: str, rows: int) -> Path:
    key_src = json.dumps([CACHE_VERSION, identity, corpus_sha256, rows], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity["name"])
    return Path(root) / f"{safe}-{key}"


def _fail(folder: Path, problem: str) -> CacheError:
    return CacheError(
        f"Target cache {folder}: {problem}. Delete that folder to have it rebuilt "
        "(other caches and runs are not affected)."
    )


def open_cache(folder: str | Path, *, check_rows: int | None = None) -> np.ndarray:
    """The (N, D) float16 memmap of a finished cache, after checking it end to end."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise _fail(folder, f"manifest unreadable ({e})") from None
    if not (isinstance(manifest, dict) and all(isinstance(manifest.get(k), int) for k in ("rows", "dim"))):
        raise _fail(folder, "manifest unreadable (not an object with integer 'rows' and 'dim')")
    if not manifest.get("complete"):
        raise _fail(folder, f"incomplete ({manifest.get('rows_written', 0)} of "
                    f"{manifest.get('rows')} rows); rerun to resume filling it instead")
    try:
        arr = np.load(folder / VECTORS, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise _fail(folder, f"{VECTORS} unreadable ({e})") from None
    expected = (manifest["rows"], manifest["dim"])
    if arr.shape != expected or arr.dtype != np.float16:
        raise _fail(folder, f"{VECTORS} is {arr.shape} {arr.dtype}, manifest says {expected} float16")
    if check_rows is not None and arr.shape[0] != check_rows:
        raise _fail(folder, f"has {arr.shape[0]} rows, the corpus has {check_rows}")
    _check_rows(folder, arr)
    return arr


def _check_rows(folder: Path, arr: np.ndarray, block: int = 65536) -> None:
    """Every row finite and unit length: catches unwritten (NaN) rows and bit rot."""
    for start in range(0, arr.shape[0], block):
        part = np.asarray(arr[start : start + block], dtype=np.float32)
        bad = ~np.isfinite(part).all(axis=1)
        bad |= np.abs(np.linalg.norm(part, axis=1) - 1.0) > 1e-2
        if bad.any():
            first = start + int(np.flatnonzero(bad)[0])
            raise _fail(folder, f"{int(bad.sum())} rows are not finite unit vectors (first: {first})")


def _start_or_resume(folder: Path, manifest: dict[str, Any]) -> None:
    """Rank 0: create the NaN-filled array and manifest, unless a matching fill is in progress."""
    if (folder / MANIFEST).is_file():
        try:
            old = read_json(folder / MANIFEST)
            arr = np.load(folder / VECTORS, mmap_mode="r")
            if arr.shape == (old["rows"], old["dim"]) and old["dim"] == manifest["dim"]:
                done = len(list((folder / "chunks").iterdir()))
                logger.info("Resuming target cache %s (%d chunks done).", folder, done)
                return
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass
        logger.warning("Unfinished target cache %s is unreadable; starting it again.", folder)
        shutil.rmtree(folder)
    (folder / "chunks").mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(
        folder / VECTORS, mode="w+", dtype=np.float16, shape=(manifest["rows"], manifest["dim"])
    )
    arr[:] = np.nan
    arr.flush()
    del arr
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


def _fill_chunks(
    model, cfg: TeacherConfig, texts: Sequence[str], folder: Path, chunk: int, rank: int, world: int
) -> None:
    arr = np.load(folder / VECTORS, mmap_mode="r+")
    order = length_order(texts)
    chunks = [order[c : c + chunk] for c in range(0, len(texts), chunk)]
    todo = [c for c in range(rank, len(chunks), world) if not (folder / "chunks" / f"{c:06d}").exists()]
    bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc=f"teacher {cfg.name}", unit="text",
               disable=rank != 0)
    for c in todo:
        rows = chunks[c]
        vecs = _encode_checked(model, cfg, [texts[i] for i in rows], rows, arr.shape[1])
        ascending = np.argsort(rows)  # a memmap takes sorted row writes fastest
        arr[rows[ascending]] = vecs[ascending]
        arr.flush()  # rows reach the file before the marker says they did
        (folder / "chunks" / f"{c:06d}").touch()
        bar.update(len(rows))
    bar.close()


def _complete(manifest_path: Path) -> bool:
    """Whether a finished fill's manifest is there; unreadable counts as unfinished (started again)."""
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("complete") is True


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
    """Fill (or reuse, or resume) this teacher's cache for `texts`; returns the folder.

    Every process must call this (collectively, same arguments but rank). `barrier` synchronizes
    them; its default suits a single process.
    """
    if not texts:
        raise CacheError("Cannot build a target cache for an empty corpus.")
    model_folder = teachers.teacher_folder(cfg)
    identity = teachers.teacher_identity(cfg, model_folder)
    corpus_sha = hash_texts(texts)
    folder = cache_folder(Path(root), identity, corpus_sha, len(texts))
    manifest_path = folder / MANIFEST
    if _complete(manifest_path):
        logger.info("Teacher %s: reusing target cache %s", cfg.name, folder)
        return folder
    logger.info("Teacher %s: encoding %d texts into %s", cfg.name, len(texts), folder)
    model = teachers.load_teacher(cfg, model_folder, device=device)
    if rank == 0:
        manifest = {
            "version": CACHE_VERSION,
            "teacher": identity,
            "dim": teachers.embedding_dim(model),
            "rows": len(texts),
            "corpus_sha256": corpus_sha,
            "chunk_size": chunk_size,
            "normalized": True,
            "rows_written": 0,
            "complete": False,
        }
        _start_or_resume(folder, manifest)
    barrier()
    chunk = read_json(manifest_path)["chunk_size"]  # a resumed fill keeps its chunking
    _fill_chunks(model, cfg, texts, folder, chunk, rank, world_size)
    barrier()
    if rank == 0:
        manifest = read_json(manifest_path)
        n_done = len(list((folder / "chunks").iterdir()))
        if n_done != math.ceil(len(texts) / chunk):
            raise _fail(folder, f"only {n_done} chunks finished")
        _check_rows(folder, np.load(folder / VECTORS, mmap_mode="r"))
        manifest.update(rows_written=len(texts), complete=True)
        atomic_write_json(manifest_path, manifest)
    barrier()
    return folder


def cached_targets(
    teacher_cfgs: Sequence[TeacherConfig],
    texts: Sequence[str],
    root: str | Path,
    **kwargs: Any,
) -> list[np.ndarray]:
    """One validated (N, D_k) float16 memmap per teacher, building caches that are missing."""
    arrays = []
    for cfg in teacher_cfgs:
        folder = build_teacher_cache(cfg, texts, root, **kwargs)
        arrays.append(open_cache(folder, check_rows=len(texts)))
    return arrays
