"""Tests for mtd.evaluation.speed (offline; timing bounds are loose on purpose: the CPUs are shared)."""

from __future__ import annotations

import math
import sys
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import mtd.evaluation.speed as speed
from mtd.evaluation.speed import (
    default_speed_texts,
    load_st_encoder,
    measure_speed,
    peak_memory_mb,
    speed_report,
)

PER_CALL_S = 0.002
PER_TEXT_S = 0.0001


class FakeEncoder:
    """Sleeps 2 ms per batch plus 0.1 ms per text; records every call's (n_texts, batch_size)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.calls.append((len(texts), batch_size))
        time.sleep(math.ceil(len(texts) / batch_size) * PER_CALL_S + len(texts) * PER_TEXT_S)
        return np.zeros((len(texts), 4), dtype=np.float32)


def test_measure_speed_fake_encoder() -> None:
    texts = [f"text {i}" for i in range(100)]
    encode = FakeEncoder()
    r = measure_speed(encode, texts, batch_size=25, latency_samples=10, warmup=2, min_time_s=0.05)
    ideal_rate = 100 / (4 * PER_CALL_S + 100 * PER_TEXT_S)  # ~5600/s; sleep only ever overshoots
    assert ideal_rate / 20 < r["sentences_per_s"] <= ideal_rate * 1.05
    ideal_ms = (PER_CALL_S + PER_TEXT_S) * 1000
    assert ideal_ms * 0.95 <= r["latency_ms_p50"] <= r["latency_ms_p90"] < ideal_ms + 100
    assert (r["texts"], r["batch_size"], r["threads"]) == (100, 25, speed.torch.get_num_threads())
    assert 2 <= r["passes"] <= 5  # an 18 ms pass is repeated to reach 50 ms
    assert r["load_avg_1m"] is None or r["load_avg_1m"] >= 0
    # warm-up (a batch and a single text, twice), the timed passes, then 10 single texts
    assert encode.calls == [(25, 25), (1, 1)] * 2 + [(100, 25)] * r["passes"] + [(1, 1)] * 10


def test_measure_speed_one_pass_when_long_enough() -> None:
    encode = FakeEncoder()
    r = measure_speed(encode, ["a", "b", "c"], batch_size=2, latency_samples=5, warmup=0, min_time_s=0)
    assert r["passes"] == 1
    assert encode.calls == [(3, 2)] + [(1, 1)] * 5  # latency texts cycle through the 3 texts


def test_measure_speed_rejects_bad_encoder_and_args() -> None:
    with pytest.raises(ValueError, match=r"encode returned shape \(2, 4\) for 3 texts"):
        measure_speed(lambda texts, bs: np.zeros((2, 4)), ["a", "b", "c"], warmup=0)
    with pytest.raises(ValueError, match="no texts"):
        measure_speed(FakeEncoder(), [])
    with pytest.raises(ValueError, match="batch_size >= 1"):
        measure_speed(FakeEncoder(), ["a"], batch_size=0)


def test_default_speed_texts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    texts = default_speed_texts()
    assert len(texts) == 1000 and all(t and "\n" not in t for t in texts)
    assert default_speed_texts(3) == texts[:3]
    assert speed.SPEED_TEXTS == Path(speed.__file__).resolve().parents[2] / "data/wordnet/texts.txt"
    small = tmp_path / "texts.txt"
    small.write_text("one\ntwo\n", encoding="utf-8")
    monkeypatch.setattr(speed, "SPEED_TEXTS", small)
    with pytest.raises(ValueError, match="has only 2 lines, 5 requested"):
        default_speed_texts(5)
    monkeypatch.setattr(speed, "SPEED_TEXTS", tmp_path / "gone.txt")
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        default_speed_texts()


# --------------------------------------------------------------------------- child processes


def _allocate(mb: int) -> int:
    """Module-level, so a spawn child can unpickle it: holds ``mb`` MiB of touched memory."""
    block = np.ones(mb * 1024 * 1024, dtype=np.uint8)
    return int(block[:: 4096].sum())


def _fail() -> None:
    raise KeyError("boom in the child")


def test_peak_memory_mb_measures_the_function() -> None:
    result, mb = peak_memory_mb(partial(_allocate, 150))
    assert result == 150 * 256  # one 1 per 4096 bytes
    assert 120 < mb < 400  # 150 MiB plus allocator noise, not the ~200 MB interpreter + torch


def test_child_exception_propagates() -> None:
    with pytest.raises(KeyError, match="boom in the child"):
        peak_memory_mb(_fail)


def test_unpicklable_callable_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def local() -> int:
        return 1

    for fn in (lambda: 1, local, partial(lambda n: n, 3)):
        with pytest.raises(TypeError, match="must be picklable: use a module-level function"):
            peak_memory_mb(fn)
    with pytest.raises(TypeError, match=r"speed_report\(load_encoder\) runs in a fresh 'spawn'"):
        speed_report(lambda: FakeEncoder(), ["a"])

    # a notebook function pickles by name but cannot be found again by a spawn child
    notebook = types.ModuleType("__main__")
    def cell() -> int:
        return 1
    cell.__module__, cell.__qualname__ = "__main__", "cell"
    notebook.cell = cell
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    with pytest.raises(TypeError, match="defined in an interactive __main__"):
        peak_memory_mb(cell)


def test_speed_report_tiny_model(tiny_assets: Path) -> None:
    texts = (tiny_assets / "corpus.txt").read_text(encoding="utf-8").splitlines()[:64]
    loader = partial(load_st_encoder, str(tiny_assets / "teacher_a"))
    r = speed_report(loader, texts, batch_size=16, latency_samples=8, warmup=1, threads=1)
    assert r["sentences_per_s"] > 0 and 0 < r["latency_ms_p50"] <= r["latency_ms_p90"]
    assert (r["texts"], r["batch_size"], r["threads"]) == (64, 16, 1)
    assert r["memory"] == "cpu_rss"
    assert 0 < r["peak_memory_mb"] < r["peak_rss_mb"]
    assert r["rss_baseline_mb"] > 0


def test_peak_memory_ignores_a_big_parent():
    """ru_maxrss survives execve on Linux: a 400 MB parent must not show up in the child."""
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this (parent) process
    ballast += 1
    _, mb = peak_memory_mb(partial(_allocate, 20))
    assert mb < 150, f"child peak {mb:.0f} MB includes the parent's memory"
    del ballast
