"""Studying a finished run beside its teachers and peers (notebooks/analysis.ipynb).

* the run's log.jsonl as a tidy table (one row per logged number: stage, step, split, head, term),
  with the steps of every stage laid end to end on one axis (`stage_segments`);
* quality against speed of the run's students and of bench/peers.py's peers, read from the JSON
  that script writes, or measured here for the run's own heads and teachers when it has not run;
* the multi-teacher target's similarity against the student's on held-out sentence pairs.

Plots are drawn with matplotlib's pyplot (a notebook shows them inline); each function returns its
figure. matplotlib and pandas are needed only here.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mtd.config import RunConfig, TeacherConfig
from mtd.data.corpus import chunk_part, corpus_of, multi_teacher_target
from mtd.errors import MtdError
from mtd.evaluation import sts, suite
from mtd.evaluation.specs import StudentHeadEncoder, TeacherEncoder, cached_encode
from mtd.io import DataFormatError, atomic_write_json, jsonl_objects, read_json
from mtd.models.student import STUDENT_FILE

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"  # what mtd.training.trainer writes into the run folder
LOG_KEYS = ("stage", "stage_name", "step")  # every row has them; the rest are logged numbers
COLUMNS = ("stage", "stage_name", "step", "global_step", "split", "measure", "head", "term", "value")
STSB_TEST = "stsb/test"  # the STS set of the quality axis (its name as sts.load_sts gives it)
OWN_REPORT = "quality_speed.json"  # the run's own scores, written into the run folder
DEV_PAIRS = 1000  # held-out text pairs when no STS pairs are given
PAIR_COLUMNS = ("first", "second", "target", "gold")  # pair_similarities' columns besides the heads


class AnalysisError(MtdError, ValueError):
    """A run folder or result file that the analysis cannot read."""


class LogFormatError(DataFormatError):
    """A damaged row in a run's log.jsonl."""

    def __init__(self, path, problem: str, line: int | None = None):
        super().__init__(path, f"{problem}. Repair or delete that line to study the run", line)


# ---------------------------------------------------------------------------------------------
# The training log


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN/log.jsonl. A torn last row (a run still writing it, or killed while it did)
    is skipped with a warning; a damaged earlier row is an error naming its line."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise AnalysisError(f"{path} not found: {run_dir} is not a run with a training log. Train one "
                            "(python train.py configs/default.yaml) or point RUN at a runs/NAME folder.")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                                .splitlines(), 1) if line.strip()]
    rows = [row for _, row in jsonl_objects(path, lines[:-1], LogFormatError, LOG_KEYS)]
    try:
        rows += [row for _, row in jsonl_objects(path, lines[-1:], LogFormatError, LOG_KEYS)]
    except LogFormatError as e:
        logger.warning("%s, line %d: skipped an incomplete last row.", path, e.line)
    if not rows:
        raise AnalysisError(f"{path} holds no rows yet: wait for the run's first logging step "
                            "(train.log_every) or point RUN at another run.")
    return rows


@dataclass(frozen=True)
class Segment:
    """One stage on the run's step axis: its optimizer steps are start+1 .. end."""

    index: int
    name: str
    start: int
    end: int


def stage_segments(rows: Sequence[dict[str, Any]]) -> list[Segment]:
    """Every logged stage, in order, laid end to end: a stage's steps restart at 1 in the log,
    so stage k begins where the stages before it ended (at their last logged step)."""
    last: dict[int, tuple[str, int]] = {}
    for r in rows:
        name, step = last.get(r["stage"], (r["stage_name"], 0))
        last[r["stage"]] = (name, max(step, r["step"]))
    segments, start = [], 0
    for index in sorted(last):
        name, steps = last[index]
        segments.append(Segment(index, name, start, start + steps))
        start += steps
    return segments


def _split_key(key: str) -> tuple[str, str, str, str]:
    """"dev/share/fc1/cos" -> (split, measure, head, term): ("dev", "share", "fc1", "cos");
    "fc1/sim" -> ("train", "loss", "fc1", "sim"); "loss" -> ("train", "loss", "", "total")."""
    split, name = ("dev", key.removeprefix("dev/")) if key.startswith("dev/") else ("train", key)
    measure = "share" if name.startswith("share/") else "loss"
    head, _, term = name.removeprefix("share/").rpartition("/")
    if not head and term != "loss":
        measure = term  # a number of its own, e.g. the learning rate "lr"
    return split, measure, head, "total" if (not head and term == "loss") else term


def log_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per logged number (COLUMNS): `split` is train or dev, `measure` loss (a head's term
    or the weighted total, head "" and term "total"), share (a term's share of the gradient at the
    student's vectors, dev only) or lr; `global_step` counts the steps of all stages in order."""
    offset = {s.index: s.start for s in stage_segments(rows)}
    records = []
    for r in rows:
        for key, value in r.items():
            if key in LOG_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            split, measure, head, term = _split_key(key)
            records.append((r["stage"], r["stage_name"], r["step"], offset[r["stage"]] + r["step"],
                            split, measure, head, term, float(value)))
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


def mark_stages(ax, segments: Sequence[Segment]) -> None:
    """Dashed lines between stages and each stage's name at the top of its span; the x axis
    spans every stage, so panels of heads trained in some stages only line up with the others."""
    for s in segments:
        if s.start:
            ax.axvline(s.start, color="0.5", linestyle="--", linewidth=0.8)
        ax.text((s.start + s.end) / 2, 1.0, s.name, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=7, color="0.3")
    if segments:
        ax.set_xlim(0, segments[-1].end)


def _panels(n: int, size: tuple[float, float]):
    """A figure of n panels, at most 3 a row; `size` is one panel's."""
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_loss_curves(table: pd.DataFrame, segments: Sequence[Segment]):
    """One panel per loss term of every head, plus the weighted total: each stage in its own colour
    (training rows as lines, dev evaluations as dots), stage boundaries dashed; log y."""
    losses = table[table.measure == "loss"]
    keys = sorted({(h, t) for h, t in zip(losses["head"], losses.term, strict=True)},
                  key=lambda k: (k[0] == "", k))  # heads' terms first, the total last
    if not keys:
        raise AnalysisError("The log holds no loss rows: is it a run's log.jsonl?")
    fig, axes = _panels(len(keys), (3.6, 2.8))
    for ax, (head, term) in zip(axes, keys, strict=True):
        one = losses[(losses["head"] == head) & (losses.term == term)]
        for i, s in enumerate(segments):
            part = one[one.stage == s.index]
            train, dev = part[part.split == "train"], part[part.split == "dev"]
            ax.plot(train.global_step, train.value, color=f"C{i}", linewidth=1, label=s.name)
            ax.plot(dev.global_step, dev.value, "o", color=f"C{i}", markersize=3,
                    label="dev" if i == 0 else None)
        if (one.value > 0).all():
            ax.set_yscale("log")
        mark_stages(ax, segments)
        ax.set_title(f"{head}/{term}" if head else "weighted total", pad=12)
        ax.set_xlabel("step (all stages)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gradient_shares(table: pd.DataFrame, segments: Sequence[Segment]):
    """Each head's terms' shares of the gradient at its vectors over the dev evaluations
    (`dev/share/HEAD/TERM`); None when the run logged none (runs from before they were logged)."""
    shares = table[table.measure == "share"]
    if shares.empty:
        return None
    heads = list(dict.fromkeys(shares["head"]))
    fig, axes = _panels(len(heads), (4.2, 2.8))
    for ax, head in zip(axes, heads, strict=True):
        one = shares[shares["head"] == head]
        for term in dict.fromkeys(one.term):
            points = one[one.term == term]
            ax.plot(points.global_step, points.value, "o-", markersize=3, label=term)
        ax.set_ylim(0, 1)
        mark_stages(ax, segments)
        ax.set_title(f"{head}: share of the gradient", pad=12)
        ax.set_xlabel("step (all stages)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Quality against speed


@dataclass(frozen=True)
class Point:
    model: str
    group: str  # mtd | teacher | peer
    quality: float  # STS-B test Spearman x100
    speed: float  # sentences/s


def read_report(path: str | Path) -> dict[str, Any]:
    """A results JSON of bench/peers.py (or `own_quality_speed`): {"results": [suite rows], ...}."""
    path = Path(path)
    try:
        report = read_json(path)
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{path}: not a readable JSON file ({e}). Write it again with "
                            "python bench/peers.py --student runs/NAME.") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise AnalysisError(f"{path}: no 'results' list, so not a bench/peers.py results file. Write "
                            "it again with python bench/peers.py --student runs/NAME.")
    return report


def model_group(label: str, about: dict[str, str]) -> str:
    """mtd students are labelled mtd/RUN:HEAD (bench/peers.py's names), teachers described as such."""
    if label.startswith("mtd/"):
        return "mtd"
    return "teacher" if about.get(label, "").startswith("teacher") else "peer"


def quality_speed_points(report: dict[str, Any], dataset: str = STSB_TEST) -> list[Point]:
    """Every model of `report` with both a Spearman on `dataset` and a sentences/s figure."""
    rows = report["results"]
    quality = {r["model"]: r["spearman"] for r in rows
               if r.get("task") == "sts" and r.get("dataset") == dataset}
    speed = {r["model"]: r["sentences_per_s"] for r in rows if r.get("task") == "speed"}
    about = report.get("models", {})
    return [Point(m, model_group(m, about), q, speed[m]) for m, q in quality.items() if m in speed]


GROUP_STYLE = {"mtd": ("C3", "*", 140), "teacher": ("C0", "s", 50), "peer": ("C2", "o", 50)}


def plot_quality_speed(points: Sequence[Point], title: str = ""):
    """STS-B Spearman against sentences/s (log x), one marker per group, each point labelled."""
    import matplotlib.pyplot as plt

    if not points:
        raise AnalysisError("No model has both an STS-B test score and a speed: nothing to plot.")
    fig, ax = plt.subplots(figsize=(7, 4))
    for group, (color, marker, size) in GROUP_STYLE.items():
        mine = [p for p in points if p.group == group]
        if mine:
            ax.scatter([p.speed for p in mine], [p.quality for p in mine], c=color, marker=marker,
                       s=size, label=group)
    for p in points:
        ax.annotate(p.model, (p.speed, p.quality), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("sentences/s (batch 64, log scale)")
    ax.set_ylabel("STS-B test Spearman x100")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_model_loaders(run_dir: str | Path, teachers: Sequence[TeacherConfig]) -> dict[str, Callable]:
    """label -> picklable function building the model: every head of the run (labelled
    mtd/RUN:HEAD, as bench/peers.py does), then every teacher as the target cache runs it."""
    run_dir = Path(run_dir)
    student = run_dir / "student"
    if not (student / STUDENT_FILE).is_file():
        raise AnalysisError(f"{student / STUDENT_FILE} not found: the run has not finished its text "
                            "stages. Let it finish (train.py CONFIG --resume) or study another run.")
    loaders: dict[str, Callable] = {}
    for head in read_json(student / STUDENT_FILE)["heads"]:
        label = f"mtd/{run_dir.name}:{head}"
        loaders[label] = partial(StudentHeadEncoder, label, student, head)
    for t in teachers:
        loaders[t.name] = partial(TeacherEncoder, t.name, t)
    return loaders


def own_quality_speed(run_dir: str | Path, cfg: RunConfig, sts_file: str | Path, *,
                      cache_dir: str | Path | None, speed_texts: int = 64, threads: int = 2) -> dict:
    """The run's heads and teachers scored as bench/peers.py scores its table (STS through the
    evaluation suite; sentences/s at batch 64 on the fixed WordNet texts, each model in a fresh
    process with `threads` torch threads), on fewer speed texts; written to RUN/quality_speed.json.
    64 texts are one batch per timed pass (passes repeat for a second at least), which also keeps
    the encoders' own progress bars, shown from two batches on, out of a notebook."""
    loaders = run_model_loaders(run_dir, cfg.teachers)
    rows = []
    for label, load in loaders.items():
        rows += suite.run_sts(label, load(), [Path(sts_file)], 64, Path(cache_dir) if cache_dir else None)
    with _quiet_children():
        rows += suite.speed_rows(loaders, speed_texts, 64, threads=threads, latency_samples=8)
    about = {t.name: f"teacher {t.path}" for t in cfg.teachers}
    about |= {label: f"mtd run {run_dir}" for label in loaders if label not in about}
    report = {"date": str(datetime.date.today()), "source": "mtd.evaluation.analysis.own_quality_speed",
              "speed_texts": speed_texts, "threads": threads, "models": about, "results": rows}
    atomic_write_json(Path(run_dir) / OWN_REPORT, report)
    return report


@contextmanager
def _quiet_children() -> Iterator[None]:
    """No progress bars in the processes started meanwhile: Jupyter forwards a child's stderr to
    the notebook line by line, dozens of outputs per model. tqdm reads TQDM_DISABLE when a child
    imports it."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = old


def quality_speed_report(run_dir: str | Path, cfg: RunConfig, peers: str | Path,
                         sts_file: str | Path) -> tuple[dict | None, str]:
    """(report, what it is): bench/peers.py's JSON when `peers` exists; otherwise the run's own
    heads and teachers when `sts_file` (STS-B test) exists; otherwise (None, why not)."""
    if Path(peers).is_file():
        return read_report(peers), f"peers and students from {peers}"
    how = (f"{peers} is missing; to make it: python train.py configs/default.yaml, then python "
           f"bench/peers.py --student {run_dir} (needs pip install model2vec==0.10.0; --smoke: minutes).")
    if not Path(sts_file).is_file():
        return None, f"{how} No STS-B test file at {sts_file} either, so the run cannot be scored here."
    report = own_quality_speed(run_dir, cfg, sts_file, cache_dir=cfg.cache_dir)
    return report, (f"{how} Plotted instead: the run's own heads and teachers, scored here "
                    f"({Path(run_dir) / OWN_REPORT}; speed on {report['speed_texts']} texts).")


# ---------------------------------------------------------------------------------------------
# Target and student similarity on held-out pairs


@dataclass(frozen=True)
class Pairs:
    name: str
    first: list[str]
    second: list[str]
    scores: np.ndarray | None = None  # gold similarity, where known


def dev_text_pairs(cfg: RunConfig, limit: int = DEV_PAIRS) -> Pairs:
    """The run's held-out dev texts (as the run split them off) paired in order: 1-2, 3-4, ..."""
    d = cfg.data  # only the dev texts are cut into chunks, as the run cut them
    dev = chunk_part(corpus_of(replace(d, chunk_share=0.0)).dev, "dev", d.chunk_share, d.chunk_sentences,
                     d.seed)
    n = min(len(dev) // 2, limit)
    if n < 2:
        raise AnalysisError(f"The run holds out {len(dev)} dev texts (data.dev_size), too few to pair. "
                            "Give an STS file of sentence pairs instead.")
    return Pairs(f"{cfg.name} dev texts, paired", dev[0 : 2 * n : 2], dev[1 : 2 * n : 2])


def held_out_pairs(cfg: RunConfig, sts_file: str | Path | None) -> Pairs:
    """The pairs of `sts_file` (e.g. STS-B dev) when it exists, else the run's dev texts paired."""
    if sts_file is not None and Path(sts_file).is_file():
        data = sts.load_sts(sts_file)
        return Pairs(data.name, data.sentences1, data.sentences2, data.scores)
    logger.info("No STS file at %s: pairing the run's dev texts instead.", sts_file)
    return dev_text_pairs(cfg)


def pair_cosines(vectors_of: Callable[[list[str]], np.ndarray], pairs: Pairs) -> np.ndarray:
    """Cosine of each pair; every distinct text is encoded once (`vectors_of(texts) -> (N, D)`)."""
    unique = list(dict.fromkeys([*pairs.first, *pairs.second]))
    vecs = np.asarray(vectors_of(unique), dtype=np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    row = {text: i for i, text in enumerate(unique)}
    a, b = vecs[[row[t] for t in pairs.first]], vecs[[row[t] for t in pairs.second]]
    return np.einsum("ij,ij->i", a, b)


def target_vectors(teachers: Sequence[TeacherConfig], texts: list[str],
                   cache_dir: str | Path | None) -> np.ndarray:
    """The multi-teacher target of `texts`, as the student was trained on it: each teacher's
    vector normalized, weighted, concatenated, normalized again."""
    parts = [cached_encode(TeacherEncoder(f"teacher {t.name}", t), texts, "document", cache_dir)
             for t in teachers]
    return multi_teacher_target(parts, [t.weight for t in teachers]).numpy()


def pair_similarities(run_dir: str | Path, cfg: RunConfig, pairs: Pairs,
                      cache_dir: str | Path | None) -> pd.DataFrame:
    """One row per pair: its texts, the target's cosine, each head's cosine, and the gold score."""
    table = pd.DataFrame({"first": pairs.first, "second": pairs.second})
    table["target"] = pair_cosines(partial(target_vectors, cfg.teachers, cache_dir=cache_dir), pairs)
    for label, load in run_model_loaders(run_dir, []).items():
        vectors_of = partial(cached_encode, load(), role="document", cache_dir=cache_dir)
        table[label.rpartition(":")[2]] = pair_cosines(vectors_of, pairs)
    if pairs.scores is not None:
        table["gold"] = pairs.scores
    return table


def agreement(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman x100 between two similarity columns."""
    return float(stats.spearmanr(a, b).statistic) * 100


def plot_pair_scatter(table: pd.DataFrame, title: str = ""):
    """Target cosine (x) against each head's cosine (y) per pair, with their Spearman."""
    import matplotlib.pyplot as plt

    heads = [c for c in table.columns if c not in PAIR_COLUMNS]
    fig, axes = plt.subplots(1, len(heads), figsize=(4 * len(heads), 3.8), squeeze=False)
    for ax, head in zip(axes[0], heads, strict=True):
        ax.scatter(table.target, table[head], s=4, alpha=0.4)
        low = min(table.target.min(), table[head].min())
        ax.plot([low, 1], [low, 1], color="0.5", linewidth=0.8, linestyle="--")  # y = x
        ax.set_title(f"{head}: Spearman {agreement(table.target, table[head]):.1f}", fontsize=9)
        ax.set_xlabel("teachers' target cosine")
        ax.set_ylabel(f"student {head} cosine")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
