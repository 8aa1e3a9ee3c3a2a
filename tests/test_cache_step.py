"""The target cache as a step of its own (`python -m mtd.cache`), and the process group it runs in."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradprobe import launch_two_processes
from test_cache import forbid_all_but_the_manifest

import mtd.config
import mtd.io
from mtd.cache import main as cache_main
from mtd.config import ConfigError, TrainConfig, dump_config
from mtd.data.corpus import read_corpus
from mtd.errors import MtdError
from mtd.io import read_json
from mtd.targets import cache, teachers
from mtd.targets.cache import length_order, open_cache
from mtd.training import distributed, pipeline
from mtd.training.trainer import make_accelerator

FAST = ("stages.0.steps=4", "stages.1.steps=4", "stages.2.steps=4",
        "train.log_every=2", "train.eval_every=4", "train.save_every=4")


class Counting:
    """teachers.encode, counting the texts it encodes."""

    def __init__(self):
        self.real, self.texts = teachers.encode, []

    def __call__(self, model, texts, cfg):
        self.texts += texts
        return self.real(model, texts, cfg)


def _yaml(cfg, tmp_path: Path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    return str(path)


def _folders(cfg) -> list[Path]:
    return sorted(p for p in Path(cfg.cache_dir).iterdir() if p.is_dir())


def _corpus(cfg) -> list[str]:
    return pipeline.load_corpus(cfg).texts


def test_the_cache_step_fills_what_a_run_then_reuses_at_once(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(*FAST)
    counting = Counting()
    monkeypatch.setattr(teachers, "encode", counting)
    assert cache_main([_yaml(cfg, tmp_path)]) == 0
    texts = _corpus(cfg)
    assert sorted(counting.texts) == sorted(texts + texts)  # each teacher, each text, once
    folders = _folders(cfg)
    assert [f.name.split("-")[0] for f in folders] == ["teacher_a", "teacher_b"]
    for folder in folders:
        assert read_json(folder / "manifest.json")["complete"] is True
        open_cache(folder, texts)

    # The run: no teacher loads, no row or marker of the caches is read, no weight file hashed.
    hashed = forbid_all_but_the_manifest(monkeypatch)
    run_dir = pipeline.run(cfg)
    assert (run_dir / "student").is_dir()
    teacher_files = [p for p in hashed if "teacher_" in str(p)]
    assert teacher_files == []


def test_verify_finds_a_corrupted_row_that_a_start_does_not_read(tiny_config, tmp_path, monkeypatch, caplog):
    cfg = tiny_config()
    yaml = _yaml(cfg, tmp_path)
    assert cache_main([yaml]) == 0
    folder = _folders(cfg)[0]
    texts = _corpus(cfg)
    row = 1234
    arr = np.load(folder / "vectors.npy", mmap_mode="r+")
    arr[row] *= -1  # still a unit vector: only the checksum can tell
    arr.flush()
    del arr
    counting = Counting()
    monkeypatch.setattr(teachers, "encode", counting)
    assert cache_main([yaml]) == 0
    assert counting.texts == []  # unseen: a start reads no row
    with caplog.at_level(logging.WARNING, logger="mtd.targets.cache"):
        assert cache_main([yaml, "--verify"]) == 0
    chunk = list(length_order(texts)).index(row) // cfg.cache_chunk_size
    assert (f"is finished but 1 of {-(-len(texts) // cfg.cache_chunk_size)} chunks fail verification "
            f"(chunk {chunk}: rows do not match the checksum in the manifest)") in caplog.text
    order = length_order(texts)[chunk * cfg.cache_chunk_size : (chunk + 1) * cfg.cache_chunk_size]
    assert counting.texts == [texts[i] for i in order]  # just that chunk, again
    open_cache(folder, texts)


def test_a_run_that_fills_a_cache_names_the_cache_step(tiny_config, caplog):
    cfg = tiny_config()
    texts = read_corpus(cfg.data.corpus, max_texts=100).texts
    one = SimpleNamespace(process_index=0, num_processes=1, device="cpu")
    with caplog.at_level(logging.WARNING, logger="mtd.targets.cache"):
        pipeline._teacher_arrays(cfg, texts, one)
    assert caplog.text.count("python -m mtd.cache CONFIG") == 2  # once per teacher it fills
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtd.targets.cache"):
        pipeline._teacher_arrays(cfg, texts, one)
    assert "reusing target cache" in caplog.text and "mtd.cache" not in caplog.text


@pytest.mark.parametrize("change", [
    {"teachers": []},
    {"stages": [SimpleNamespace(data="images", heads={"fc1": ["cos"]}, targets={"fc1": "self:fc1"})]},
], ids=["no teachers", "no teacher targets"])
def test_a_config_without_teacher_targets_exits_2(tiny_config, tmp_path, monkeypatch, caplog, change):
    cfg = dataclasses.replace(tiny_config(), **change)  # what validation lets through
    monkeypatch.setattr(mtd.config, "load_config", lambda *a: cfg)
    with caplog.at_level(logging.ERROR):
        assert cache_main(["any.yaml"]) == 2
    assert "Config 'tiny' reads no teacher targets" in caplog.text
    assert not Path(cfg.cache_dir).exists()


@pytest.mark.parametrize("args", [["no/such/config.yaml"], ["configs/tiny.yaml", "train.timeout_minutes=0"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        cache_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not found" in err or "train.timeout_minutes" in err


def test_the_process_group_gets_the_configured_timeout(tmp_path, tiny_config):
    accelerator = make_accelerator(TrainConfig(timeout_minutes=7), tmp_path)
    assert accelerator.init_handler.timeout == timedelta(minutes=7)
    assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(minutes=7)}
    assert TrainConfig().timeout_minutes == 60
    with pytest.raises(ConfigError, match="train.timeout_minutes"):
        tiny_config("train.timeout_minutes=0")


def test_an_error_on_any_process_stops_every_process(monkeypatch):
    """all_succeed as seen from each of 2 processes (the exchange replaced by its effect)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)

    def exchange(said):
        def all_gather_object(out, obj):
            out[:] = [obj if i == 0 else said for i in range(2)]  # rank 0 is this process
        return all_gather_object

    monkeypatch.setattr(distributed.dist, "all_gather_object", exchange(None))
    assert distributed.all_succeed(lambda: "done") == "done"
    monkeypatch.setattr(distributed.dist, "all_gather_object", exchange("disk full on node 2"))
    with pytest.raises(MtdError, match=r"^Process 1 stopped: disk full on node 2$"):
        distributed.all_succeed(lambda: "done")
    sent = []
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, obj: sent.append(obj))

    def fail():
        raise cache.CacheError("teacher gave a NaN")

    with pytest.raises(cache.CacheError, match="teacher gave a NaN"):
        distributed.all_succeed(fail)
    assert sent == ["teacher gave a NaN"]  # the others hear of it before this process stops


@pytest.mark.multiprocess
def test_two_processes_fill_the_caches_as_one_does(tiny_config, tmp_path):
    one = tiny_config()
    (tmp_path / "one").mkdir()
    assert cache_main([_yaml(one, tmp_path / "one")]) == 0
    two = tiny_config(f"cache_dir={json.dumps(str(tmp_path / 'two-cache'))}")
    proc = launch_two_processes("--module", "mtd.cache", _yaml(two, tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    texts = _corpus(one)
    for a, b in zip(_folders(one), _folders(two), strict=True):
        assert a.name == b.name and read_json(b / "manifest.json")["complete"] is True
        assert not list((b / "pending").iterdir())
        np.testing.assert_allclose(np.asarray(open_cache(a, texts), np.float32),
                                   np.asarray(open_cache(b, texts), np.float32), atol=2e-3)
    # One more corpus file: each process copies the rows the first fill has and encodes the rest,
    # and the caches equal a one-process fill in an empty cache_dir.
    extra = tmp_path / "extra.txt"
    extra.write_text("".join(f"kasa zehe {i} gusa {i * 7} mika\n" for i in range(60)), encoding="utf-8")
    files = json.dumps([*one.data.corpus, str(extra)])
    grown, fresh = (tiny_config(f"cache_dir={json.dumps(str(tmp_path / d))}", f"data.corpus={files}")
                    for d in ("two-cache", "fresh-cache"))
    proc = launch_two_processes("--module", "mtd.cache", _yaml(grown, tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (tmp_path / "fresh").mkdir()
    assert cache_main([_yaml(fresh, tmp_path / "fresh")]) == 0
    new = set(_corpus(grown)) - set(texts)
    assert 0 < len(new) < len(texts) / 10
    for name in ("teacher_a", "teacher_b"):
        counts = [re.search(rf"Teacher {name} \(process {r} of 2\): (\d+) rows copied .*, (\d+) encoded\.",
                            proc.stderr) for r in (0, 1)]
        assert all(counts), proc.stderr[-6000:]
        assert sum(int(m[2]) for m in counts) == len(new)
        assert sum(int(m[1]) for m in counts) == len(_corpus(grown)) - len(new)
    for a in _folders(fresh):
        b = Path(grown.cache_dir) / a.name
        np.testing.assert_allclose(np.asarray(open_cache(a, _corpus(grown)), np.float32),
                                   np.asarray(open_cache(b, _corpus(grown)), np.float32), atol=2e-3)
    # A main process that stops (here: a damaged manifest) stops the other one too.
    (Path(two.cache_dir) / _folders(one)[0].name / "manifest.json").write_text("[1, 2]")
    proc = launch_two_processes("--module", "mtd.cache", _yaml(two, tmp_path))
    assert proc.returncode != 0
    assert "manifest.json unreadable" in proc.stderr and "The main process stopped" in proc.stderr
