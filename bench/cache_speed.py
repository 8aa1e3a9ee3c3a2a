"""Target-cache fill speed beside SentenceTransformer.encode, same teacher, texts and threads.

Both sides are timed in one process, interleaved (A B A B ...), and compared as a ratio of medians,
because this machine is noisy. The cache side is end to end: hashing the teacher's weights,
loading it, encoding, normalizing, writing float16 chunks and markers, validating the result.
The encode side gets its model preloaded. Ratio = cache texts/s / encode texts/s (aim >= 0.95).

    python bench/cache_speed.py [--teacher models/all-MiniLM-L6-v2] [--texts 4000] [--repeats 3]
                                [--corpus FILE] [--batch-size 64] [--device cpu|cuda] [--out FILE]

Prints the result as JSON, and writes it to --out when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtd.config import TeacherConfig
from mtd.io import atomic_write_json
from mtd.targets.cache import build_teacher_cache
from mtd.targets.teachers import load_teacher, teacher_folder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    parser.add_argument("--corpus", default=str(ROOT / "data/wordnet/texts.txt"))
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the teacher runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the result JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts = Path(args.corpus).read_text(encoding="utf-8").splitlines()[: args.texts]
    cfg = TeacherConfig(name="bench", path=args.teacher, batch_size=args.batch_size)
    model = load_teacher(cfg, teacher_folder(cfg), device=args.device)
    model.encode(texts[:128], batch_size=args.batch_size)  # warm up kernels and allocator

    encode_s, cache_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        encode_s.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            build_teacher_cache(cfg, texts, root, device=args.device)
            cache_s.append(time.perf_counter() - t0)

    result = {
        "teacher": args.teacher,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "texts": len(texts),
        "threads": args.threads,
        "encode_texts_per_s": len(texts) / statistics.median(encode_s),
        "cache_texts_per_s": len(texts) / statistics.median(cache_s),
        "ratio_cache_over_encode": statistics.median(encode_s) / statistics.median(cache_s),
        "encode_seconds": encode_s,
        "cache_seconds": cache_s,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
