"""int8 for CPU serving: a model as sentence-transformers runs it on torch (fp32), as ONNX (fp32)
and as dynamically quantized int8 ONNX (mtd/onnx.py), side by side in one process.

    python bench/int8.py [MODEL ...] [--repeats 2] [--threads 2] [--batch1-texts 64] [--out FILE]

MODEL: sentence-transformers folders (default: models/all-MiniLM-L6-v2, and runs/default/final
when it exists). Each is copied to a temporary folder, where its ONNX files are written: the
bench never writes into MODEL. For each: sentences/s at batch 64 (all STS-B test sentences, the
median of --repeats passes) and at batch 1 (the first --batch1-texts of them), the three variants
taking turns within every repeat (the order rotating); torch and onnxruntime both with --threads
intra-op threads. Then STS-B and SICK-R test Spearman x100 of each (STS-B from the timed
vectors), the change against torch, the mean cosine of each variant's vectors to torch's, and the
size of the transformer's weights file. Writes JSON to --out (bench/results/int8.json) and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np

import mtd  # noqa: F401  (torchvision shim before transformers loads)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sts"
DEFAULT_MODELS = [ROOT / "models" / "all-MiniLM-L6-v2", ROOT / "runs" / "default" / "final"]
VARIANTS = ("torch fp32", "onnx fp32", "onnx int8")
GOAL = "onnx int8 at batch 64 >= 2x the sentences/s of torch fp32, losing <= 1 point of STS-B"

Encode = Callable[[list[str], int], np.ndarray]
logger = logging.getLogger("bench.int8")


def encoders(folder: Path, threads: int) -> dict[str, Encode]:
    """variant -> encode(texts, batch_size) of the exported copy `folder`."""
    from sentence_transformers import SentenceTransformer

    from mtd.onnx import FP32_FILE, INT8_FILE, load_onnx_model

    st = SentenceTransformer(str(folder), device="cpu")
    onnx = load_onnx_model(folder, FP32_FILE, threads)
    int8 = load_onnx_model(folder, INT8_FILE, threads)
    return {
        "torch fp32": lambda texts, bs: st.encode(texts, batch_size=bs, convert_to_numpy=True,
                                                  show_progress_bar=False),
        "onnx fp32": lambda texts, bs: onnx.encode(texts, batch_size=bs),
        "onnx int8": lambda texts, bs: int8.encode(texts, batch_size=bs),
    }


def sizes_mb(folder: Path) -> dict[str, float]:
    """Size of the file each variant runs the transformer from (the other modules are shared)."""
    from mtd.hf import transformer_subfolder
    from mtd.onnx import FP32_FILE, INT8_FILE

    files = {"torch fp32": transformer_subfolder(folder) / "model.safetensors",
             "onnx fp32": folder / FP32_FILE, "onnx int8": folder / INT8_FILE}
    return {v: round(p.stat().st_size / 1e6, 1) for v, p in files.items()}


def timed_rounds(encode: dict[str, Encode], texts: list[str], batch_size: int, repeats: int,
                 keep: dict[str, np.ndarray] | None = None) -> dict[str, list[float]]:
    """Sentences/s of every variant in each of `repeats` rounds; within a round each variant
    encodes `texts` once, the order rotating from round to round. `keep` receives each variant's
    vectors of its first pass."""
    rates: dict[str, list[float]] = {v: [] for v in encode}
    names = list(encode)
    for r in range(repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            vecs = encode[v](texts, batch_size)
            rates[v].append(len(texts) / (time.perf_counter() - start))
            if keep is not None:
                keep.setdefault(v, vecs)
    return rates


def bench_model(source: Path, work: Path, sts_files: dict[str, Path], repeats: int, threads: int,
                batch1_texts: int) -> list[dict]:
    """One row per variant for the model folder `source`, exported in a copy under `work`."""
    from mtd.evaluation.sts import evaluate_sts, load_sts
    from mtd.onnx import export_onnx

    folder = Path(tempfile.mkdtemp(dir=work)) / source.name
    shutil.copytree(source, folder)  # a linked model folder is copied, not linked
    start = time.perf_counter()
    export_onnx(folder)
    export_s = time.perf_counter() - start
    encode = encoders(folder, threads)
    sets = {name: load_sts(path) for name, path in sts_files.items()}
    speed_set = next(iter(sets.values()))
    texts = list(dict.fromkeys([*speed_set.sentences1, *speed_set.sentences2]))
    for v in VARIANTS:  # warm-up: lazy initialisation, allocator, thread pools
        encode[v](texts[:64], 64)
        encode[v](texts[:4], 1)
    load_before = os.getloadavg()[0]
    logger.info("exported in %.0f s; timing %d rounds at batch 64 (%d texts) and at batch 1 (%d)",
                export_s, repeats, len(texts), min(batch1_texts, len(texts)))
    vectors: dict[str, np.ndarray] = {}
    b64 = timed_rounds(encode, texts, 64, repeats, keep=vectors)
    b1 = timed_rounds(encode, texts[:batch1_texts], 1, repeats)
    load_after = os.getloadavg()[0]
    logger.info("timed; scoring %s", ", ".join(sets))
    row = {t: i for i, t in enumerate(texts)}
    scores: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    for name, data in sets.items():
        for v in VARIANTS:  # the speed set is scored with the timed pass's vectors
            fn = partial(_lookup, vectors[v], row) if data is speed_set else partial(_batch64, encode[v])
            scores[v][name] = round(evaluate_sts(fn, data, batch_size=None)["spearman"], 2)
    size = sizes_mb(folder)
    rows = []
    for v in VARIANTS:
        rate64, rate1 = statistics.median(b64[v]), statistics.median(b1[v])
        base64, base1 = statistics.median(b64[VARIANTS[0]]), statistics.median(b1[VARIANTS[0]])
        cos = (vectors[v] * vectors[VARIANTS[0]]).sum(1) / (
            np.linalg.norm(vectors[v], axis=1) * np.linalg.norm(vectors[VARIANTS[0]], axis=1))
        rows.append({
            "model": str(source), "variant": v, "file_mb": size[v],
            "sentences_per_s_b64": round(rate64, 1), "x_torch_b64": round(rate64 / base64, 2),
            "sentences_per_s_b1": round(rate1, 1), "x_torch_b1": round(rate1 / base1, 2),
            "passes_b64": [round(x, 1) for x in b64[v]], "passes_b1": [round(x, 1) for x in b1[v]],
            **{name: s for name, s in scores[v].items()},
            **{f"{name}_change": round(s - scores[VARIANTS[0]][name], 2) for name, s in scores[v].items()},
            "mean_cos_to_torch": round(float(cos.mean()), 4),
            "texts_b64": len(texts), "texts_b1": min(batch1_texts, len(texts)),
            "export_s": round(export_s, 1), "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        })
    return rows


def _lookup(vecs: np.ndarray, row: dict[str, int], texts: list[str]) -> np.ndarray:
    return vecs[[row[t] for t in texts]]


def _batch64(encode: Encode, texts: list[str]) -> np.ndarray:
    return encode(texts, 64)


def table(rows: list[dict], sets: list[str]) -> str:
    head = ["model", "variant", "MB", "sent/s b64", "x torch", "sent/s b1", "x torch",
            *[f"{s} (change)" for s in sets], "cos to torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [Path(r["model"]).name, r["variant"], f"{r['file_mb']:.1f}",
                 f"{r['sentences_per_s_b64']:.0f}", f"{r['x_torch_b64']:.2f}",
                 f"{r['sentences_per_s_b1']:.0f}", f"{r['x_torch_b1']:.2f}",
                 *[f"{r[s]:.2f} ({r[s + '_change']:+.2f})" for s in sets], f"{r['mean_cos_to_torch']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    from mtd.errors import cli_main

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path,
                        help="sentence-transformers folders (default: models/all-MiniLM-L6-v2 and "
                             "runs/default/final when it exists)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per variant and batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch1-texts", type=int, default=64, help="texts encoded one at a time per pass")
    parser.add_argument("--stsb", type=Path, default=DATA / "stsb" / "test.jsonl",
                        help="STS-B test pairs: the timed texts, and a score")
    parser.add_argument("--sickr", type=Path, default=DATA / "sickr" / "test.jsonl", help="SICK-R test pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.batch1_texts < 1:
        parser.error("--repeats, --threads and --batch1-texts must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return cli_main("bench.int8", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    import onnxruntime
    import torch

    from mtd.errors import MtdError
    from mtd.io import check_writable, write_json_or_fallback
    from mtd.onnx import check_st_folder

    models = args.models or [m for m in DEFAULT_MODELS if m.is_dir() or m == DEFAULT_MODELS[0]]
    for model in models:
        check_st_folder(model)
    sts_files = {"stsb": args.stsb, "sickr": args.sickr}
    for path in sts_files.values():
        if not path.is_file():
            raise MtdError(f"{path} does not exist: point --stsb/--sickr at STS test files "
                           "(sentence1, sentence2, score), e.g. ../shared/data/sts/stsb/test.jsonl.")
    check_writable(args.out, "--out")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as work:
        for model in models:
            logger.info("%s: exporting a copy and timing %s", model, ", ".join(VARIANTS))
            rows += bench_model(model, Path(work), sts_files, args.repeats, args.threads, args.batch1_texts)
    result = {
        "date": date.today().isoformat(), "goal": GOAL,
        "machine": {"cpu": _cpu(), "cores": os.cpu_count()},
        "settings": {"repeats": args.repeats, "threads": args.threads, "batch1_texts": args.batch1_texts,
                     "speed_texts": "stsb test, every distinct sentence"},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "wall_s": round(time.perf_counter() - started, 1), "rows": rows,
    }
    write_json_or_fallback(args.out, result, "int8 benchmark results")
    print(table(rows, list(sts_files)))
    for r in rows:
        if r["variant"] == "onnx int8":
            met = r["x_torch_b64"] >= 2 and r["stsb_change"] >= -1
            print(f"{Path(r['model']).name}: int8 {r['x_torch_b64']:.2f}x torch fp32 at batch 64, STS-B "
                  f"{r['stsb_change']:+.2f}; goal ({GOAL}): {'met' if met else 'not met'}")


if __name__ == "__main__":
    raise SystemExit(main())
