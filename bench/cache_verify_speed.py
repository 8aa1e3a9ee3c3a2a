"""What starting on a finished target cache costs, at a realistic size, side by side in one run:
reusing it as a run does (build_teacher_cache: the manifest, the vectors file's header and size, the
teacher's weights hash from its memo), reusing it with verify=True (`python -m mtd.cache --verify`:
every chunk's rows against their blake2b checksum), and opening it with open_cache (the same
check, plus the corpus fingerprint).

The teacher is a stub that returns random unit vectors, beside a weights file of --weights-mb
random bytes (hashed, never loaded), so only the cache's own work is timed. Prints seconds per call
(median of the repeats) and the ratio verify / plain reuse.

    python bench/cache_verify_speed.py [--rows 200000] [--dim 1152] [--chunk 1024] [--repeats 3] 2>/dev/null

(stderr holds the fill's progress bar.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mtd.config import TeacherConfig
from mtd.targets import teachers
from mtd.targets.cache import build_teacher_cache, open_cache


def _stub_teacher(dim: int) -> None:
    rng = np.random.default_rng(0)

    def encode(model, texts, cfg):
        vecs = rng.standard_normal((len(texts), dim), dtype=np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)

    teachers.load_teacher = lambda cfg, folder, device=None: None
    teachers.embedding_dim = lambda model: dim
    teachers.encode = encode


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights-mb", type=int, default=400, help="size of the stub teacher's weights")
    args = parser.parse_args()
    _stub_teacher(args.dim)
    texts = [f"text {i} " + "x" * (i % 97) for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "stub-teacher"
        teacher.mkdir()
        (teacher / "config.json").write_text("{}")
        with open(teacher / "model.safetensors", "wb") as f:  # hashed, never loaded
            for _ in range(args.weights_mb):
                f.write(np.random.default_rng(0).bytes(1 << 20))
        cfg = TeacherConfig(name="stub", path=str(teacher))
        root = Path(tmp) / "cache"
        t0 = time.perf_counter()
        folder = build_teacher_cache(cfg, texts, root, chunk_size=args.chunk)
        fill_s = time.perf_counter() - t0
        reuse_s = _median_seconds(lambda: build_teacher_cache(cfg, texts, root, chunk_size=args.chunk),
                                  args.repeats)
        verify_s = _median_seconds(lambda: build_teacher_cache(cfg, texts, root, chunk_size=args.chunk,
                                                               verify=True), args.repeats)
        open_s = _median_seconds(lambda: open_cache(folder, texts), args.repeats)
    print(json.dumps({
        "rows": args.rows, "dim": args.dim, "chunk": args.chunk,
        "gb_float16": round(args.rows * args.dim * 2 / 1e9, 3),
        "fill_seconds_stub_teacher": round(fill_s, 2),
        "weights_mb": args.weights_mb,
        "reuse_seconds": round(reuse_s, 3),
        "reuse_verify_seconds": round(verify_s, 2),
        "open_cache_seconds": round(open_s, 2),
        "verify_over_reuse": round(verify_s / reuse_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
