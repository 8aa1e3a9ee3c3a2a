"""The evaluation suite behind eval.py: find data, score models, report with retention.

Data is recognized by layout, so any folder in these conventions works:
    BEIR retrieval   a folder holding corpus.jsonl, queries.jsonl and qrels/<split>.tsv
    STS              <split>.jsonl|csv|tsv with sentence1, sentence2, score
    image-text       <split>.jsonl with image and captions
Hub data sets in MTEB's STS and retrieval layouts are named explicitly, as (task, name) pairs
(see mtd.evaluation.hub); they are loaded once and scored next to the folders.
Each result is a row {model, task, dataset, metric, value, ...settings}; `main_metric` picks the
number shown per dataset in the table (Spearman for STS, nDCG@10 for retrieval, as MTEB).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mtd.errors import MtdError
from mtd.evaluation import sts
from mtd.evaluation.image_text import ImageLoadError, ImageTextFormatError
from mtd.evaluation.specs import Encoder, cached_encode, load_encoder

logger = logging.getLogger(__name__)

TASKS = ("sts", "retrieval", "image-text", "speed")
MAIN_METRIC = {"sts": "spearman", "retrieval": "ndcg@10", "image-text": "t2i_R@1",
               "speed": "sentences_per_s"}


HUB_TASKS = ("sts", "retrieval")
IMAGE_TEXT_FIELDS = ("image", "captions")


class NoDataError(MtdError, FileNotFoundError):
    """The data folder is missing or holds no data set eval.py can score."""


def _layouts(split: str) -> str:
    """The layouts discover() recognizes, for messages."""
    return (f"STS files ({split}.jsonl|csv|tsv with {', '.join(sts.FIELDS)}), BEIR folders "
            f"(corpus.jsonl, queries.jsonl, qrels/{split}.tsv) and image-caption files "
            f"({split}.jsonl with {', '.join(IMAGE_TEXT_FIELDS)})")


@dataclass(frozen=True)
class LoadedSet:
    """A data set loaded once for every model, and the setting its rows record (e.g. hub=NAME)."""

    data: Any  # sts.StsSet or retrieval.BeirSet
    source: dict[str, str]


@dataclass
class Datasets:
    sts: list[Path | LoadedSet] = field(default_factory=list)
    retrieval: list[Path | LoadedSet] = field(default_factory=list)
    image_text: list[Path] = field(default_factory=list)
    unrecognized: list[Path] = field(default_factory=list)  # split-named files of no known layout


def _columns(path: Path) -> list[str]:
    """The first record's keys (jsonl) or the header's columns (csv, tsv), read as load_sts does."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        line = f.readline()
    if path.suffix == ".jsonl":
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return []
        return list(record) if isinstance(record, dict) else []
    if path.suffix == ".tsv":
        return [c.strip() for c in line.rstrip("\r\n").split("\t")]
    return [c.strip() for c in next(csv.reader([line]), [])]


# (columns of a layout, the ones that make a file look like it, its error, what it is called)
_LAYOUTS = ((sts.FIELDS, {"sentence1", "sentence2"}, sts.StsFormatError, "STS set"),
            (IMAGE_TEXT_FIELDS, {"captions"}, ImageTextFormatError, "image-caption set"))


def _partial_layout(path: Path, columns: list[str]) -> MtdError | None:
    """The error for a file that looks like an STS or image-caption set but lacks a column:
    skipping it would silently drop a set the user meant to score."""
    for fields, telling, error, what in _LAYOUTS:
        if telling & set(columns):
            missing = [f for f in fields if f not in columns]
            return error(path, f"looks like an {what} but has no column(s) {', '.join(map(repr, missing))}; "
                               f"found {columns}, expected {', '.join(fields)}. Rename the "
                               f"column(s), or move the file out of the data folder if it is not one.")
    return None


def discover(root: str | Path, split: str = "test") -> Datasets:
    """Every data set under `root` (or `root` itself), recognized by its layout."""
    root = Path(root)
    if not root.exists():
        raise NoDataError(f"Data folder {root} does not exist; pass --data DIR.")
    found = Datasets()
    corpora = root.rglob("corpus.jsonl")
    beir_dirs = sorted({p.parent for p in corpora if (p.parent / "queries.jsonl").is_file()})
    found.retrieval = beir_dirs
    for path in sorted(root.rglob(f"{split}.*")):
        if path.suffix not in sts.SUFFIXES or any(d in path.parents for d in beir_dirs):
            continue
        columns = _columns(path)
        if set(sts.FIELDS) <= set(columns):
            found.sts.append(path)
        elif set(IMAGE_TEXT_FIELDS) <= set(columns):
            found.image_text.append(path)
        elif (error := _partial_layout(path, columns)) is not None:
            raise error
        else:
            found.unrecognized.append(path)
            logger.warning("Skipping %s: neither STS (sentence1, sentence2, score) nor image-text "
                           "(image, captions) columns.", path)
    return found


def load_hub(hub: Sequence[tuple[str, str]], split: str) -> Datasets:
    """Each (task, name) of `hub` loaded once (task "sts" or "retrieval"); rows record hub=name."""
    from mtd.evaluation import hub as hub_sets

    found = Datasets()
    for task, name in hub:
        if task == "sts":
            found.sts.append(LoadedSet(hub_sets.load_hub_sts(name, split), {"hub": name}))
        elif task == "retrieval":
            found.retrieval.append(LoadedSet(hub_sets.load_hub_beir(name, split), {"hub": name}))
        else:
            raise ValueError(f"unknown hub task {task!r} for {name!r}; use one of {HUB_TASKS}")
    return found


def _row(model: str, task: str, dataset: str, metrics: dict[str, Any], **settings) -> dict:
    return {"model": model, "task": task, "dataset": dataset, **metrics, **settings}


def _each(sets: Sequence[Path | LoadedSet], load: Callable[[Path], Any],
          key: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """(data, settings) per set: a LoadedSet as it is, a path read with `load` and recorded as key=path."""
    for item in sets:
        if isinstance(item, LoadedSet):
            yield item.data, item.source
        else:
            yield load(item), {key: str(item)}


def run_sts(label: str, model: Encoder, sets: Sequence[Path | LoadedSet], batch_size: int,
            cache_dir: Path | None) -> list[dict]:
    """`sets`: STS files (read here, rows record file=PATH) or loaded sets (e.g. from the hub)."""
    rows = []
    for data, source in _each(sets, sts.load_sts, "file"):
        encode = partial(cached_encode, model, role="document", cache_dir=cache_dir, batch_size=batch_size)
        rows.append(_row(label, "sts", data.name, sts.evaluate_sts(encode, data, batch_size=None),
                         **source))
    return rows


def run_retrieval(label: str, model: Encoder, sets: Sequence[Path | LoadedSet], *, split: str,
                  batch_size: int, index: str, cache_dir: Path | None) -> list[dict]:
    """`sets`: BEIR folders (read here, rows record folder=PATH) or loaded sets (e.g. from the hub)."""
    from mtd.evaluation import retrieval

    rows = []
    for data, source in _each(sets, partial(retrieval.load_beir, split=split), "folder"):
        t0 = time.perf_counter()
        metrics = retrieval.evaluate_retrieval(
            partial(cached_encode, model, role="query", cache_dir=cache_dir, batch_size=batch_size),
            partial(cached_encode, model, role="document", cache_dir=cache_dir, batch_size=batch_size),
            data, index=index)
        rows.append(_row(label, "retrieval", data.name, metrics, **source,
                         seconds=time.perf_counter() - t0))
    return rows


def run_image_text(label: str, model: Encoder, paths: Sequence[Path]) -> list[dict]:
    """Image-text retrieval needs an image encoder; text-only models are skipped, not scored 0."""
    if not hasattr(model, "encode_images"):
        if paths:
            logger.info("%s: no image encoder, skipping image-text (%d sets).", label, len(paths))
        return []
    from mtd.evaluation import image_text

    rows = []
    for path in paths:
        data = image_text.load_image_text(path)
        try:
            images, ok, problems = image_text.load_images(data.image_paths)
        except ImageLoadError as e:  # the images' own paths do not say which set they belong to
            raise ImageTextFormatError(path, str(e)) from None
        data = image_text.drop_images(data, ok)
        metrics = image_text.image_text_recall(model.encode_images(images), model.encode(data.captions),
                                               data.caption_image)
        rows.append(_row(label, "image-text", data.name, metrics, skipped_images=len(problems)))
    return rows


def retention_table(rows: list[dict], reference: str | None) -> str:
    """Markdown: one row per model, the main metric per dataset, retention vs `reference`.

    Retention is the mean over quality columns of 100 * model / reference; speed is shown as
    sentences/s and as a multiple of the reference's.
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = list(dict.fromkeys((r["task"], r["dataset"]) for r in rows))
    value = {(r["model"], r["task"], r["dataset"]): r[MAIN_METRIC[r["task"]]] for r in rows
             if MAIN_METRIC[r["task"]] in r}
    names = [f"{d} {MAIN_METRIC[t]}" if t != "speed" else "sentences/s" for t, d in cols]
    header = ["model", *names] + (["retention %", "speed x"] if reference else [])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m in models:
        cells = [f"{value[(m, t, d)]:.2f}" if (m, t, d) in value else "" for t, d in cols]
        if reference:
            cells += _retention_cells(value, m, reference, cols)
        lines.append("| " + " | ".join([m, *cells]) + " |")
    return "\n".join(lines)


def _retention_cells(value: dict, model: str, reference: str, cols: list[tuple[str, str]]) -> list[str]:
    both = [(t, d) for t, d in cols if (model, t, d) in value and value.get((reference, t, d))]
    ratios = [100 * value[(model, t, d)] / value[(reference, t, d)] for t, d in both if t != "speed"]
    speed = [(t, d) for t, d in both if t == "speed"]
    retention = f"{sum(ratios) / len(ratios):.1f}" if ratios else ""
    speedup = f"{value[(model, *speed[0])] / value[(reference, *speed[0])]:.2f}" if speed else ""
    return [retention, speedup]


def _speed_encoder(load: Callable[[], Encoder]):
    """Runs in the speed child process: build the model there and return encode(texts, bs)."""
    model = load()
    return lambda texts, batch_size: model.encode(texts, "document", batch_size)


def speed_rows(loaders: dict[str, Callable[[], Encoder]], n_texts: int, batch_size: int,
               threads: int | None = None, latency_samples: int = 64) -> list[dict]:
    """Speed of each model in its own fresh process (clean peak memory), one after another.

    `loaders`: label -> picklable function that builds the model (an Encoder) in that process, so
    models outside the spec grammar (e.g. bench/peers.py's) are timed exactly like eval.py's;
    `threads`: torch threads in the child (None: torch's default); `latency_samples`: batch-1 calls.
    """
    from mtd.evaluation import speed

    texts = speed.default_speed_texts(n_texts)
    rows = []
    for label, load in loaders.items():
        report = speed.speed_report(partial(_speed_encoder, load), texts, batch_size=batch_size,
                                    latency_samples=latency_samples, threads=threads)
        rows.append(_row(label, "speed", f"wordnet-{len(texts)}", report, batch_size=batch_size))
    return rows


def run_speed(specs: tuple[str, ...], labels: list[str], n_texts: int, batch_size: int) -> list[dict]:
    """Speed of the models `labels` among eval.py's `specs`, each rebuilt from the specs."""
    return speed_rows({label: partial(load_encoder, specs, label) for label in labels}, n_texts, batch_size)


def evaluate_all(models: dict[str, Encoder], *, data: Path | None, tasks: Sequence[str], split: str,
                 batch_size: int, index: str, cache_dir: Path | None,
                 speed: tuple[tuple[str, ...], list[str], int] | None,
                 hub: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """Every task for every model; `speed` = (model specs, labels to time, number of texts).

    `data`: the folder searched by layout (None: none); `hub`: (task, name) pairs of hub data sets
    (task "sts" or "retrieval"), each loaded once and scored after the folder's sets of its task.
    Every data set is read and checked before the first model is scored, so bad data fails in
    seconds, not after hours of scoring.
    """
    found = discover(data, split) if data is not None and set(tasks) - {"speed"} else Datasets()
    skipped = [f"{t}:{n}" for t, n in hub if t not in tasks]
    if skipped:
        logger.warning("Skipping hub set(s) %s: their task is not in %s", skipped, list(tasks))
    if data is not None:
        _require_data(found, data, tasks, split, hub)
    found = _load_all(found, tasks, split, images=any(hasattr(m, "encode_images") for m in models.values()))
    from_hub = load_hub([(t, n) for t, n in hub if t in tasks], split)
    found.sts += from_hub.sts
    found.retrieval += from_hub.retrieval
    logger.info("Data: %d STS, %d retrieval, %d image-text sets (%d from the hub, the rest under %s)",
                len(found.sts), len(found.retrieval), len(found.image_text),
                len(from_hub.sts) + len(from_hub.retrieval), data)
    rows: list[dict] = []
    for label, model in models.items():
        if "sts" in tasks:
            rows += run_sts(label, model, found.sts, batch_size, cache_dir)
        if "retrieval" in tasks:
            rows += run_retrieval(label, model, found.retrieval, split=split, batch_size=batch_size,
                                  index=index, cache_dir=cache_dir)
        if "image-text" in tasks:
            rows += run_image_text(label, model, found.image_text)
    if "speed" in tasks and speed is not None:
        specs, labels, n_texts = speed
        rows += run_speed(specs, labels, n_texts, batch_size)
    return rows


def _require_data(found: Datasets, data: Path, tasks: Sequence[str], split: str,
                  hub: Sequence[tuple[str, str]]) -> None:
    """A searched folder with no set for the asked tasks is a wrong --data, not an empty result."""
    wanted = [t for t in tasks if t != "speed"]
    counts = {"sts": len(found.sts), "retrieval": len(found.retrieval), "image-text": len(found.image_text)}
    if not wanted or any(counts[t] for t in wanted) or any(t in wanted for t, _ in hub):
        return
    seen = (f" Files named {split}.* that fit no layout: {', '.join(map(str, found.unrecognized[:5]))}."
            if found.unrecognized else "")
    raise NoDataError(f"No data set for --tasks {','.join(wanted)} under {data}: eval.py looks for "
                      f"{_layouts(split)}.{seen} Point --data at the folder that holds them (or check "
                      f"--split), or add --hub TASK:NAME.")


def _load_all(found: Datasets, tasks: Sequence[str], split: str, images: bool) -> Datasets:
    """The folder's STS and retrieval sets read once (checked, and not re-read per model); each
    image-caption file checked when a model can score it (its images stay on disk till then)."""
    from mtd.evaluation import image_text, retrieval

    loaded = Datasets()
    if "sts" in tasks:
        loaded.sts = [LoadedSet(sts.load_sts(p), {"file": str(p)}) for p in found.sts]
    if "retrieval" in tasks:
        loaded.retrieval = [LoadedSet(retrieval.load_beir(p, split), {"folder": str(p)})
                            for p in found.retrieval]
    if "image-text" in tasks and images:
        for path in found.image_text:
            image_text.require_images(image_text.load_image_text(path), path)
    loaded.image_text = found.image_text  # with no image model, run_image_text logs the skip
    return loaded
