"""A run's checkpoints: written atomically, verified before a resume trusts one.

checkpoints/S-NAME-stepK/ holds Accelerate's state (model, optimizer, scheduler, every process's
RNG) and S-NAME-end/ the student's weights, for stage index S named NAME. Each is written into a
hidden temporary folder (.S-NAME-stepK.partial) and renamed into place once complete, its
state.json written last: the position, the size and sha256 of every file, and the fingerprint of
the data it was trained on. A full disk or a killed job therefore never leaves a partial
checkpoint under a checkpoint's name.

A resume verifies the newest checkpoint against its state.json. One that fails (a file missing,
truncated or overwritten) is moved to damaged-checkpoints/ with a warning, never deleted, and the
previous one is tried; with none left the run starts over. The main process decides and every
process gets its answer, so all resume from the same checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mtd.errors import MtdError
from mtd.io import atomic_write_json, hash_file, read_json
from mtd.training.distributed import main_decides

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
DAMAGED_DIR = "damaged-checkpoints"  # beside checkpoints/, so nothing lists them as checkpoints
# "0-stage1-step0000005", "2-stage3-end": the stage index, its name, the step or the end.
_NAME = re.compile(r"^(\d+)-.*-(?:step(\d+)|end)$")


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` optimizer steps into stage `stage` (done: stage finished)."""

    stage: int = 0
    step: int = 0
    done: bool = False
    name: str = ""  # the stage's name, for folder names and messages

    def key(self) -> tuple[int, float]:
        return (self.stage, math.inf if self.done else self.step)

    def folder(self) -> str:
        return f"{self.stage}-{self.name}-" + ("end" if self.done else f"step{self.step:07d}")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    pos: Position
    data: dict[str, Any] | None  # fingerprint of the training data (None: not recorded)


def _listed(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first, ordered by their names (state.json may be what is damaged)."""
    found = []
    for d in (run_dir / "checkpoints").glob("*"):
        m = _NAME.match(d.name)
        if m and d.is_dir():
            found.append(((int(m[1]), math.inf if m[2] is None else int(m[2])), d))
    return [d for _, d in sorted(found)]


def _position(state: dict[str, Any]) -> Position:
    return Position(**{f.name: state[f.name] for f in fields(Position)})


def _read(ckpt: Path) -> Checkpoint:
    state = read_json(ckpt / STATE_FILE)
    return Checkpoint(ckpt, _position(state), state.get("data"))


def latest_checkpoint(run_dir: Path) -> tuple[Path, Position] | None:
    """The newest checkpoint and its position, as listed (resolve_resume is what verifies one)."""
    found = _listed(run_dir)
    return (found[-1], _read(found[-1]).pos) if found else None


def has_checkpoints(run_dir: Path) -> bool:
    return bool(_listed(run_dir))


def stage_ends(run_dir: Path) -> list[tuple[int, Path]]:
    """(stage index, folder) of each S-NAME-end checkpoint (the student's weights at the end of
    stage S), in stage order, as listed (not verified)."""
    return [(int(_NAME.match(d.name)[1]), d) for d in _listed(run_dir) if d.name.endswith("-end")]


# ---------------------------------------------------------------------------------------------
# Saving


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": hash_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_checkpoint(accelerator, run_dir: Path, pos: Position, write: Callable[[Path], None],
                    fingerprint: dict[str, Any]) -> Path:
    """write(folder) fills a temporary folder, on every process (Accelerate's save_state needs
    them all); the main process then adds state.json and renames the folder into place.

    On failure (e.g. a full disk) the temporary folder is removed, earlier checkpoints are left as
    they were, and the OSError names the checkpoint (mtd.errors.cli_main turns it into one line).
    """
    ckpt = run_dir / "checkpoints" / pos.folder()
    tmp = ckpt.with_name(f".{ckpt.name}.partial")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a job killed while saving
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write(tmp)
        accelerator.wait_for_everyone()  # every process's files (its RNG state) are in
        if accelerator.is_main_process:
            state = asdict(pos) | {"files": _manifest(tmp), "data": fingerprint}
            atomic_write_json(tmp / STATE_FILE, state)
            os.rename(tmp, ckpt)
    except BaseException as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror, str(ckpt)) from e  # a write error names no file
        raise
    accelerator.wait_for_everyone()
    return ckpt


def drop_old_mid_stage(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` mid-stage checkpoints (at least one); stage-end ones always stay."""
    mids = [d for d in _listed(run_dir) if not d.name.endswith("-end")]
    for old in mids[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Resuming


def _problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when every file is as it was saved."""
    try:
        state = read_json(ckpt / STATE_FILE)
        _position(state)
        files = state.get("files")
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"{STATE_FILE} is unreadable"
    if files is None:
        logger.warning("%s was written by an older mtd that recorded no file list: not verified.", ckpt)
        return None
    for rel, want in sorted(files.items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["bytes"] or hash_file(path) != want["sha256"]:
            return f"{rel} differs from what was saved (truncated or overwritten)"
    return None


def _set_aside(ckpt: Path, run_dir: Path) -> Path:
    target = run_dir / DAMAGED_DIR / ckpt.name
    n = 1
    while target.exists():
        n += 1
        target = run_dir / DAMAGED_DIR / f"{ckpt.name}.{n}"
    target.parent.mkdir(exist_ok=True)
    os.rename(ckpt, target)
    return target


def _newest_usable(run_dir: Path) -> Checkpoint | None:
    damaged: list[tuple[Path, str, Path]] = []
    found = None
    for ckpt in reversed(_listed(run_dir)):
        problem = _problem(ckpt)
        if problem is None:
            found = _read(ckpt)
            break
        damaged.append((ckpt, problem, _set_aside(ckpt, run_dir)))
    used = f"resuming from {found.path} instead" if found else (
        "no usable checkpoint is left, so the run starts over from its first stage")
    for ckpt, problem, moved in damaged:
        logger.warning("Checkpoint %s is damaged (%s): %s. The damaged checkpoint was moved to %s; "
                       "delete it once you no longer need it.", ckpt, problem, used, moved)
    return found


def resolve_resume(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint whose files are all as saved; damaged newer ones are set aside.

    Decided by the main process (it alone moves folders), answered to all: every process resumes
    from the same checkpoint even where their views of the files could differ.
    """
    return main_decides(lambda: _newest_usable(run_dir))


class DataChangedError(MtdError, ValueError):
    """--resume with training data other than the checkpoint was trained on."""


def check_same_data(found: Checkpoint, now: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume on other data than the checkpoint was trained on (same on every process:
    each compares the same recorded fingerprint with the same files)."""
    if found.data is None:
        return
    for kind, current in now.items():
        before = found.data.get(kind)
        if before is not None and before["sha256"] != current["sha256"]:
            raise DataChangedError(
                f"--resume: the {current['what']} changed since {found.path} was saved "
                f"({', '.join(current['files'])}: {before['count']} {current['unit']} then, "
                f"{current['count']} now, other content). Restore the data as it was, or start "
                "a new run on the new data (name=NEW_NAME); nothing was changed."
            )
