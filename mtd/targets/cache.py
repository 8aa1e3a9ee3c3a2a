"""On-disk teacher target cache: each teacher encodes the corpus once, into a float16 file.

Layout of one cache folder (CACHE_ROOT/<teacher>-<key>/):
    vectors.npy    (N, D) float16, L2-normalized teacher vectors in corpus order; created full of
                   NaN, so a row that was never written can not pass for data
    chunks/NNNNNN  marker per encoded chunk, written after its rows reached the disk; it holds the
                   blake2b checksum of the chunk's rows (in row order), so a marker is only trusted
                   while the rows still match it
    pending/NNNNNN.npy  a chunk's rows as encoded, until they are placed in vectors.npy
    texts.npy      (N,) little-endian uint64 per row: the blake2b digest (8 bytes) of its text's
                   UTF-8, in corpus order; written when the fill starts, its checksum in the manifest.
                   It lets later fills of the same teacher copy rows from this cache (step 2).
                   Folders from before it have none: they are never copied from (nothing migrates
                   them), and one whose fill resumes gets it then
    manifest.json  teacher identity (weights hash, pooling, prompt, max length, dtype), corpus
                   fingerprint, dim, chunk size, checksum of texts.npy, rows written, complete flag;
                   once complete, the checksum of every chunk
CACHE_ROOT/teacher-hashes.json remembers each teacher folder's weights hash while its files keep
their sizes and mtimes (mtd.io.hash_folder), so a start does not read the weights again.

The key hashes the teacher identity and the corpus fingerprint, so a changed teacher or corpus gets
a new folder (the old one is left alone) and an interrupted fill resumes chunk by chunk. A changed
corpus (more texts, another seed or split) still shares most texts with earlier ones, so a fill
copies the rows it finds in the other caches of this very teacher instead of encoding them (step 2).
Vectors are stored normalized because the multi-teacher target only uses directions, and unit rows
can not overflow float16.

A fill by P processes (1 alone; `python -m mtd.cache`, or a run, under accelerate launch):
1. The main process decides, the others wait for its answer (an error reaches them all): it checks
   the manifest and says which chunks to encode. A complete cache ends here: its manifest and the
   size of vectors.npy are checked, no row is read, no teacher loads (`verify=True` checks every
   chunk against its checksum as well). Resuming an unfinished fill checks every marked chunk.
   With chunks to encode, it also lists the donors: the complete caches beside this one (same
   CACHE_ROOT) whose teacher identity equals this one's exactly and whose texts.npy matches its
   checksum and row count. Their dim is the teacher's, so with donors the teacher loads only on a
   process that finds a row in none of them.
2. Every process fills its share of those chunks into pending files: a row whose text hash one of
   the donors has (the first, in name order) is copied from that donor's vectors.npy, unless the
   row there is not a finite unit vector (damage: encoded instead, with a warning); the rest go
   through the teacher. Each process logs how many rows came from which donor and how many were
   encoded. Chunks follow the corpus's global length order, so batches are as well packed as in
   one encode() call. A chunk's pending file and marker are the same however its rows were found,
   so resuming, checksums and the steps below do not change. (Two different texts share a 64-bit
   hash with a chance of about N_new * N_donor / 2**64.)
3. Every process copies the pending rows that fall in its own part of vectors.npy there: P
   contiguous byte ranges cut at page boundaries, so no two processes (nodes sharing a file
   system) ever write the same page.
4. The main process checks the placed rows against their markers, removes the pending files,
   and records every chunk's checksum in the manifest, which marks the cache complete.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtd.config import TeacherConfig
from mtd.errors import MtdError, explain_os_error
from mtd.io import atomic_save_npy, atomic_write_json, atomic_write_text, hash_texts, read_json
from mtd.targets import teachers

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: chunks follow the corpus's length order
VECTORS = "vectors.npy"
TEXTS = "texts.npy"
TEXT_HASH = np.dtype("<u8")  # texts.npy: blake2b digest_size=8 of each text's UTF-8
MANIFEST = "manifest.json"
CHUNKS = "chunks"
PENDING = "pending"
HASH_MEMO = "teacher-hashes.json"
CHECKSUM = "blake2b-128"  # manifests without it predate checksums: their markers are empty
NOT_WRITTEN = "not written"
PAGE = 4096  # no two processes write into the same page of this size of vectors.npy


class CacheError(MtdError, RuntimeError):
    """A cache folder that is incomplete, corrupt, or does not match what the run needs."""


def _alone(do: Callable[[], Any]) -> Any:
    return do()


@dataclass(frozen=True)
class Processes:
    """The processes that fill caches together: this one's rank, how many there are, and their two
    collectives (mtd.training.distributed has them for torch.distributed; the defaults suit one
    process). main_decides(fn): fn runs on rank 0 only, and every process returns its result or
    raises its error. all_succeed(fn): fn runs on every process, and an error on any is raised on
    all, so no process waits forever for one that stopped."""

    rank: int = 0
    count: int = 1
    main_decides: Callable[[Callable[[], Any]], Any] = _alone
    all_succeed: Callable[[Callable[[], Any]], Any] = _alone


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
    """vectors.npy, read-only, after checking it has the manifest's shape and dtype (and so its
    full size: a shorter file does not map)."""
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


def _pending(folder: Path, c: int) -> Path:
    return folder / PENDING / f"{c:06d}.npy"


def _checksums(manifest: dict[str, Any], n_chunks: int) -> list[str] | None:
    """The checksum of every chunk, as a complete cache's manifest records them, else None (a fill
    in progress, or a cache completed before they were recorded: the markers hold them)."""
    sums = manifest.get("checksums")
    if (manifest.get("complete") is True and isinstance(sums, list) and len(sums) == n_chunks
            and all(isinstance(s, str) for s in sums)):
        return sums
    return None


def _bad_rows(data: np.ndarray) -> np.ndarray:
    """True for each row that is not a finite unit vector (an unwritten NaN row, bit rot)."""
    part = data.astype(np.float32)
    return ~np.isfinite(part).all(axis=1) | (np.abs(np.linalg.norm(part, axis=1) - 1.0) > 1e-2)


def _row_damage(data: np.ndarray, rows: np.ndarray) -> str | None:
    """Rows that are not finite unit vectors (unwritten NaN rows, bit rot), described, or None."""
    bad = _bad_rows(data)
    if not bad.any():
        return None
    return f"{int(bad.sum())} rows are not finite unit vectors (first: row {rows[np.flatnonzero(bad)[0]]})"


def _chunk_data(folder: Path, arr: np.ndarray, c: int, rows: np.ndarray, pending: bool) -> np.ndarray:
    """Chunk c's rows: from its pending file while it has one (and `pending`), else from vectors.npy."""
    path = _pending(folder, c)
    if not (pending and path.exists()):
        return arr[rows]
    data = np.load(path, mmap_mode="r")
    if data.shape != (len(rows), arr.shape[1]) or data.dtype != np.float16:
        expected = (len(rows), arr.shape[1])
        raise ValueError(f"{path.name} is {data.shape} {data.dtype}, expected {expected} float16")
    return data


def _chunk_problem(folder: Path, arr: np.ndarray, c: int, rows: np.ndarray, checksummed: bool,
                   recorded: str | None, pending: bool) -> str | None:
    """Why chunk c's rows can not be trusted, or None when its checksum (`recorded`, else its
    marker's) vouches for them."""
    where = "the manifest" if recorded is not None else "its marker"
    if recorded is None:
        try:
            recorded = _marker(folder, c).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return NOT_WRITTEN
        except (OSError, ValueError) as e:
            return f"marker unreadable ({e})"
    try:
        data = _chunk_data(folder, arr, c, rows, pending)
    except (OSError, ValueError, EOFError) as e:
        return f"pending rows unreadable ({e})"
    if recorded == _digest(data):
        return None
    if not recorded and not checksummed:  # a marker from before checksums: the rows must do
        return _row_damage(data, rows)
    problem = f"rows do not match the checksum in {where}" if recorded else f"{where} has no checksum"
    damage = _row_damage(data, rows)
    return f"{problem}{f'; {damage}' if damage else ''}"


def _problems(folder: Path, arr: np.ndarray, manifest: dict[str, Any], chunks: list[np.ndarray],
              which: Sequence[int] | None = None, pending: bool = True) -> dict[int, str]:
    """{chunk: problem} over `which` chunks (default all): missing markers and failed checks.
    pending: a chunk with a pending file is checked there (False: in vectors.npy)."""
    checksummed = manifest.get("checksum") == CHECKSUM
    sums = _checksums(manifest, len(chunks))
    found = {}
    for c in range(len(chunks)) if which is None else which:
        problem = _chunk_problem(folder, arr, c, chunks[c], checksummed, sums and sums[c], pending)
        if problem is not None:
            found[c] = problem
    return found


def _describe(problems: dict[int, str], n_chunks: int) -> str:
    listed = "; ".join(f"chunk {c}: {p}" for c, p in list(problems.items())[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return f"{len(problems)} of {n_chunks} chunks fail verification ({listed}{more})"


def open_cache(folder: str | Path, texts: Sequence[str]) -> np.ndarray:
    """The (N, D) float16 memmap of a finished cache of `texts`, after checking it end to end:
    manifest, corpus fingerprint, shape, and every chunk against its checksum."""
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
        raise _fail(folder, _describe(problems, len(chunks)), "Run `python -m mtd.cache CONFIG "
                    "--verify` (or build_teacher_cache with verify=True): it re-encodes just those "
                    "chunks and keeps the others.")
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
        for path in (root, folder, folder / CHUNKS, folder / PENDING):
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
    """A full disk must stop the fill now, with the numbers, not hours later. The rows take their
    room twice until the end: in vectors.npy and in the pending files (beside them: texts.npy, the
    npy header, manifest and markers)."""
    needed = 2 * rows * dim * np.dtype(np.float16).itemsize + rows * TEXT_HASH.itemsize + 4096
    old = folder / VECTORS  # a placeholder left by a killed start is overwritten
    free = shutil.disk_usage(folder.parent).free + (old.stat().st_size if old.exists() else 0)
    if needed > free:
        raise CacheError(
            f"Target cache {folder}: {rows} x {dim} float16 vectors need {_size(needed)} while they "
            f"are written (twice their size, until the end), but only {_size(free)} are free on "
            "that disk. Free space there, or set cache_dir to a folder on a disk with room "
            "(e.g. cache_dir=/other/disk/cache)."
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


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Longest first (stable): chunk c holds rows order[c*chunk:(c+1)*chunk].

    Sorting the whole corpus, not each chunk, keeps padding as low as one big encode() call
    (which sorts by length itself); the order is a pure function of the texts, so resumes agree.
    """
    return np.argsort([-len(t) for t in texts], kind="stable")


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """One TEXT_HASH per text (blake2b, 8 bytes, of its UTF-8), in order: what texts.npy holds,
    and how a fill finds a text's row in another cache."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts)
    return np.frombuffer(digests, dtype=TEXT_HASH).copy()


def placement_ranges(offset: int, rows: int, row_bytes: int, count: int) -> list[tuple[int, int]]:
    """The byte range [start, end) of the rows of a file (they start at `offset`) that each of
    `count` processes writes: contiguous, covering the rows, and cut at multiples of PAGE, so no
    two processes write into the same page. A range may be empty (start >= end)."""
    start, end = offset, offset + rows * row_bytes
    first, last = start // PAGE, -(-end // PAGE)
    cuts = [first + (last - first) * r // count for r in range(count + 1)]
    return [(max(start, a * PAGE), min(end, b * PAGE)) for a, b in zip(cuts, cuts[1:], strict=False)]


@dataclass
class _Plan:
    """What the main process found: the fill to do, or nothing (done)."""

    folder: Path
    done: bool = False
    expected: dict[str, Any] = field(default_factory=dict)  # the manifest fields that name the cache
    manifest: dict[str, Any] | None = None  # None: no fill started (it starts once the dim is known)
    encode: list[int] = field(default_factory=list)  # chunks to encode
    place: list[int] = field(default_factory=list)  # encoded chunks whose rows wait in pending files
    donors: list[Path] = field(default_factory=list)  # caches of this teacher to copy rows from
    dim: int | None = None  # the donors' dim (None: no donors)


def _donor_dim(folder: Path, identity: dict[str, Any]) -> int | None:
    """The dim of `folder` if it is a cache to copy rows from (complete, of this very teacher, with
    a texts.npy that matches its manifest), else None."""
    try:
        manifest = _read_manifest(folder)
    except CacheError:
        return None
    if manifest.get("complete") is not True or manifest.get("teacher") != identity:
        return None
    try:
        hashes = np.load(folder / TEXTS, mmap_mode="r")
        _load_vectors(folder, manifest)
        matches = (hashes.dtype == TEXT_HASH and hashes.shape == (manifest["rows"],)
                   and _digest(hashes) == manifest.get("texts_checksum"))
    except FileNotFoundError:  # filled before texts.npy
        return None
    except (OSError, ValueError, EOFError, CacheError) as e:
        logger.warning("Target cache %s: no rows are copied from it (%s).", folder, e)
        return None
    if not matches:
        logger.warning("Target cache %s: no rows are copied from it (%s does not match its manifest).",
                       folder, TEXTS)
        return None
    return manifest["dim"]


def _find_donors(plan: _Plan, root: Path) -> None:
    """Main process, with chunks to encode: plan.donors (in name order) and their dim."""
    identity = plan.expected["teacher"]
    prefix = plan.folder.name.rsplit("-", 1)[0]  # the teacher's name: its caches sit side by side
    dims = {other: dim for other in sorted(root.glob(f"{prefix}-*"))
            if other != plan.folder and other.is_dir() and (dim := _donor_dim(other, identity)) is not None}
    agreed = set(dims.values()) | ({plan.manifest["dim"]} if plan.manifest else set())
    if dims and len(agreed) > 1:
        logger.warning("Target caches of teacher %s disagree on its dim (%s: %s%s); no rows are copied "
                       "from them.", identity["name"], ", ".join(map(str, dims)), sorted(dims.values()),
                       f", {plan.folder}: {plan.manifest['dim']}" if plan.manifest else "")
        return
    if dims:
        plan.donors, plan.dim = list(dims), agreed.pop()


def _plan(cfg: TeacherConfig, texts: Sequence[str], root: Path, chunk_size: int, verify: bool) -> _Plan:
    """Main process: which chunks to encode and place, and the caches to copy rows from."""
    plan = _decide(cfg, texts, root, chunk_size, verify)
    if plan.encode:
        _find_donors(plan, root)
    return plan


def _decide(cfg: TeacherConfig, texts: Sequence[str], root: Path, chunk_size: int, verify: bool) -> _Plan:
    """Main process: which chunks to encode and place. Reads rows only when asked to verify, or
    on the resume of an unfinished fill; then every chunk is checked."""
    identity = teachers.teacher_identity(cfg, teachers.teacher_folder(cfg), hash_memo=root / HASH_MEMO)
    identity = json.loads(json.dumps(identity))  # as stored
    corpus_sha = hash_texts(texts)
    folder = cache_folder(root, identity, corpus_sha, len(texts))
    expected = {"version": CACHE_VERSION, "teacher": identity, "corpus_sha256": corpus_sha,
                "rows": len(texts)}
    manifest = _existing_manifest(folder, expected)
    plan = _Plan(folder, expected=expected, manifest=manifest)
    if manifest is None:
        _check_writable(root, folder)
        plan.encode = list(range(-(-len(texts) // chunk_size)))
        return plan
    arr = _load_vectors(folder, manifest)
    n_chunks = -(-len(texts) // manifest["chunk_size"])  # a fill keeps its chunking
    if manifest.get("complete") is True and _checksums(manifest, n_chunks) is not None and not verify:
        return _Plan(folder, done=True)  # sizes and manifest only: the fast start
    chunks = _chunk_rows(length_order(texts), manifest["chunk_size"])
    if manifest.get("complete") is True:
        problems = _problems(folder, arr, manifest, chunks)
        if not problems:
            if _checksums(manifest, len(chunks)) is None:  # completed before checksums were recorded
                try:
                    atomic_write_json(folder / MANIFEST, _completed(folder, manifest, arr, chunks))
                except OSError as e:  # e.g. a read-only cache_dir: they are checked again next time
                    logger.info("Target cache %s: could not record its checksums (%s).", folder, e)
            return _Plan(folder, done=True)
        logger.warning("Target cache %s is finished but %s; encoding just those again (the other "
                       "chunks are kept).", folder, _describe(problems, len(chunks)))
        _check_writable(root, folder)
        plan.manifest = {k: v for k, v in manifest.items() if k != "checksums"} | {"complete": False}
        atomic_write_json(folder / MANIFEST, plan.manifest)  # a repair cut short resumes as a fill
        plan.encode = sorted(problems)
        return plan
    _check_writable(root, folder)
    logger.info("Resuming target cache %s: checking every finished chunk.", folder)
    problems = _problems(folder, arr, manifest, chunks)
    for c, problem in problems.items():
        if problem != NOT_WRITTEN:
            logger.warning("Target cache %s: chunk %d fails verification (%s); encoding it again "
                           "(the other chunks are kept).", folder, c, problem)
    plan.encode = sorted(problems)
    plan.place = [c for c in range(len(chunks)) if c not in problems and _pending(folder, c).exists()]
    if not plan.encode and not plan.place:  # stopped after placing every chunk
        _finish(folder, manifest, chunks, [])
        return _Plan(folder, done=True)
    return plan


def _save_text_hashes(folder: Path, texts: Sequence[str]) -> dict[str, str]:
    """texts.npy written; the manifest field that vouches for it."""
    hashes = text_hashes(texts)
    with _explained(folder, f"writing {TEXTS}", folder / TEXTS):
        atomic_save_npy(folder / TEXTS, hashes)
    return {"texts_checksum": _digest(hashes)}


def _start(plan: _Plan, texts: Sequence[str], dim: int, chunk_size: int) -> dict[str, Any]:
    """Main process, the dim known (from the teacher, or its donors): the fill's manifest; a new
    fill gets its NaN-filled vectors.npy and its texts.npy first, then the manifest that makes it
    a fill."""
    folder, manifest = plan.folder, plan.manifest
    if manifest is not None:
        if manifest["dim"] != dim:
            raise _fail(folder, f"{MANIFEST} says dim {manifest['dim']}, teacher "
                        f"{plan.expected['teacher']['name']} gives {dim}")
        if "texts_checksum" not in manifest:  # started before texts.npy: later fills may copy from it
            manifest = manifest | _save_text_hashes(folder, texts)
            atomic_write_json(folder / MANIFEST, manifest)
        return manifest
    manifest = plan.expected | {"dim": dim, "chunk_size": chunk_size, "normalized": True,
                                "checksum": CHECKSUM, "rows_written": 0, "complete": False}
    _check_free_space(folder, manifest["rows"], dim)
    (folder / CHUNKS).mkdir(parents=True, exist_ok=True)
    with _explained(folder, f"allocating {VECTORS}", folder / VECTORS):
        _allocate(folder / VECTORS, manifest["rows"], dim)
    manifest |= _save_text_hashes(folder, texts)
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


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


def _find_rows(donors: list[Path], hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(donor, donor row) for each text hash: the first donor whose texts.npy has it (donor -1:
    none has). One donor's hashes in memory at a time."""
    which, at = np.full(len(hashes), -1), np.zeros(len(hashes), dtype=np.int64)
    for d, folder in enumerate(donors):
        todo = np.flatnonzero(which < 0)
        if not len(todo):
            break
        theirs = np.load(folder / TEXTS)
        by_hash = np.argsort(theirs, kind="stable")
        pos = np.minimum(np.searchsorted(theirs[by_hash], hashes[todo]), len(theirs) - 1)
        hit = theirs[by_hash[pos]] == hashes[todo]
        which[todo[hit]], at[todo[hit]] = d, by_hash[pos[hit]]
    return which, at


def _fill_share(model, load: Callable[[], Any], cfg: TeacherConfig, texts: Sequence[str], folder: Path,
                manifest: dict[str, Any], order: np.ndarray, mine: list[int], donors: list[Path],
                who: str, show: bool) -> None:
    """This process's chunks, each filled into its pending file, then marked with its checksum: a
    row a donor has is copied from it, the rest are encoded (`model`, or load() on first need)."""
    chunk, dim = manifest["chunk_size"], manifest["dim"]
    parts = [order[c * chunk : (c + 1) * chunk] for c in mine]  # similar lengths batch together
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    hashes = text_hashes([texts[i] for i in rows]) if donors else np.zeros(len(rows), TEXT_HASH)
    which, at = _find_rows(donors, hashes)  # no donors: every row is encoded
    vectors = [np.load(d / VECTORS, mmap_mode="r") for d in donors]
    copied, damaged, encoded = np.zeros(len(donors), dtype=np.int64), {}, 0
    bar = tqdm(total=int((which < 0).sum()), desc=f"teacher {cfg.name}", unit="text", disable=not show)
    start = 0
    for c, in_length_order in zip(mine, parts, strict=True):
        src, src_row = which[start : start + len(in_length_order)], at[start : start + len(in_length_order)]
        start += len(in_length_order)
        data = np.empty((len(in_length_order), dim), dtype=np.float16)
        missing = src < 0
        for d in np.unique(src[~missing]):
            take = np.flatnonzero(src == d)
            take = take[np.argsort(src_row[take])]  # read the donor's rows in file order
            got = vectors[d][src_row[take]]
            bad = _bad_rows(got)  # damage in the donor: encoded instead
            data[take[~bad]] = got[~bad]
            missing[take[bad]] = True
            copied[d] += int((~bad).sum())
            if bad.any():
                count, first = damaged.get(d, (0, in_length_order[take[bad][0]]))
                damaged[d] = (count + int(bad.sum()), first)
                bar.total += int(bad.sum())
                bar.refresh()
        if missing.any():
            if model is None:
                model = load()
            index = in_length_order[missing]
            data[missing] = _encode_checked(model, cfg, [texts[i] for i in index], index, dim)
            encoded += len(index)
            bar.update(len(index))
        data = data[np.argsort(in_length_order)]  # rows ascending, as in vectors.npy
        with _explained(folder, f"writing chunk {c}", _pending(folder, c)):
            atomic_save_npy(_pending(folder, c), data)
            atomic_write_text(_marker(folder, c), _digest(data) + "\n")  # after the rows are on disk
    bar.close()
    for d, (count, first) in damaged.items():
        logger.warning("Target cache %s: %d of the rows found there are not finite unit vectors "
                       "(first: %r); their texts were encoded instead. `python -m mtd.cache CONFIG "
                       "--verify` with the config that filled it repairs it.", donors[d], count,
                       texts[first][:80])
    if donors:
        sources = "; ".join(f"{n} from {d}" for n, d in zip(copied, donors, strict=True) if n) or "none"
        logger.info("Teacher %s%s: %d rows copied from other caches of this teacher (%s), %d encoded.",
                    cfg.name, who, int(copied.sum()), sources, encoded)


def _place_share(folder: Path, chunks: list[np.ndarray], placing: list[int], rank: int, count: int) -> None:
    """The rows of the `placing` chunks, from their pending files into vectors.npy: of each row,
    just the bytes inside this process's part (placement_ranges). Plain writes, not the memmap: a
    full disk raises ENOSPC here instead of SIGBUS later; on disk when this returns."""
    path = folder / VECTORS
    arr = np.load(path, mmap_mode="r")
    row_bytes = arr.shape[1] * arr.itemsize
    lo, hi = placement_ranges(arr.offset, len(arr), row_bytes, count)[rank]
    if lo >= hi or not placing:
        return
    first, last = (lo - arr.offset) // row_bytes, -(-(hi - arr.offset) // row_bytes)
    with _explained(folder, f"placing rows in {VECTORS}", path):
        fd = os.open(path, os.O_WRONLY)
        try:
            for c in placing:
                rows = chunks[c]
                s, e = np.searchsorted(rows, (first, last))
                if s == e:
                    continue
                try:
                    data = np.array(np.load(_pending(folder, c), mmap_mode="r")[s:e])  # mapping closed
                except FileNotFoundError:  # not encoded: _finish names it
                    continue
                for row, vec in zip(rows[s:e], data, strict=True):
                    start = arr.offset + int(row) * row_bytes
                    a, b = max(lo, start), min(hi, start + row_bytes)
                    view, pos = memoryview(vec).cast("B")[a - start : b - start], 0
                    while pos < len(view):
                        pos += os.pwrite(fd, view[pos:], a + pos)
            os.fsync(fd)
        finally:
            os.close(fd)


def _completed(folder: Path, manifest: dict[str, Any], arr: np.ndarray, chunks: list[np.ndarray]) -> dict:
    """The manifest marked complete, with every chunk's checksum (its marker's, or for a marker
    from before checksums, its rows'), which later starts trust without reading a row."""
    sums = []
    for c, rows in enumerate(chunks):
        recorded = _marker(folder, c).read_text(encoding="ascii").strip()
        sums.append(recorded or _digest(arr[rows]))
    return manifest | {"rows_written": manifest["rows"], "complete": True, "checksum": CHECKSUM,
                       "checksums": sums}


def _finish(folder: Path, manifest: dict[str, Any], chunks: list[np.ndarray], placed: list[int]) -> None:
    """Main process, every process's chunks placed: the placed rows checked in vectors.npy, the
    pending files removed, the cache marked complete."""
    arr = _load_vectors(folder, manifest)
    problems = _problems(folder, arr, manifest, chunks, placed, pending=False)
    unwritten = sum(p == NOT_WRITTEN for p in problems.values())
    if unwritten:
        raise _fail(folder, f"{unwritten} chunks were not encoded",
                    "Run every process (as many as the fill was started with) to fill the rest; "
                    "finished chunks are kept.")
    if problems:
        raise _fail(folder, _describe(problems, len(chunks)),
                    "Run the same command again: it re-encodes just those chunks.")
    for c in placed:
        _pending(folder, c).unlink(missing_ok=True)
    atomic_write_json(folder / MANIFEST, _completed(folder, manifest, arr, chunks))


def build_teacher_cache(
    cfg: TeacherConfig,
    texts: Sequence[str],
    root: str | Path,
    *,
    chunk_size: int = 1024,
    processes: Processes = Processes(),
    device: str | None = None,
    verify: bool = False,
    fill_hint: str = "",
) -> Path:
    """Fill (or reuse, resume or repair) this teacher's cache for `texts`; returns the folder.

    Every process calls this with the same arguments but `processes` (see Processes and the module
    docstring). A complete cache is reused from its manifest alone; verify=True checks every chunk
    against its checksum first, and re-encodes the chunks that fail. fill_hint: said (as a
    warning) when the cache has to be filled.
    """
    if not texts:
        raise CacheError("Cannot build a target cache for an empty corpus.")
    root = Path(root)
    plan = processes.main_decides(lambda: _plan(cfg, texts, root, chunk_size, verify))
    folder = plan.folder
    if plan.done:
        logger.info("Teacher %s: reusing target cache %s", cfg.name, folder)
        return folder
    order = length_order(texts)
    manifest = plan.manifest
    if plan.encode:
        size = manifest["chunk_size"] if manifest else chunk_size
        n = sum(len(order[c * size : (c + 1) * size]) for c in plan.encode)
        found = (f"; rows found in other caches of this teacher ({len(plan.donors)}) are copied, "
                 "the rest encoded" if plan.donors else "")
        logger.log(logging.WARNING if fill_hint else logging.INFO, "Teacher %s: filling %d rows of "
                   "%s%s.%s", cfg.name, n, folder, found, f" {fill_hint}" if fill_hint else "")

        def load():  # each process finds the folder itself: a hub download may sit in its node's cache
            return teachers.load_teacher(cfg, teachers.teacher_folder(cfg), device=device)

        model = None
        if plan.donors:  # they give the dim: the teacher loads where a row is in none of them
            dim = plan.dim
        else:
            model = processes.all_succeed(load)
            dim = teachers.embedding_dim(model)
        manifest = processes.main_decides(lambda: _start(plan, texts, dim, chunk_size))
        mine = plan.encode[processes.rank :: processes.count]
        who = f" (process {processes.rank} of {processes.count})" if processes.count > 1 else ""
        processes.all_succeed(lambda: _fill_share(model, load, cfg, texts, folder, manifest, order, mine,
                                                  plan.donors, who, show=processes.rank == 0))
        del model
    chunks = _chunk_rows(order, manifest["chunk_size"])
    placing = sorted({*plan.encode, *plan.place})
    processes.all_succeed(lambda: _place_share(folder, chunks, placing, processes.rank, processes.count))
    processes.main_decides(lambda: _finish(folder, manifest, chunks, placing))
    return folder


def cached_targets(
    teacher_cfgs: Sequence[TeacherConfig],
    texts: Sequence[str],
    root: str | Path,
    **kwargs: Any,
) -> list[np.ndarray]:
    """One (N, D_k) float16 memmap per teacher, building caches that are missing (see
    build_teacher_cache for the arguments)."""
    arrays = []
    for cfg in teacher_cfgs:
        folder = build_teacher_cache(cfg, texts, root, **kwargs)
        arrays.append(np.load(folder / VECTORS, mmap_mode="r"))
    return arrays
