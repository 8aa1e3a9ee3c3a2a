"""Smaller vectors from any sentence-transformers model, learned from unlabeled text alone.

    python -m mtd.reduce MODEL --dims 256,128 --corpus FILE [FILE ...] --out DIR
                         [--method self|pca] [--init pca|random] [--max-texts N] [--dev-size N]
                         [--steps N] [--batch-size N] [--lr X] [--seed N] [--cache-dir DIR]
                         [--name NAME] [--max-length N] [--text-field KEY] [--overwrite]

MODEL is any sentence-transformers folder (a teacher such as models/all-mpnet-base-v2, an mtd
export such as runs/NAME/final) or hub id. It encodes the corpus once into the target cache, as a
teacher does (mtd.targets.cache; the cache's identity is NAME, MODEL as given, its weights and
MAX_LENGTH), so a second run on the same texts, or a training run's cache of the same teacher
(same name, path and max_length) and corpus, is reused. The corpus is read as training reads it
(shuffled with --seed, the first --max-texts kept) and its last --dev-size texts are held out.
Then, for each size d in --dims, a linear map D -> d is fitted on the cached, normalized vectors
of the training texts:

    pca   principal components of the centered vectors: weight = the first d components,
          bias = -weight @ mean (each component's sign fixed by its largest entry).
    self  self-distillation: the model's own full-size vectors are the target; the map learns to
          keep their similarity matrix (sim, weight 200) and the ranking of their pair
          similarities (resim, weight 20), Jasper's terms for heads smaller than the target.
          It starts from the PCA map (--init pca) or from a random one (--init random). The
          model is frozen, so training runs on the cached vectors only.

Each map is exported as its own sentence-transformers folder, DIR/NAME-METHOD-d: the model's own
modules, a Normalize when they do not end with one (the map was fitted on normalized vectors),
Dense(D -> d, no activation) and Normalize, with the model's own max_seq_length and prompts
(--max-length only sets how the corpus is encoded). `SentenceTransformer(DIR/NAME-self-256)` loads
it with no mtd code. The dev texts' sim loss (the MSE of their similarity matrices against the model's
full vectors, in batches of --batch-size) is logged before and after fitting.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mtd.config import StageConfig, TeacherConfig
from mtd.data.corpus import StepBatchSampler, read_corpus
from mtd.errors import MtdError, cli_main
from mtd.export import check_out, save_folder
from mtd.hf import HUB_PREFIX, resolve_model
from mtd.losses.objective import Objective
from mtd.losses.terms import similarity_loss
from mtd.targets import teachers
from mtd.targets.cache import cached_targets

logger = logging.getLogger(__name__)

METHODS = ("self", "pca")
INITS = ("pca", "random")  # where self-distillation starts: the PCA map, or nn.Linear's random init
TERMS = ["sim", "resim"]  # a head smaller than its target learns relations, not coordinates
DEV_SIZE = 500  # texts held out by default (as configs/default.yaml's data.dev_size)
DEV_SHARE = 10  # at most 1/DEV_SHARE of the texts are held out
EVALS = 5  # dev evaluations during self-distillation, besides the one before it
WARMUP = 0.05  # share of the steps with a linear lr warmup, then cosine decay to 0


class ReduceError(MtdError, ValueError):
    """Bad input to `python -m mtd.reduce`: the model, sizes, method, corpus or output folder."""


@dataclass(frozen=True)
class Head:
    """One fitted map D -> d: vectors become normalize(weight @ normalize(v) + bias)."""

    weight: torch.Tensor  # (d, D)
    bias: torch.Tensor  # (d,)
    dev_sim_start: float | None  # dev sim loss before fitting (self) or None (pca: no start)
    dev_sim: float | None  # dev sim loss of the fitted map; None without dev texts


def parse_dims(text: str) -> list[int]:
    """'256,128' -> [256, 128], or an error naming the fix (check_dims checks the sizes)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ReduceError(f"--dims {text!r}: give whole numbers, comma-separated, e.g. "
                          "--dims 256,128.") from None


def check_dims(dims: list[int], model_dim: int | None = None, model: str = "") -> None:
    """At least one size, each at least 1 and (once the model's `model_dim` is known) smaller than
    it, or nothing is reduced."""
    if not dims:
        raise ReduceError("--dims is empty: give the output sizes to make, comma-separated, e.g. "
                          "--dims 256,128.")
    small = [d for d in dims if d <= 0]
    if small:
        raise ReduceError(f"--dims {small[0]}: sizes must be at least 1, e.g. --dims 256,128.")
    big = [d for d in dims if model_dim is not None and d >= model_dim]
    if big:
        raise ReduceError(f"--dims {','.join(map(str, big))}: dims larger than the model's (or equal): "
                          f"{model} gives {model_dim}-d vectors. Give sizes from 1 to {model_dim - 1}.")


def check_method(method: str, init: str = "pca") -> None:
    if method not in METHODS:
        raise ReduceError(f"Unknown --method {method!r}: use one of {', '.join(METHODS)}.")
    if init not in INITS:
        raise ReduceError(f"Unknown --init {init!r}: use one of {', '.join(INITS)}.")


def model_folder(model: str) -> Path:
    """The model's local folder (a hub id downloaded), checked to be a sentence-transformers model."""
    folder = resolve_model(model, f"MODEL {model}")
    if not (folder / "modules.json").is_file():
        raise ReduceError(f"MODEL {model}: {folder} is not a sentence-transformers folder (it has no "
                          "modules.json). Give a folder that SentenceTransformer(path) loads, e.g. "
                          "models/all-mpnet-base-v2 or an mtd export (runs/NAME/final).")
    return folder


def default_name(model: str, folder: Path) -> str:
    """The last part of MODEL as given (models/all-mpnet-base-v2 -> all-mpnet-base-v2)."""
    return Path(model.removeprefix(HUB_PREFIX)).name or folder.resolve().name


def out_folder(out: Path, name: str, method: str, dim: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return out / f"{safe}-{method}-{dim}"


def check_outside_model(out: Path, folder: Path) -> None:
    """Writing into the model's folder would change the model (and its cache identity)."""
    if out.resolve().is_relative_to(folder.resolve()):
        raise ReduceError(f"--out {out} is inside the model's folder {folder}; writing there would change "
                          "the model. Choose a folder outside it, e.g. --out reduced.")


def dev_size_for(n: int, dev_size: int) -> int:
    """The dev texts held out of n: dev_size, at most a tenth of them."""
    held = min(dev_size, n // DEV_SHARE)
    if held < dev_size:
        logger.info("Holding out %d of the %d texts for dev (--dev-size %d is at most a tenth of them).",
                    held, n, dev_size)
    return held


def dev_sim_loss(vectors: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 batch_size: int) -> float | None:
    """Mean sim loss of the dev vectors mapped by (weight, bias) against themselves, in consecutive
    batches of batch_size (a last one under 2 rows left out); None without 2 dev rows."""
    batches = [vectors[i : i + batch_size] for i in range(0, len(vectors), batch_size)]
    batches = [b for b in batches if len(b) >= 2]
    if not batches:
        return None
    with torch.no_grad():
        return float(np.mean([float(similarity_loss(b @ weight.T + bias, b)) for b in batches]))


def principal_axes(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), axes (min(N, D), D)) of `vectors` (N, D) in float64: the principal axes of the
    centered vectors, largest variance first, each with its largest entry positive (a
    reproducible sign)."""
    x = vectors.double()
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    return mean, vh * signs


def fit_pca(train: torch.Tensor, dims: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{d: (weight (d, D), bias (d,))}: the vectors centered and projected onto their first d
    principal components (principal_axes)."""
    mean, vh = principal_axes(train)
    return {d: (vh[:d].float(), (-vh[:d] @ mean).float()) for d in dims}


def fit_self(train: torch.Tensor, dev: torch.Tensor, dims: list[int], *, steps: int, batch_size: int,
             lr: float, seed: int, init: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
             ) -> dict[int, Head]:
    """Self-distillation: a linear map per size, trained with Jasper's sim and resim terms against
    the full-size vectors themselves, from `init` ({d: (weight, bias)}, e.g. fit_pca's) or a
    random start. The heads train together (their terms summed, each head's gradient its own);
    only their weights get gradients: the vectors, input and target alike, are detached."""
    train, dev = train.detach().float(), dev.detach().float()
    names = {d: f"d{d}" for d in dims}
    stage = StageConfig(name="reduce", heads={names[d]: TERMS for d in dims})
    objective = Objective.from_stage(stage)  # Jasper's weights: sim 200, resim 20
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = nn.ModuleDict({names[d]: nn.Linear(train.shape[1], d) for d in dims})
    for d, (weight, bias) in (init or {}).items():
        with torch.no_grad():
            heads[names[d]].weight.copy_(weight)
            heads[names[d]].bias.copy_(bias)
    with _one_thread():
        return _train(heads, names, objective, train, dev, dims, steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The maps and batches are small: intra-op threads only wait on each other (on a busy 2-core
    CPU a step took 60x longer with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(heads: nn.ModuleDict, names: dict[int, str], objective: Objective, train: torch.Tensor,
           dev: torch.Tensor, dims: list[int], *, steps: int, batch_size: int, lr: float,
           seed: int) -> dict[int, Head]:
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(WARMUP * steps), steps)

    def dev_sims() -> dict[int, float | None]:
        return {d: dev_sim_loss(dev, heads[names[d]].weight, heads[names[d]].bias, batch_size) for d in dims}

    start = dev_sims()
    evals = {max(1, steps * (i + 1) // EVALS) for i in range(EVALS)}
    sampler = StepBatchSampler(len(train), batch_size, seed, 0, steps)
    bar = tqdm(sampler, total=steps, desc="self-distill", unit="step")
    for step, rows in enumerate(bar, 1):
        batch = train[rows]
        terms = objective({names[d]: heads[names[d]](batch) for d in dims}, batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
        if step in evals and len(dev) >= 2:
            logger.info("step %d/%d: dev sim loss %s", step, steps,
                        ", ".join(f"{d}-d {s:.3g}" for d, s in dev_sims().items()))
    bar.close()
    out = {}
    for d in dims:
        weight, bias = heads[names[d]].weight.detach().clone(), heads[names[d]].bias.detach().clone()
        out[d] = Head(weight, bias, start[d], dev_sim_loss(dev, weight, bias, batch_size))
    return out


def reduced_model(model, weight: torch.Tensor, bias: torch.Tensor):
    """A SentenceTransformer: `model`'s modules (then Normalize, unless they end with one), a
    Dense with (weight, bias) and no activation, and Normalize."""
    from sentence_transformers import SentenceTransformer, models

    modules = list(model)
    if not isinstance(modules[-1], models.Normalize):
        modules.append(models.Normalize())
    dense = models.Dense(weight.shape[1], weight.shape[0], bias=True, activation_function=nn.Identity(),
                         init_weight=weight.detach().cpu().clone(), init_bias=bias.detach().cpu().clone())
    return SentenceTransformer(modules=[*modules, dense, models.Normalize()], device="cpu",
                               prompts=dict(model.prompts), default_prompt_name=model.default_prompt_name,
                               similarity_fn_name="cosine")


def reduce_model(model: str, dims: list[int], corpus: list[str], out: str | Path, *, method: str = "self",
                 max_texts: int | None = None, dev_size: int = DEV_SIZE, steps: int = 1000,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0, init: str = "pca",
                 cache_dir: str | Path = "cache",
                 name: str | None = None, max_length: int | None = None, text_field: str = "text",
                 overwrite: bool = False) -> list[dict]:
    """Reduce `model` to each of `dims` with `method` (see the module docstring); returns one row
    per size: {dim, method, folder, dev_sim_start, dev_sim}. Every check that needs no model
    weights comes first."""
    check_method(method, init)
    dims = list(dict.fromkeys(dims))
    check_dims(dims)
    out, model = Path(out), str(model)
    folder = model_folder(model)
    cfg = TeacherConfig(name=name or default_name(model, folder), path=model, max_length=max_length)
    outs = {d: out_folder(out, cfg.name, method, d) for d in dims}
    check_outside_model(out, folder)
    for path in outs.values():
        check_out(path, overwrite)
    texts = read_corpus(corpus, text_field=text_field, max_texts=max_texts, seed=seed).train
    held = dev_size_for(len(texts), dev_size)
    n_train = len(texts) - held
    if n_train < batch_size:
        raise ReduceError(f"The corpus gives {n_train} training texts ({held} more held out for dev), "
                          f"fewer than --batch-size {batch_size}. Lower --batch-size or give more texts.")
    if (method == "pca" or init == "pca") and n_train < max(dims):
        fix = "Give more texts or smaller --dims" + (", or --init random" if method == "self" else "")
        raise ReduceError(f"PCA to {max(dims)} dims needs at least {max(dims)} training texts, the corpus "
                          f"gives {n_train}. {fix}.")
    st = teachers.load_teacher(replace(cfg, max_length=None), folder)  # exported as published
    dim = teachers.embedding_dim(st)
    check_dims(dims, dim, model)
    vectors = torch.from_numpy(np.asarray(cached_targets([cfg], texts, cache_dir)[0], dtype=np.float32))
    train, dev = vectors[:n_train], vectors[n_train:]
    logger.info("%s: %d-d vectors of %d training and %d dev texts; fitting %s maps to %s dims.",
                cfg.name, dim, n_train, held, method, ",".join(map(str, dims)))
    pca = fit_pca(train, dims) if method == "pca" or init == "pca" else None
    if method == "pca":
        heads = {d: Head(w, b, None, dev_sim_loss(dev, w, b, batch_size)) for d, (w, b) in pca.items()}
    else:
        heads = fit_self(train, dev, dims, steps=steps, batch_size=batch_size, lr=lr, seed=seed, init=pca)
    rows = []
    for d, head in heads.items():
        reduced = reduced_model(st, head.weight, head.bias)
        save_folder(outs[d], lambda tmp, reduced=reduced: reduced.save(str(tmp)))
        before = "" if head.dev_sim_start is None else f"{head.dev_sim_start:.4g} -> "
        after = "n/a (no dev texts)" if head.dev_sim is None else f"{before}{head.dev_sim:.4g}"
        logger.info("%s %d-d: dev sim loss %s; saved %s", method, d, after, outs[d])
        rows.append({"dim": d, "method": method, "folder": str(outs[d]), "dev_sim_start": head.dev_sim_start,
                     "dev_sim": head.dev_sim})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtd.reduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a sentence-transformers folder or hub id")
    parser.add_argument("--dims", required=True, help="output sizes, comma-separated, e.g. 256,128")
    parser.add_argument("--corpus", required=True, nargs="+", help=".txt (a text per line) or .jsonl files")
    parser.add_argument("--out", required=True, type=Path, help="folder for the DIR/NAME-METHOD-d models")
    parser.add_argument("--method", default="self", help="self (self-distillation, default) or pca")
    parser.add_argument("--max-texts", type=int, default=None, help="use only N texts (after shuffling)")
    parser.add_argument("--dev-size", type=int, default=DEV_SIZE,
                        help=f"texts held out for the dev loss (default {DEV_SIZE}, at most a tenth)")
    parser.add_argument("--steps", type=int, default=1000, help="self: optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=128, help="self: texts per step (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="self: peak learning rate (default 1e-3)")
    parser.add_argument("--init", default="pca",
                        help="self: start from the PCA map (pca, default) or a random one (random)")
    parser.add_argument("--seed", type=int, default=0, help="corpus shuffle, head init and batch order")
    parser.add_argument("--cache-dir", default="cache", help="target cache folder (default cache)")
    parser.add_argument("--name", default=None,
                        help="the model's name in cache and output folders (default: MODEL's last part)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per corpus text while encoding it (default: the model's own "
                             "max_seq_length, which the outputs keep)")
    parser.add_argument("--text-field", default="text", help="key of the text in .jsonl files")
    parser.add_argument("--overwrite", action="store_true", help="replace output models that exist")
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    """Ranges argparse does not check, each named with its flag."""
    for flag, value, low in (("--max-texts", args.max_texts, 1), ("--dev-size", args.dev_size, 0),
                             ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2),
                             ("--max-length", args.max_length, 1)):
        if value is not None and value < low:
            raise ReduceError(f"{flag} {value}: must be at least {low}.")
    if not args.lr > 0:
        raise ReduceError(f"--lr {args.lr}: must be above 0, e.g. --lr 1e-3.")


def run(args: argparse.Namespace) -> list[dict]:
    """The command's work for parsed arguments (bench/reduce_table.py calls it too)."""
    check_method(args.method, args.init)
    check_numbers(args)
    return reduce_model(args.model, parse_dims(args.dims), args.corpus, args.out, method=args.method,
                        max_texts=args.max_texts, dev_size=args.dev_size, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, init=args.init,
                        cache_dir=args.cache_dir,
                        name=args.name, max_length=args.max_length, text_field=args.text_field,
                        overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        run(args)

    return cli_main("mtd.reduce", body)


if __name__ == "__main__":
    sys.exit(main())
