"""How fast and how big an embedding model is, measured the way users compare models.

* :func:`measure_speed`: throughput (sentences/s at a batch size, after warm-up) and batch-1
  latency (p50/p90 ms) of any ``encode(texts, batch_size) -> (N, D) array`` callable.
* :func:`peak_memory_mb`: runs a function in a fresh ``spawn`` child process and reports the
  memory it added. On CPU this is the only honest way: the peak RSS (VmHWM, ``ru_maxrss``) of a process
  cannot be reset, so in a long-lived process it would still hold whatever ran before.
* :func:`speed_report`: both at once, in one child that loads the model, so the memory figure
  covers the weights plus the activations of encoding.
* :func:`default_speed_texts`: a fixed text set shipped with the repo, so numbers compare across
  runs and machines.

Callables sent to the child must be picklable: a module-level function, or a
``functools.partial`` of one (e.g. ``partial(load_st_encoder, "models/student")``); not a lambda,
closure, local function or a function defined in a notebook.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing
import os
import pickle
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

from mtd.io import reading_weights

logger = logging.getLogger(__name__)

__all__ = [
    "SPEED_TEXTS",
    "Encode",
    "default_speed_texts",
    "load_st_encoder",
    "measure_speed",
    "peak_memory_mb",
    "speed_report",
]

Encode = Callable[[list[str], int], np.ndarray]
T = TypeVar("T")

SPEED_TEXTS = Path(__file__).resolve().parents[2] / "data" / "wordnet" / "texts.txt"
MIB = 1024 * 1024


def default_speed_texts(n: int = 1000) -> list[str]:
    """The first ``n`` lines of the shipped corpus ``data/wordnet/texts.txt`` (WordNet glosses,
    2-60 words): a fixed set, so speed numbers compare across runs."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not SPEED_TEXTS.is_file():
        raise FileNotFoundError(
            f"speed text set not found: {SPEED_TEXTS} (it ships with the repository; "
            "restore it with `git checkout -- data/wordnet/texts.txt`)"
        )
    with SPEED_TEXTS.open(encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in itertools.islice(f, n)]
    if len(texts) < n:
        raise ValueError(f"{SPEED_TEXTS} has only {len(texts)} lines, {n} requested")
    return texts


# --------------------------------------------------------------------------- speed


def _check_load() -> float | None:
    """1-minute load average; warns when other work competes for the cores. On a busy machine,
    torch's intra-op threads wait on each other across scheduler time slices and a tiny model
    can look 50x slower (measured on a shared 2-core box), so such numbers must not be compared."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > cores:
        logger.warning(
            "load average %.1f exceeds the %d CPU cores: other processes compete for the CPU and "
            "timings will be noisy; measure on an idle machine or with fewer threads (threads=1)",
            load,
            cores,
        )
    return load


def _timed(encode: Encode, texts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    out = encode(texts, batch_size)
    if torch.cuda.is_initialized():  # CUDA kernels run asynchronously: wait for them to finish
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    shape = getattr(out, "shape", None)
    # An encoder that silently drops or truncates texts would look fast; refuse its numbers.
    if shape is None or len(shape) != 2 or shape[0] != len(texts):
        raise ValueError(
            f"encode returned shape {shape} for {len(texts)} texts; expected (N, D) with N = {len(texts)}"
        )
    return elapsed


def _throughput(encode: Encode, texts: list[str], batch_size: int, min_time_s: float) -> list[float]:
    """Sentences/s of each full pass over ``texts``: one pass if it takes ``min_time_s`` or more,
    otherwise more passes (5 at most) until their total reaches ``min_time_s``."""
    rates: list[float] = []
    total = 0.0
    with tqdm(total=5, desc="throughput", unit="pass", leave=False) as bar:
        while not rates or (total < min_time_s and len(rates) < 5):
            elapsed = _timed(encode, texts, batch_size)
            rates.append(len(texts) / max(elapsed, 1e-9))
            total += elapsed
            bar.update()
    return rates


def measure_speed(
    encode: Encode,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    latency_samples: int = 64,
    warmup: int = 2,
    min_time_s: float = 1.0,
) -> dict[str, Any]:
    """Throughput and single-text latency of ``encode(texts, batch_size) -> (N, D) array``.

    ``warmup`` batches (and as many single texts) are encoded first and not timed (lazy init,
    allocator and kernel warm-up). Throughput encodes all of ``texts`` in one call at
    ``batch_size``; a pass shorter than ``min_time_s`` is repeated (5 passes at most) and the
    median is reported. Latency encodes ``latency_samples`` texts one call each at batch size 1
    (the first texts, cycled if there are fewer), as a request-serving system would.

    Returns:
        ``{"sentences_per_s", "latency_ms_p50", "latency_ms_p90", "threads", "texts",
        "batch_size", "passes", "load_avg_1m"}``; ``threads`` is ``torch.get_num_threads()``,
        ``load_avg_1m`` the machine's 1-minute load average just before timing (None where the
        OS has none); a warning is logged when it exceeds the core count.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("measure_speed: no texts given")
    if batch_size < 1 or latency_samples < 1 or warmup < 0:
        raise ValueError(
            f"need batch_size >= 1, latency_samples >= 1, warmup >= 0; "
            f"got {batch_size}, {latency_samples}, {warmup}"
        )
    load = _check_load()
    for _ in range(warmup):
        _timed(encode, texts[:batch_size], batch_size)
        _timed(encode, texts[:1], 1)
    rates = _throughput(encode, texts, batch_size, min_time_s)
    picks = [texts[i % len(texts)] for i in range(latency_samples)]
    latencies = [
        _timed(encode, [t], 1) * 1000.0 for t in tqdm(picks, desc="latency", unit="text", leave=False)
    ]
    result = {
        "sentences_per_s": float(statistics.median(rates)),
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p90": float(np.percentile(latencies, 90)),
        "threads": torch.get_num_threads(),
        "texts": len(texts),
        "batch_size": batch_size,
        "passes": len(rates),
        "load_avg_1m": load,
    }
    logger.info(
        "speed: %.1f sentences/s (batch %d, %d texts, median of %d), latency p50 %.2f ms / "
        "p90 %.2f ms, %d threads",
        result["sentences_per_s"], batch_size, len(texts), len(rates),
        result["latency_ms_p50"], result["latency_ms_p90"], result["threads"],
    )
    return result


# --------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / MIB


def _maxrss_mb() -> float:
    """Peak RSS of this process's own address space.

    Linux: VmHWM from /proc, not ru_maxrss, which survives execve: a spawned child would report
    the parent's RSS at fork time if that was higher than anything the child reached itself.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MIB  # kB
    # ru_maxrss is in KiB on Linux but in bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def _measured_child(fn: Callable[[], T], preload: Sequence[str]) -> tuple[T, dict[str, Any]]:
    """Runs in the child: ``fn()`` and the memory it added. ``fn``'s module was imported when
    ``fn`` was unpickled; ``preload`` modules are imported here, both before the baseline."""
    for name in preload:
        importlib.import_module(name)
    cuda_before = torch.cuda.is_initialized()
    if cuda_before:  # a fresh process normally starts with zero stats; reset in case imports ran CUDA
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    result = fn()
    peak_rss = _maxrss_mb()
    stats: dict[str, Any] = {
        "rss_baseline_mb": baseline,
        "peak_rss_mb": peak_rss,
        "rss_added_mb": max(peak_rss - baseline, 0.0),
        "peak_gpu_mb": None,
    }
    if torch.cuda.is_initialized():
        stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / MIB
    return result, stats


def _check_picklable(fn: Callable[..., Any], what: str) -> None:
    hint = (
        f"{what} runs in a fresh 'spawn' process, so it must be picklable: use a module-level "
        "function in an importable .py file, or functools.partial of one, not a lambda, closure, "
        "local function or a function defined in a notebook/interactive session"
    )
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(f"{hint} (pickling {_short(fn)} failed: {exc})") from None
    # A __main__ function pickles by name, but a spawn child can only find it again when
    # __main__ is a script file (re-imported as __mp_main__), not a notebook or REPL.
    target = fn.func if isinstance(fn, partial) else fn
    main = sys.modules.get("__main__")
    if getattr(target, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise TypeError(f"{hint} ({_short(fn)} is defined in an interactive __main__)")


def _short(fn: Any, limit: int = 160) -> str:
    text = repr(fn)  # a partial's repr shows its arguments, which can be long
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_in_child(fn: Callable[[], T], what: str, preload: Sequence[str]) -> tuple[T, dict[str, Any]]:
    """``_measured_child(fn)`` in a new spawn process; ``fn`` was checked by the caller."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not Path(main_file).is_file():
        # spawn re-runs the parent's main script in the child; "<stdin>" cannot be re-run
        raise RuntimeError(
            f"{what}: cannot start a 'spawn' child from a script read from {main_file}; "
            "save the script to a .py file and run that"
        )
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(_measured_child, fn, tuple(preload)).result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                f"{what}: the child process died (killed for memory, or a crash in native code); "
                "call the function directly in a plain Python process to see why, or lower batch_size"
            ) from exc


def peak_memory_mb(fn: Callable[[], T], *, preload: Sequence[str] = ()) -> tuple[T, float]:
    """Run ``fn()`` in a fresh ``spawn`` child process; return its result and the memory it added.

    CPU: the child's peak RSS (VmHWM) minus its RSS just before ``fn`` ran, in MiB. The
    baseline is taken after Python, torch, ``fn``'s own module and the ``preload`` modules are
    imported, so libraries named there (e.g. ``"sentence_transformers"``, about 200 MB) or imported
    at the top of ``fn``'s module stay out of the figure; ones ``fn`` imports itself count.
    If ``fn`` used CUDA, the figure is instead ``torch.cuda.max_memory_allocated()``
    (tensors only; the child starts with fresh peak stats, reset first if imports touched CUDA).

    ``fn`` and its result must be picklable (see the module docstring); a ``TypeError`` says so.
    Each call starts a new interpreter (about as slow as ``import torch`` plus ``fn``'s imports).
    """
    _check_picklable(fn, "peak_memory_mb(fn)")
    result, stats = _run_in_child(fn, f"peak_memory_mb({_short(fn)})", preload)
    figure = stats["peak_gpu_mb"] if stats["peak_gpu_mb"] is not None else stats["rss_added_mb"]
    return result, float(figure)


# --------------------------------------------------------------------------- report


def _speed_child(
    load_encoder: Callable[[], Encode], texts: list[str], threads: int | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    encode = load_encoder()
    return measure_speed(encode, texts, **kwargs)


def speed_report(
    load_encoder: Callable[[], Encode],
    texts: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    latency_samples: int = 64,
    warmup: int = 2,
    threads: int | None = None,
    preload: Sequence[str] = ("sentence_transformers",),
) -> dict[str, Any]:
    """Load a model and measure its speed and memory, all in one fresh ``spawn`` child process.

    ``load_encoder()`` must return an ``encode(texts, batch_size) -> (N, D) array`` callable and
    be picklable, e.g. ``functools.partial(load_st_encoder, "models/student")``. ``texts``
    defaults to :func:`default_speed_texts`; ``threads`` sets ``torch.set_num_threads`` in the
    child (default: torch's own choice, reported as ``threads``; on a shared machine set it, e.g.
    to 1, or numbers swing by an order of magnitude with other users' load). ``preload`` modules are imported
    before the memory baseline, so the figure is the model's, not the library's (pass ``()`` for
    encoders that do not use sentence-transformers, to save the import).

    Returns:
        :func:`measure_speed`'s keys plus ``"peak_memory_mb"`` (memory added by loading and
        encoding, see :func:`peak_memory_mb`), ``"memory"`` (``"cpu_rss"`` or ``"cuda_allocated"``),
        ``"peak_rss_mb"`` (the child's absolute peak RSS) and ``"rss_baseline_mb"``.
    """
    texts = default_speed_texts() if texts is None else list(texts)
    kwargs = {"batch_size": batch_size, "latency_samples": latency_samples, "warmup": warmup}
    _check_picklable(load_encoder, "speed_report(load_encoder)")
    job = partial(_speed_child, load_encoder, texts, threads, kwargs)
    report, stats = _run_in_child(job, f"speed_report({_short(load_encoder)})", preload)
    on_gpu = stats["peak_gpu_mb"] is not None
    report.update(
        peak_memory_mb=float(stats["peak_gpu_mb"] if on_gpu else stats["rss_added_mb"]),
        memory="cuda_allocated" if on_gpu else "cpu_rss",
        peak_rss_mb=stats["peak_rss_mb"],
        rss_baseline_mb=stats["rss_baseline_mb"],
    )
    logger.info(
        "speed report: %.1f sentences/s, p50 %.2f ms, %.1f MB (%s)",
        report["sentences_per_s"], report["latency_ms_p50"], report["peak_memory_mb"], report["memory"],
    )
    return report


def load_st_encoder(model_path: str, device: str = "cpu") -> Encode:
    """Load a sentence-transformers model; for :func:`speed_report` as
    ``partial(load_st_encoder, path)``. The encoder shows no progress bar (it is being timed)."""
    from sentence_transformers import SentenceTransformer

    from mtd.hf import resolve_model

    folder = resolve_model(model_path, f"speed model {model_path!r}")
    with reading_weights(folder):
        model = SentenceTransformer(str(folder), device=device)
    return partial(_st_encode, model)


def _st_encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
