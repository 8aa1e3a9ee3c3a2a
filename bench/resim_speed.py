"""Exact relative-similarity loss: the chunked P x P form against the sort-based one, forward +
backward from the student's vectors, at several batch sizes (P = B(B-1)/2 pairs).

Both forms are timed in one process, interleaved (chunked, sorted, chunked, ...), as medians and a
ratio, because this machine is noisy. The chunked form takes O(P^2) time: a size where its time,
extrapolated from the last size measured, would pass --max-seconds per run is skipped and marked
so. Peak memory of one forward + backward: on CUDA torch.cuda.max_memory_allocated over what was
allocated before; on CPU, in a fresh process, the peak RSS (VmHWM, reset through
/proc/self/clear_refs) over the RSS before the run.
Writes bench/results/resim_speed.json (or --out) and a table on stdout.

    python bench/resim_speed.py [--sizes 16,32,64,128,256,512,1024] [--repeats 5] [--threads 1]
                                [--device cpu|cuda] [--max-seconds 60]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mtd.io import atomic_write_json
from mtd.losses.terms import _ChunkedRankHinge, _pair_sims, _SortedRankHinge

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.015
CHUNK = 1024  # the default resim_chunk_size


def _chunked(ss, tt):
    return _ChunkedRankHinge.apply(ss, tt, MARGIN, CHUNK)


def _sorted(ss, tt):
    return _SortedRankHinge.apply(ss, tt, MARGIN)


FORMS: dict[str, Callable] = {"chunked": _chunked, "sorted": _sorted}


def _inputs(b: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed + b)
    student = torch.randn(b, 256, generator=g).to(device)
    target = torch.randn(b, 1024, generator=g).to(device)
    return student, target


def _step(form: str, student, target) -> float:
    """One forward + backward of the loss from raw vectors; returns the loss."""
    s = student.detach().requires_grad_(True)
    ss = _pair_sims(F.normalize(s, dim=-1))
    tt = _pair_sims(F.normalize(target, dim=-1))
    loss = FORMS[form](ss, tt)
    loss.backward()
    return loss.item()  # also waits for the device


def _timed(form: str, student, target) -> tuple[float, float]:
    if student.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = _step(form, student, target)
    return time.perf_counter() - start, loss


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_mib(form: str, b: int, device: str) -> float:
    student, target = _inputs(b, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(form, student, target)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm_kib("VmRSS")
    _step(form, student, target)
    return (_vm_kib("VmHWM") - before) / 1024


def _cpu_peak_child(form: str, b: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    _step(form, *_inputs(8, "cpu"))  # lazy initialisation outside the measurement
    queue.put(_peak_mib(form, b, "cpu"))


def _fresh_peak_mib(form: str, b: int, device: str, threads: int) -> float:
    """_peak_mib, on CPU in a fresh process: memory freed by earlier runs stays in this one's
    heap and would hide the run's allocations."""
    if device == "cuda":
        return _peak_mib(form, b, device)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_cpu_peak_child, args=(form, b, threads, queue))
    child.start()
    peak = queue.get()
    child.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", default="16,32,64,128,256,512,1024", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip the chunked form where one run would take longer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "resim_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    for form in FORMS:  # lazy initialisation (and CUDA kernels) outside the timings
        _step(form, *_inputs(16, args.device))

    rows = []
    last: tuple[int, float] | None = None  # (pairs, seconds) of the chunked form's last size
    for b in sizes:
        pairs = b * (b - 1) // 2
        student, target = _inputs(b, args.device)
        forms = list(FORMS)
        estimate = last[1] * (pairs / last[0]) ** 2 if last else 0.0
        if estimate > args.max_seconds:
            forms.remove("chunked")
        times: dict[str, list[float]] = {f: [] for f in forms}
        losses: dict[str, float] = {}
        for _ in range(args.repeats):
            for form in forms:
                seconds, losses[form] = _timed(form, student, target)
                times[form].append(seconds)
        row: dict = {"batch": b, "pairs": pairs}
        for form in FORMS:
            if form in forms:
                row[f"{form}_s"] = statistics.median(times[form])
                row[f"{form}_peak_mib"] = _fresh_peak_mib(form, b, args.device, args.threads)
            else:
                row[f"{form}_s"] = row[f"{form}_peak_mib"] = None
                row[f"{form}_skipped"] = f"estimated {estimate:.0f} s per run > {args.max_seconds:g} s"
        if "chunked" in forms:
            last = (pairs, row["chunked_s"])
            row["speedup"] = row["chunked_s"] / row["sorted_s"]
            row["loss_rel_diff"] = abs(losses["sorted"] - losses["chunked"]) / abs(losses["chunked"])
        rows.append(row)
        chunked = (f"{row['chunked_s'] * 1e3:10.1f} ms {row['chunked_peak_mib']:8.1f} MiB"
                   if "chunked" in forms else f"  skipped ({row['chunked_skipped']})")
        ratio = f"  {row['speedup']:8.1f}x" if "chunked" in forms else ""
        print(f"B={b:5d} P={pairs:7d}  sorted {row['sorted_s'] * 1e3:9.1f} ms "
              f"{row['sorted_peak_mib']:7.1f} MiB  chunked {chunked}{ratio}", flush=True)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads"
    atomic_write_json(args.out, {
        "device": device, "torch": torch.__version__, "repeats": args.repeats, "margin": MARGIN,
        "chunk_size": CHUNK, "time": "median seconds of forward + backward from the vectors",
        "peak": "MiB above the memory in use before the run", "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
