"""Small file helpers: atomic writes and content fingerprints.

Every file a run produces goes through `atomic_write_*`, so a killed job leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mtd.errors import MtdError, explain_os_error

# Files that decide what a model computes; READMEs and OS clutter do not.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".txt", ".model", ".py")


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`: a reader
    never sees half a file, and a failed write leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Like atomic_write_text, for binary files (e.g. encoded images)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_save_npy(path: str | Path, array: Any) -> None:
    """np.save through a temp file and rename, so a reader never sees half an array."""
    import numpy as np

    _atomic_write(path, lambda f: np.save(f, array))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class OutputError(MtdError):
    """An output path that cannot be written; the message names it and says what to do."""


def _cannot_write(path: Path, err: OSError) -> str:
    return explain_os_error(err) or f"Cannot write {path} ({err})."


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, before any work, when the file `path` could not be written later: its folder is
    created and a probe file written and removed there (permission bits alone lie for root)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name, e.g. {path / 'results.json'}.")
    blocker = next(p for p in path.parents if p.exists())
    if not blocker.is_dir():
        raise OutputError(f"{what} {path}: {blocker} is a file, not a folder. Choose another path.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {path}: {_cannot_write(path, e)} Choose a writable path; nothing "
                          "was computed yet.") from None


def write_json_or_fallback(path: str | Path, obj: Any, what: str) -> None:
    """atomic_write_json, but results that took long to compute are never lost to a failed write:
    they go to a file in the system temp folder (failing that, into the log), and the
    OutputError says where."""
    path = Path(path)
    try:
        atomic_write_json(path, obj)
        return
    except OSError as e:
        reason = _cannot_write(path, e)
    fallback = Path(tempfile.gettempdir()) / f"{path.stem}-{os.getpid()}-{int(time.time())}.json"
    try:
        atomic_write_json(fallback, obj)
    except OSError:
        logging.getLogger(__name__).error("The %s, which could not be saved:\n%s", what,
                                          json.dumps(obj, indent=2, sort_keys=True))
        raise OutputError(f"{reason} The {what} could not be saved anywhere: they are in the log "
                          "above.") from None
    raise OutputError(f"{reason} The {what} are saved in {fallback} instead: move them from there.")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """One line per call, flushed, so a crash loses at most the row being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def hash_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _hash_into(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def hash_file(path: str | Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    _hash_into(h, Path(path))
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and p.name != "README.md")


def hash_folder(folder: str | Path, memo: str | Path | None = None) -> str:
    """sha256 over the files that define a model (weights, configs, tokenizer), by relative path.

    memo: a JSON file remembering each folder's hash beside the size and mtime_ns of every file
    hashed; while they are all unchanged the hash is taken from it instead of reading gigabytes of
    weights again. Any change (a file added, removed, rewritten) hashes the folder anew. The memo
    is a convenience: one that can not be read or written is ignored.
    """
    folder = Path(folder)
    files = _model_files(folder)
    stats = {str(p.relative_to(folder)): [st.st_size, st.st_mtime_ns] for p in files if (st := p.stat())}
    key = str(folder.resolve())
    known: dict[str, Any] = {}
    if memo is not None:
        try:
            known = read_json(memo)
        except (OSError, ValueError):  # missing, unreadable or damaged: hash for real
            known = {}
        entry = known.get(key) if isinstance(known, dict) else None
        if isinstance(entry, dict) and entry.get("files") == stats and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        _hash_into(h, p)
    digest = h.hexdigest()
    if memo is not None:
        known = known if isinstance(known, dict) else {}
        known[key] = {"files": stats, "sha256": digest}  # the stats from before hashing
        try:
            atomic_write_json(memo, known)
        except OSError as e:  # e.g. a read-only cache folder: the next start hashes again
            logging.getLogger(__name__).debug("Could not write %s (%s)", memo, e)
    return digest


class NotWritableError(MtdError, OSError):
    """An output folder that cannot be created or written; the message names the setting to change."""


def check_writable_dir(path: str | Path, setting: str) -> None:
    """Create `path` if needed and write (and remove) a file in it.

    Called before any work, so a run whose output folder is read-only, or is blocked by a file of
    the same name, stops at once instead of after hours of work. `setting` says how the user
    chooses another folder, e.g. "output_dir=PATH".
    """
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotWritableError(f"Cannot create the folder {path}: {blocking} is a file, not a folder. "
                               f"Choose another folder ({setting}) or move that file away.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NotWritableError(f"Cannot write in {path} ({e.strerror or e}): choose a writable folder "
                               f"({setting}) or fix its permissions.") from None


class DataFormatError(MtdError, ValueError):
    """A data file (or hub data set) that cannot be used: names it and, where known, the line.

    For hub data sets ``unit`` is ``"row"`` (the position in the split, from 1).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, line: int | None = None, *,
                 unit: str = "line"):
        self.path = Path(path)
        self.line = line
        self.problem = problem
        self.unit = unit
        where = f"{self.path}, {unit} {line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {problem}")


def jsonl_objects(
    path: Path,
    lines: Iterable[tuple[int, str]],
    error: type[DataFormatError],
    required: Sequence[str] = (),
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; `error` names the file and line of a bad one."""
    for line_no, raw in lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise error(path, f"invalid JSON: {exc.msg}", line_no) from None
        if not isinstance(record, dict):
            raise error(path, f"expected a JSON object, got {type(record).__name__}", line_no)
        missing = [k for k in required if k not in record]
        if missing:
            raise error(path, f"missing key(s) {', '.join(map(repr, missing))}", line_no)
        yield line_no, record


# What to do about a damaged weights file, whoever wrote it.
WEIGHTS_FIX = ("restore it: re-export the student (python -m mtd.export RUN OUT), re-run "
               "scripts/setup.sh for the models it installs under models/, or download the model again")


class WeightsError(MtdError):
    """A weights file that cannot be read (truncated, corrupt, missing); the message names it."""


def damaged_safetensors(where: str | Path) -> list[str]:
    """'PATH (reason)' for each .safetensors file at or under `where` whose header does not read.

    safe_open checks the header against the file size, so a truncated copy is caught without
    reading the tensors.
    """
    from safetensors import SafetensorError, safe_open

    where = Path(where)
    files = [where] if where.is_file() else sorted(where.rglob("*.safetensors")) if where.is_dir() else []
    bad = []
    for path in files:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            bad.append(f"{path} ({e})")
    return bad


def _weights_message(bad: list[str], fix: str) -> str:
    return (f"Cannot read the weights in {', '.join(bad)}: the file is truncated or corrupt "
            f"(an interrupted save, copy or download?). To fix, {fix}.")


def check_safetensors(where: str | Path, fix: str = WEIGHTS_FIX) -> None:
    """Raise WeightsError naming every damaged .safetensors file at or under `where` (cheap: headers)."""
    bad = damaged_safetensors(where)
    if bad:
        raise WeightsError(_weights_message(bad, fix))


@contextmanager
def reading_weights(where: str | Path, fix: str = WEIGHTS_FIX) -> Iterator[None]:
    """Around a library load of `where` (from_pretrained, SentenceTransformer(folder)...): a
    safetensors error, which names no file, becomes a WeightsError naming the damaged ones."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        bad = damaged_safetensors(where) or [f"a .safetensors file of {where} ({e})"]
        raise WeightsError(_weights_message(bad, fix)) from None


def load_safetensors(path: str | Path, fix: str = WEIGHTS_FIX) -> dict[str, Any]:
    """safetensors.torch.load_file, with a missing or damaged file named in a WeightsError.

    Every direct safetensors load in mtd goes through here (tests/test_layout.py checks).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {path} is missing. To fix, {fix}.")
    with reading_weights(path, fix):
        return load_file(str(path))
