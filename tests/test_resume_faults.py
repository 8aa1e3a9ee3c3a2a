"""Resuming through faults: damaged checkpoints, a torn or damaged log, changed data, a missing
saved config, a full disk while saving, unwritable output folders, and all of it under 2 processes.

Each fault gives one message naming the problem and the fix, and loses nothing already saved:
where the run can go on, it ends with the same weights and log as an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import (
    FAST,
    ROOT,
    _launch,
    assert_same_function,
    assert_same_rows,
    assert_same_weights,
    read_log,
    student_weights,
    train_rows,
)

import train
from mtd.config import ConfigError, dump_config, load_config
from mtd.errors import MtdError
from mtd.io import NotWritableError
from mtd.synthetic import make_tiny_image_assets
from mtd.training import distributed, pipeline
from mtd.training.checkpoints import DAMAGED_DIR, DataChangedError
from mtd.training.trainer import RunLogError

MID = "1-stage2-step0000005"  # the newest checkpoint after a job of 15 steps (stage 2, step 5)


@pytest.fixture(scope="module")
def reference_store() -> dict:
    return {}


@pytest.fixture
def reference(config, reference_store) -> dict:
    """Weights and log rows of the uninterrupted FAST run, computed once per module."""
    if not reference_store:
        run_dir = pipeline.run(config("name=ref", *FAST))
        reference_store.update(weights=student_weights(run_dir), rows=read_log(run_dir))
    return reference_store


def assert_like_reference(run_dir: Path, reference: dict) -> None:
    assert_same_weights(reference["weights"], student_weights(run_dir))
    assert_same_rows(reference["rows"], read_log(run_dir))


def first_job(config, *overrides: str, budget: int = 15):
    """A job stopped after `budget` steps: checkpoints 0-stage1-step0000005, 0-stage1-end, MID."""
    pipeline.run(config(*FAST, *overrides, f"train.max_steps_per_job={budget}"))
    return config(*FAST, *overrides)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGES = {
    "model truncated": ({MID: ("model.safetensors", _truncate)}, "0-stage1-end",
                        "model.safetensors differs from what was saved"),
    "optimizer overwritten": ({MID: ("optimizer.bin", _overwrite)}, "0-stage1-end",
                              "optimizer.bin differs from what was saved"),
    "state.json missing": ({MID: ("state.json", Path.unlink)}, "0-stage1-end", "state.json is missing"),
    "RNG state missing, then stage end's state.json overwritten": (
        {MID: ("random_states_0.pkl", Path.unlink), "0-stage1-end": ("state.json", _overwrite)},
        "0-stage1-step0000005", "random_states_0.pkl is missing"),
    "every checkpoint": (
        {MID: ("model.safetensors", _truncate), "0-stage1-end": ("model.safetensors", _overwrite),
         "0-stage1-step0000005": ("scheduler.bin", _truncate)}, None, "model.safetensors differs"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_past_damaged_checkpoints_and_keeps_them(config, reference, caplog, damage):
    damaged, used, problem = DAMAGES[damage]
    cfg = first_job(config)
    ckpts = cfg.run_dir / "checkpoints"
    for name, (file, spoil) in damaged.items():
        spoil(ckpts / name / file)
    kept = {name: snapshot(ckpts / name) for name in damaged}

    with caplog.at_level(logging.WARNING):
        pipeline.run(cfg, resume=True)

    assert_like_reference(cfg.run_dir, reference)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == len(damaged)
    outcome = f"resuming from {ckpts / used} instead" if used else "the run starts over"
    assert f"Checkpoint {ckpts / MID} is damaged ({problem}" in warnings[0] and outcome in warnings[0]
    for name in damaged:  # set aside, byte for byte as they were, and named in a warning
        aside = cfg.run_dir / DAMAGED_DIR / name
        assert snapshot(aside) == kept[name]
        assert any(str(ckpts / name) in w and str(aside) in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# The log


def test_torn_last_log_line_is_dropped_with_a_warning(config, reference, caplog):
    cfg = first_job(config)
    log = cfg.run_dir / "log.jsonl"
    n = len(log.read_text().splitlines())
    with log.open("a") as f:
        f.write('{"stage": 1, "stage_name": "stage2", "step": 6, "lo')  # a crash mid-append
    with caplog.at_level(logging.WARNING):
        pipeline.run(cfg, resume=True)
    assert f"{log}, line {n + 1}: dropped an incomplete last row" in caplog.text
    assert_like_reference(cfg.run_dir, reference)


def test_damaged_log_line_before_the_last_stops_naming_it(config):
    cfg = first_job(config)
    log = cfg.run_dir / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join([lines[0], "garbage\n", *lines[2:]]))
    before = snapshot(cfg.run_dir)
    with pytest.raises(RunLogError, match=r"log\.jsonl, line 2: invalid JSON.*Repair that line"):
        pipeline.run(cfg, resume=True)
    assert snapshot(cfg.run_dir) == before


# ---------------------------------------------------------------------------------------------
# Changed data, missing config


def test_resume_on_a_changed_corpus_is_refused(config, reference, tmp_path, tiny_assets):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(tiny_assets / "corpus.txt", corpus)
    cfg = first_job(config, f"data.corpus=[{json.dumps(str(corpus))}]")
    original = corpus.read_text()
    corpus.write_text(original.replace("\n", "\nan extra text\n", 1))
    before = snapshot(cfg.run_dir)
    with pytest.raises(DataChangedError, match=(
            rf"the corpus changed since {cfg.run_dir / 'checkpoints' / MID} was saved \({corpus}: "
            r"3000 texts then, 3001 now.*Restore the data.*name=NEW_NAME")):
        pipeline.run(cfg, resume=True)
    assert snapshot(cfg.run_dir) == before
    corpus.write_text(original)  # restored: the run goes on as if nothing happened
    pipeline.run(cfg, resume=True)
    assert_like_reference(cfg.run_dir, reference)


def test_resume_on_changed_image_captions_is_refused(tiny_assets, tmp_path):
    src = make_tiny_image_assets(tiny_assets / "images") / "train.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for r in rows:
        r["image"] = str(src.parent / r["image"])
    captions = tmp_path / "train.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = json.dumps

    def image_config(*extra: str):
        """An image stage alone, on a sentence-transformers text side (no teachers, no corpus)."""
        return load_config(ROOT / "configs" / "tiny-multimodal.yaml", [
            f"output_dir={q(str(tmp_path / 'runs'))}", f"synthetic_assets={q(str(tiny_assets))}",
            "student.init=sentence-transformers", f"student.path={q(str(tiny_assets / 'teacher_a'))}",
            f"images.train=[{q(str(captions))}]", "images.eval=null", "teachers=[]", "data.corpus=[]",
            "train.save_every=2", "stages=[{name: align, data: images, train: vision, heads: {fc1: "
            "[cos]}, targets: {fc1: 'self:fc1'}, lr: 3.0e-3, steps: 4, batch_size: 16}]", *extra])

    pipeline.run(image_config("train.max_steps_per_job=2"))
    rows[0]["captions"][0] = "a different caption"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tmp_path / "runs" / "tiny-multimodal" / "checkpoints" / "0-align-step0000002"
    with pytest.raises(DataChangedError, match=rf"image-caption data changed since {ckpt} was saved "
                                               rf"\({captions}: 240 images then, 240 now"):
        pipeline.run(image_config(), resume=True)


def test_resume_without_the_saved_config_is_refused(config):
    cfg = first_job(config, budget=7)
    saved = cfg.run_dir / "config.yaml"
    text = saved.read_text()
    saved.unlink()
    before = snapshot(cfg.run_dir)
    with pytest.raises(ConfigError, match=rf"{saved}, the config the run was started with, is "
                                          r"missing.*Restore it.*name=NEW_NAME"):
        pipeline.run(config(*FAST, "stages.0.lr=0.5"), resume=True)
    assert snapshot(cfg.run_dir) == before
    saved.write_text(": not [yaml")
    with pytest.raises(ConfigError, match=r"is not a readable YAML mapping.*Restore it"):
        pipeline.run(cfg, resume=True)
    saved.write_text(text)
    pipeline.run(cfg, resume=True)
    assert (cfg.run_dir / "student").is_dir()


# ---------------------------------------------------------------------------------------------
# Full disk, unwritable folders


def test_disk_full_while_saving_keeps_earlier_checkpoints_and_resumes(config, reference, tmp_path,
                                                                      monkeypatch, caplog):
    cfg = config(*FAST)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(dump_config(cfg))
    ckpts = cfg.run_dir / "checkpoints"
    real_save = torch.save
    saved_before: dict[str, bytes] = {}

    def full_disk_save(obj, f, *args, **kwargs):
        if MID in str(f) and str(f).endswith("optimizer.bin"):  # model.safetensors is already in
            saved_before.update((k, v) for k, v in snapshot(ckpts).items() if not k.startswith("."))
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    with caplog.at_level(logging.ERROR):
        assert train.main([str(yaml_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"Cannot write {ckpts / MID} (No space left on device): the disk is full: free "
                      "space and run again (train.py: with --resume); finished work is kept."]
    assert snapshot(ckpts) == saved_before  # earlier checkpoints intact, no partial one anywhere
    assert sorted(p.name for p in ckpts.iterdir()) == ["0-stage1-end", "0-stage1-step0000005"]

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert train.main([str(yaml_path), "--resume"]) == 0
    assert_like_reference(cfg.run_dir, reference)


def _read_only(folder: Path, monkeypatch) -> None:
    """Make creating anything under `folder` fail as on a read-only file system (as root,
    permission bits are not enforced, so the calls that create files and folders are patched)."""
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def call(path, *args, **kwargs):
            creates = real is real_mkdir or args[0] & os.O_CREAT
            if creates and Path(os.fsdecode(path)).is_relative_to(folder):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))


@pytest.mark.parametrize("problem", ["read-only", "a file"])
def test_unwritable_output_dir_stops_before_any_work(tiny_config, tmp_path, monkeypatch, problem):
    out = tmp_path / "out"
    if problem == "a file":
        out.write_text("not a folder")
        expected = rf"Cannot create the folder {out / 'tiny'}: {out} is a file, not a folder"
    else:
        out.mkdir()
        _read_only(out, monkeypatch)
        expected = rf"Cannot write in {out / 'tiny'} \(Read-only file system\)"
    cfg = tiny_config(*FAST, f"output_dir={json.dumps(str(out))}")
    with pytest.raises(NotWritableError, match=expected + r".*\(output_dir=PATH\)"):
        pipeline.run(cfg)
    assert not Path(cfg.cache_dir).exists()  # no teacher ran


# ---------------------------------------------------------------------------------------------
# Two processes


def test_only_the_main_process_decides_and_the_others_follow(monkeypatch):
    """main_decides as seen from each of 2 processes (the collective replaced by its effect)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    calls = []

    def decide():
        calls.append(1)
        return "the main process's own answer"

    def from_main(answer, src):
        answer[:] = ["resume from 0-stage1-end", None]

    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", from_main)
    assert distributed.main_decides(decide) == "resume from 0-stage1-end" and not calls

    refused = RunLogError(Path("log.jsonl"), "invalid JSON", 2)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list",
                        lambda answer, src: answer.__setitem__(1, str(refused)))
    with pytest.raises(MtdError, match=r"The main process stopped: log\.jsonl, line 2: invalid JSON"):
        distributed.main_decides(decide)
    assert not calls

    def refuse():
        raise refused

    sent = []
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lambda answer, src: sent.append(answer))
    with pytest.raises(RunLogError):
        distributed.main_decides(refuse)
    assert sent == [[None, str(refused)]]  # the others hear of it before the main process stops


@pytest.mark.multiprocess
def test_two_processes_take_the_same_fallback_and_stop_together(config, tmp_path):
    """Rank 1's RNG state of the newest checkpoint is damaged: only rank 1 would notice when
    loading it, so the main process must decide for both. A damaged log line stops both ranks
    with the message (neither waits forever for the other)."""
    one = pipeline.run(config("name=one", *FAST))
    cfg = config("name=two", *FAST)
    yaml_path = tmp_path / "two.yaml"
    yaml_path.write_text(dump_config(cfg))
    stopped = tmp_path / "stopped.yaml"
    stopped.write_text(dump_config(config("name=two", *FAST, "train.max_steps_per_job=15")))
    proc = _launch(stopped)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = cfg.run_dir / "log.jsonl"
    good = log.read_text()
    lines = good.splitlines(keepends=True)
    log.write_text("".join([lines[0], "garbage\n", *lines[2:]]))
    proc = _launch(yaml_path, "--resume")
    assert proc.returncode != 0
    assert proc.stderr.count("log.jsonl, line 2: invalid JSON") == 2  # from both processes

    log.write_text(good)
    ckpts = cfg.run_dir / "checkpoints"
    _truncate(ckpts / MID / "random_states_1.pkl")
    proc = _launch(yaml_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count(f"Checkpoint {ckpts / MID} is damaged") == 1  # decided once
    assert f"resuming from {ckpts / '0-stage1-end'} instead" in proc.stderr
    assert (cfg.run_dir / DAMAGED_DIR / MID / "random_states_1.pkl").is_file()
    assert_same_rows(train_rows(read_log(one)), train_rows(read_log(cfg.run_dir)), rel=1e-3)
    assert_same_function(one, cfg.run_dir, atol=1e-4)
