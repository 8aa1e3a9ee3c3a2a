"""Smaller vectors of one model by self-distillation and by PCA, side by side (README "Smaller
vectors from any model").

    python bench/reduce_table.py [--model models/all-mpnet-base-v2] [--name mpnet] [--max-length 128]
        [--corpus data/wordnet/texts.txt] [--max-texts 10000] [--dims 512,256,128,64]
        [--cache-dir cache] [--work runs/reduce-NAME] [--data ../shared/data] [--eval-cache cache]
        [--eval-cli] [--threads 2] [--out bench/results/reduce_NAME.json] [REDUCE_FLAG ...]

1. `python -m mtd.reduce MODEL --dims DIMS --method M --out WORK --overwrite ...` for M in self and
   pca, run in this process through mtd.reduce.run (the command's own code), each timed. Other
   flags (e.g. --steps 3000) go to both.
2. The full model and every output scored on the STS (Spearman x100) and BEIR retrieval (nDCG@10)
   sets under --data with eval.py's suite. An output computes the model's own vectors and then
   its Dense and Normalize, so by default its vectors are derived from the full model's (encoded
   once, cached under --eval-cache like eval.py's) through the Dense read from the exported
   folder, after checking that SentenceTransformer(output).encode gives the same vectors for
   STS sentences and the longest retrieval documents (the largest difference is recorded).
   --eval-cli runs `eval.py` on the full model and every output folder instead: each output then
   encodes every set again (on a CPU, minutes per mpnet-sized output).
3. --out (JSON: settings, commands, seconds, dev sim losses, every score, retention) and a Markdown
   table beside it (.md, also printed): one row per size and method, each main score with its
   retention in % of the full model's.

The defaults are configs/default.yaml's teacher mpnet (name, path, max_length 128) and corpus
(10,000 shuffled WordNet texts, 500 held out), so a default training run's target cache is reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's mtd
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import cached_property  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mtd  # noqa: E402, F401  (torchvision shim before transformers loads)
from mtd import reduce  # noqa: E402
from mtd.errors import cli_main  # noqa: E402
from mtd.evaluation.specs import Encoder, SentenceTransformerEncoder, cached_encode  # noqa: E402
from mtd.hf import resolve_model  # noqa: E402
from mtd.io import atomic_write_json, atomic_write_text, hash_folder  # noqa: E402

logger = logging.getLogger("reduce_table")

DEFAULT_DATA = ROOT.parent / "shared" / "data"
CHECK_SENTENCES, CHECK_DOCUMENTS = 32, 8  # texts on which each output's vectors are checked
GOAL = (256, 99.0)  # the self-distilled 256-d output should keep 99% of the full model's scores


def _rel(path: str | Path) -> str:
    """A path inside the project as relative to it (results name no checkout)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class DerivedEncoder:
    """An mtd.reduce output scored from its model's vectors: those (normalized) through the
    output's Dense, normalized again: what the output's own modules compute."""

    name: str
    folder: Path  # the exported output
    inner: SentenceTransformerEncoder  # the full model
    cache_dir: Path | None  # where the full model's vectors are cached
    weight: np.ndarray  # (d, D), the output's Dense
    bias: np.ndarray  # (d,)

    @classmethod
    def checked(cls, name: str, folder: Path, inner: SentenceTransformerEncoder, cache_dir: Path | None,
                texts: list[str], full: np.ndarray) -> tuple[DerivedEncoder, float]:
        """The encoder, and the largest difference between the output's own vectors of `texts`
        and the ones derived from `full`, the full model's vectors of them."""
        from sentence_transformers import SentenceTransformer, models

        model = SentenceTransformer(str(folder), device="cpu")
        *_, dense, last = list(model)
        if not (isinstance(dense, models.Dense) and isinstance(last, models.Normalize)):
            raise ValueError(f"{folder} does not end with Dense and Normalize: not an mtd.reduce output.")
        weight, bias = (p.detach().double().numpy() for p in (dense.linear.weight, dense.linear.bias))
        encoder = cls(name, folder, inner, cache_dir, weight, bias)
        own = model.encode(texts, batch_size=16, prompt=inner.prompt("document"), convert_to_numpy=True)
        return encoder, float(np.abs(own - encoder.project(full)).max())

    @cached_property
    def fingerprint(self) -> str:  # not the folder's own: eval.py's vectors of it stay apart
        return f"{hash_folder(self.folder)}|derived from {self.inner.fingerprint}"

    def project(self, full: np.ndarray) -> np.ndarray:
        mapped = _normalize(np.asarray(full, np.float64)) @ self.weight.T + self.bias
        return _normalize(mapped).astype(np.float32)

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        return self.project(cached_encode(self.inner, texts, role, self.cache_dir, batch_size))


def check_texts(data: Path) -> list[str]:
    """Short and long texts of the data sets scored: STS sentences, the longest documents (past
    the max_seq_length of most models, so truncation must agree too)."""
    from mtd.evaluation import retrieval, sts
    from mtd.evaluation.suite import discover

    found = discover(data)
    texts = [s for path in found.sts[:1] for s in sts.load_sts(path).sentences1[:CHECK_SENTENCES]]
    for folder in found.retrieval[:1]:
        docs = retrieval.load_beir(folder, split="test").corpus_texts
        texts += sorted(docs, key=len, reverse=True)[:CHECK_DOCUMENTS]
    return texts


def reduce_argv(args: argparse.Namespace, method: str, extra: list[str]) -> list[str]:
    argv = [args.model, "--dims", args.dims, "--corpus", *args.corpus, "--out", str(args.work),
            "--method", method, "--max-texts", str(args.max_texts), "--cache-dir", str(args.cache_dir),
            "--name", args.name]
    if args.max_length:
        argv += ["--max-length", str(args.max_length)]
    return [*argv, "--overwrite", *extra]


def run_reductions(args: argparse.Namespace, extra: list[str]) -> dict[str, dict]:
    out = {}
    for method in reduce.METHODS:
        argv = reduce_argv(args, method, extra)
        t0 = time.perf_counter()
        rows = reduce.run(reduce.build_parser().parse_args(argv))
        shown = [_rel(a) if Path(a).is_absolute() else a for a in argv]
        out[method] = {"command": "python -m mtd.reduce " + shlex.join(shown),
                       "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
        logger.info("%s: %.0f s", method, out[method]["seconds"])
    return out


def outputs(reductions: dict[str, dict]) -> dict[str, Path]:
    """{label: folder} of every output, label METHOD-DIM."""
    return {f"{r['method']}-{r['dim']}": Path(r["folder"]) for r in reduced_rows(reductions)}


def reduced_rows(reductions: dict[str, dict]) -> list[dict]:
    """Every output's row (mtd.reduce's), largest size first, self before pca."""
    rows = [r for red in reductions.values() for r in red["rows"]]
    return sorted(rows, key=lambda r: (-r["dim"], reduce.METHODS.index(r["method"])))


def score_derived(args: argparse.Namespace, folders: dict[str, Path]) -> tuple[list[dict], dict[str, float]]:
    """Scores of the full model and of every output derived from its vectors, and the largest
    difference of each output's own vectors from the derived ones on check_texts."""
    from mtd.evaluation.suite import evaluate_all

    full = SentenceTransformerEncoder(args.name, resolve_model(args.model, "--model"))
    models: dict[str, Encoder] = {args.name: full}
    texts = check_texts(args.data)
    full_vectors = full.encode(texts)
    diffs = {}
    for label, folder in folders.items():
        models[label], diffs[label] = DerivedEncoder.checked(label, folder, full, args.eval_cache, texts,
                                                             full_vectors)
        logger.info("%s: its own vectors differ from the derived ones by at most %.2e", label, diffs[label])
    rows = evaluate_all(models, data=args.data, tasks=["sts", "retrieval"], split="test", batch_size=64,
                        index="flat", cache_dir=args.eval_cache, speed=None)
    return rows, diffs


def score_cli(args: argparse.Namespace, folders: dict[str, Path]) -> tuple[list[dict], list[str]]:
    """Scores of the full model and every output folder by eval.py itself, and its command."""
    out = args.work / "eval.json"
    cmd = [sys.executable, str(ROOT / "eval.py"), f"{args.name}={args.model}",
           *[f"{label}={folder}" for label, folder in folders.items()], "--tasks", "sts,retrieval",
           "--data", str(args.data), "--cache-dir", str(args.eval_cache), "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(out.read_text())["results"], cmd


def main_scores(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{model: {"DATASET METRIC": value}} of each data set's main metric (eval.py's table)."""
    from mtd.evaluation.suite import MAIN_METRIC

    out: dict[str, dict[str, float]] = {}
    for r in rows:
        metric = MAIN_METRIC[r["task"]]
        out.setdefault(r["model"], {})[f"{r['dataset']} {metric}"] = float(r[metric])
    return out


def table(scores: dict[str, dict[str, float]], full: str, reductions: dict[str, dict]) -> tuple[str, dict]:
    """The Markdown table and {label: {column: retention %}}."""
    columns = list(scores[full])
    head = ["dims", "method", *columns, "mean retention %", "dev sim loss (start -> end)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(columns) + 1) + "---:|",
             f"| full | {full} | " + " | ".join(f"{scores[full][c]:.2f}" for c in columns)
             + " | 100.0 |  |"]
    retention = {}
    for r in reduced_rows(reductions):
        label = f"{r['method']}-{r['dim']}"
        kept = {c: 100 * scores[label][c] / scores[full][c] for c in columns}
        retention[label] = kept
        start = "" if r["dev_sim_start"] is None else f"{r['dev_sim_start']:.2e} -> "
        cells = [f"{scores[label][c]:.2f} ({kept[c]:.1f}%)" for c in columns]
        lines.append(f"| {r['dim']} | {r['method']} | " + " | ".join(cells)
                     + f" | {np.mean(list(kept.values())):.1f} | {start}{r['dev_sim']:.2e} |")
    return "\n".join(lines), retention


def goal(retention: dict[str, dict[str, float]]) -> dict:
    """Whether self-256 keeps GOAL's share of every STS-B and retrieval score."""
    dim, share = GOAL
    kept = {c: v for c, v in retention.get(f"self-{dim}", {}).items() if not c.startswith("sickr")}
    return {"label": f"self-{dim}", "at_least_%": share, "kept_%": kept,
            "met": bool(kept) and all(v >= share for v in kept.values())}


def machine() -> dict:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/all-mpnet-base-v2")
    parser.add_argument("--name", default="mpnet", help="its name in cache and output folders")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per corpus text (0: the model's)")
    parser.add_argument("--corpus", nargs="+", default=["data/wordnet/texts.txt"])
    parser.add_argument("--max-texts", type=int, default=10_000)
    parser.add_argument("--dims", default="512,256,128,64")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="target cache (mtd.reduce)")
    parser.add_argument("--eval-cache", type=Path, default=ROOT / "cache",
                        help="eval.py's vectors cache (its --cache-dir)")
    parser.add_argument("--work", type=Path, default=None, help="outputs (default runs/reduce-NAME)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--eval-cli", action="store_true", help="score every output with eval.py itself")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/reduce_NAME.json")
    args, extra = parser.parse_known_args(argv)
    args.work = args.work or ROOT / "runs" / f"reduce-{args.name}"
    args.out = args.out or ROOT / "bench" / "results" / f"reduce_{args.name}.json"
    return args, extra


def body(args: argparse.Namespace, extra: list[str]) -> None:
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    reductions = run_reductions(args, extra)
    folders = outputs(reductions)
    t0 = time.perf_counter()
    if args.eval_cli:
        rows, cmd = score_cli(args, folders)
        scoring = {"how": "eval.py on every folder", "command": shlex.join(cmd).replace(f"{ROOT}/", "")}
    else:
        rows, diffs = score_derived(args, folders)
        scoring = {"how": "derived from the full model's vectors through each output's Dense",
                   "max_abs_diff_own_vs_derived": diffs}
    scoring["seconds"] = round(time.perf_counter() - t0, 1)
    scores = main_scores(rows)
    text, retention = table(scores, args.name, reductions)
    settings = {k: _rel(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"started": started, "machine": machine(), "settings": settings,
              "reduce_flags": extra, "reductions": reductions, "scoring": scoring, "scores": scores,
              "retention_%": retention, "goal": goal(retention), "table": text, "results": rows}
    atomic_write_json(args.out, result)
    rerun = "python bench/reduce_table.py " + shlex.join(argv_of(args, extra))
    atomic_write_text(args.out.with_suffix(".md"), f"{text}\n\n`{rerun}`\n")
    print(text)
    print(f"goal: {json.dumps(result['goal'])}")


def argv_of(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The flags that differ from the defaults: the command that reruns this measurement."""
    defaults, _ = parse_args(["--name", args.name])
    out = []
    for key, value in vars(args).items():
        if value == getattr(defaults, key):
            continue
        flag = "--" + key.replace("_", "-")
        values = [] if value is True else value if isinstance(value, list) else [value]
        out += [flag, *(_rel(v) if isinstance(v, Path) else str(v) for v in values)]
    return [*out, *extra]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = parse_args(argv)
    return cli_main("reduce_table", lambda: body(args, extra))


if __name__ == "__main__":
    sys.exit(main())
