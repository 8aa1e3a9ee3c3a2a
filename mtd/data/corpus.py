"""Corpus reading and the training dataset (texts paired with cached multi-teacher targets)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mtd.config import DataConfig
from mtd.data.tokens import TokenizedTexts
from mtd.errors import MtdError

logger = logging.getLogger(__name__)

SPLIT_PROGRESS_FROM = 10_000  # texts from which sentence splitting shows a progress bar


class CorpusError(MtdError, ValueError):
    """A corpus file that cannot be read as one text per line / per JSON record."""


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    dev: list[str]

    @property
    def texts(self) -> list[str]:
        """All texts in cache order: the target cache holds train rows, then dev rows."""
        return self.train + self.dev


def _read_lines(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}). "
                    f"Convert the file, e.g. `iconv -f latin1 -t utf-8 {path.name}`, "
                    "or remove the line."
                ) from None
            if path.suffix == ".jsonl" and line.strip():
                try:
                    line = json.loads(line)[text_field]
                    if not isinstance(line, str):
                        raise TypeError
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(
                        f"{path}:{lineno}: expected a JSON object with a '{text_field}' string "
                        "(set data.text_field to the key your file uses)."
                    ) from None
            texts.append(line.strip())
    return texts


def split_sentences(texts: Sequence[str]) -> list[list[str]]:
    """Each text's sentences (pysbd's English rules), stripped, blank ones left out. A text whose
    sentences do not hold all its characters (pysbd drops some around a few symbols, e.g. "B♭")
    is one sentence: it is never cut."""
    import pysbd  # only runs that cut texts into chunks need it

    segmenter = pysbd.Segmenter(language="en", clean=False)
    out, lossy = [], 0
    for text in tqdm(texts, desc="split sentences", unit="texts",
                     disable=len(texts) <= SPLIT_PROGRESS_FROM):
        parts = [s for s in map(str.strip, segmenter.segment(text)) if s]
        if "".join("".join(parts).split()) != "".join(text.split()):
            parts, lossy = [text], lossy + 1
        out.append(parts)
    if lossy:
        logger.info("%d texts stay whole: their sentences, as pysbd splits them, miss characters.", lossy)
    return out


def chunk_texts(texts: Sequence[str], share: float, sentences: Sequence[int] = (1, 10),
                seed: int = 0) -> list[str]:
    """`texts` with `share` of those of 2+ sentences replaced, in place, by their chunks of
    consecutive sentences (joined with a space), each chunk's size drawn uniformly from
    [min, max] = `sentences` (the last takes what is left). Which texts and where they are cut
    depend only on (texts, share, sentences, seed)."""
    if len(sentences) != 2 or not 1 <= sentences[0] <= sentences[1]:
        raise CorpusError(f"Chunk sizes {list(sentences)}: give [min, max] sentences per chunk with "
                          "1 <= min <= max (data.chunk_sentences), e.g. [1, 10].")
    if not 0 <= share <= 1:
        raise CorpusError(f"Chunk share {share}: give a share in [0, 1] (data.chunk_share), e.g. 0.3.")
    if share == 0:
        return list(texts)
    split = split_sentences(texts)
    several = [i for i, parts in enumerate(split) if len(parts) >= 2]
    rng = random.Random(f"chunks {seed}")
    picked = set(rng.sample(several, round(share * len(several))))
    low, high = sentences
    out: list[str] = []
    for i, text in enumerate(texts):
        if i not in picked:
            out.append(text)
            continue
        parts, start = split[i], 0
        while start < len(parts):
            size = rng.randint(low, high)
            out.append(" ".join(parts[start:start + size]))
            start += size
    logger.info("Cut %d of the %d texts of 2+ sentences (data.chunk_share=%g) into %d chunks of "
                "%d-%d sentences: %d texts in all.", len(picked), len(several), share,
                len(out) - len(texts) + len(picked), low, high, len(out))
    return out


def read_corpus(
    paths: Sequence[str | Path],
    *,
    text_field: str = "text",
    max_texts: int | None = None,
    dev_size: int = 0,
    max_chars: int = 20_000,
    shuffle: bool = True,
    seed: int = 0,
    chunk_share: float = 0.0,
    chunk_sentences: Sequence[int] = (1, 10),
) -> Corpus:
    """Read texts, drop blank ones, cut huge ones, shuffle once, keep `max_texts`, split off
    `dev_size` dev texts, then cut `chunk_share` of each side's texts of several sentences into
    chunks (chunk_texts): `max_texts` and `dev_size` count texts as read, before chunking."""
    texts: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CorpusError(f"Corpus file {p} not found (data.corpus). Check the path.")
        if p.suffix not in (".txt", ".jsonl"):
            raise CorpusError(f"Corpus file {p}: use .txt (one text per line) or .jsonl.")
        texts.extend(_read_lines(p, text_field))
    blank = sum(1 for t in texts if not t)
    texts = [t for t in texts if t]
    if blank:
        logger.warning("Skipped %d blank lines in the corpus.", blank)
    long = sum(1 for t in texts if len(t) > max_chars)
    if long:
        logger.warning("Cut %d texts longer than %d characters (data.max_chars).", long, max_chars)
        texts = [t[:max_chars] for t in texts]
    if shuffle:
        random.Random(seed).shuffle(texts)
    if max_texts is not None:
        texts = texts[:max_texts]
    if not texts:
        raise CorpusError(f"The corpus {[str(p) for p in paths]} holds no text (every line is blank). "
                          "Give files with one text per line (.txt) or per JSON record (.jsonl).")
    if len(texts) <= dev_size:
        raise CorpusError(
            f"The corpus {[str(p) for p in paths]} has {len(texts)} usable texts, not enough for "
            f"data.dev_size={dev_size} plus training. Add texts or lower dev_size."
        )
    cut = len(texts) - dev_size
    # Chunks after the split: the pieces of one document stay on its side of it, and only the
    # texts a run keeps are split into sentences.
    return Corpus(train=chunk_part(texts[:cut], "train", chunk_share, chunk_sentences, seed),
                  dev=chunk_part(texts[cut:], "dev", chunk_share, chunk_sentences, seed))


def chunk_part(texts: Sequence[str], part: str, share: float, sentences: Sequence[int],
               seed: int) -> list[str]:
    """chunk_texts of a corpus's "train" or "dev" texts, each part with a seed of its own."""
    return chunk_texts(texts, share, sentences, seed + (part == "dev"))


def corpus_of(data: DataConfig) -> Corpus:
    """The corpus as a run with these data settings reads and splits it."""
    return read_corpus(data.corpus, text_field=data.text_field, max_texts=data.max_texts,
                       dev_size=data.dev_size, max_chars=data.max_chars, shuffle=data.shuffle,
                       seed=data.seed, chunk_share=data.chunk_share,
                       chunk_sentences=data.chunk_sentences)


def multi_teacher_target(
    parts: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Each teacher (B, D_k) L2-normalized, weighted, concatenated, normalized again: (B, sum D_k)."""
    weights = weights or [1.0] * len(parts)
    normed = [
        w * torch.nn.functional.normalize(torch.from_numpy(np.asarray(p, dtype=np.float32)), dim=-1)
        for p, w in zip(parts, weights, strict=True)
    ]
    return torch.nn.functional.normalize(torch.cat(normed, dim=-1), dim=-1)


class TargetDataset(torch.utils.data.Dataset):
    """Row i: (text i, index i). Targets are gathered per batch in `collate` from memmaps; the
    texts' token ids, when given, are computed once (tokens.TokenizedTexts) and padded per batch."""

    def __init__(
        self,
        texts: Sequence[str],
        teacher_arrays: Sequence[np.ndarray],
        weights: Sequence[float],
        offset: int = 0,
        tokens: TokenizedTexts | None = None,
    ):
        if tokens is not None and len(tokens) != len(texts):
            raise ValueError(f"{len(tokens)} rows of token ids for {len(texts)} texts.")
        self.texts = texts
        self.arrays = teacher_arrays  # each (N_total, D_k) float16 memmap
        self.weights = list(weights)
        self.offset = offset  # where these texts start in the cache (dev rows follow train rows)
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> tuple[list[str], torch.Tensor]:
        rows = np.asarray(indices) + self.offset
        order = np.argsort(rows)  # memmaps read fastest in ascending row order
        parts = [np.empty((len(rows), a.shape[1]), dtype=np.float16) for a in self.arrays]
        for part, arr in zip(parts, self.arrays, strict=True):
            part[order] = arr[rows[order]]
        return [self.texts[i] for i in indices], multi_teacher_target(parts, self.weights)


class FeatureDataset(torch.utils.data.Dataset):
    """A TargetDataset whose texts come as fixed (N, H) features (a frozen encoder's outputs)."""

    def __init__(self, rows: TargetDataset, features: np.ndarray):
        if len(features) != len(rows):
            raise ValueError(f"{len(features)} feature rows for {len(rows)} texts.")
        self.rows, self.features = rows, torch.from_numpy(np.asarray(features, dtype=np.float32))
        self.texts = rows.texts

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        _, target = self.rows.collate(indices)
        return self.features[indices], target


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global batch k is a pure function of (seed, k): resuming at step k replays the same order.

    Each epoch is a fresh seeded permutation with the last partial batch dropped. Each process
    takes its contiguous slice of the global batch, so the processes together see exactly the
    batch one process would see.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the {n} training texts.")
        if batch_size % world_size:
            raise ValueError(
                f"Global batch_size {batch_size} must divide evenly over {world_size} processes."
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop = start, stop
        self.per_rank = batch_size // world_size
        self.rank = rank
        self.batches_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def global_batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.batches_per_epoch)
        return self.permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size].tolist()

    def __iter__(self):
        for k in range(self.start, self.stop):
            batch = self.global_batch(k)
            yield batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __len__(self) -> int:
        return self.stop - self.start


class LengthGroupedSampler(StepBatchSampler):
    """StepBatchSampler whose batches hold texts of similar token length, so they carry less padding.

    The epoch's rows are those of StepBatchSampler's epoch (the same permutation, the same dropped
    rest), taken in windows of `window` consecutive global batches; within a window the rows are
    sorted by length (ties in permutation order), cut into batches, and the batches shuffled. Batch
    k stays a pure function of (seed, k), and each process takes its slice of the global batch.
    The in-batch losses then compare texts of similar length with each other.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1, *, lengths: np.ndarray, window: int = 64):
        super().__init__(n, batch_size, seed, start, stop, rank, world_size)
        if len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} rows.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.lengths, self.window = np.asarray(lengths), window
        self._window_at: tuple[int, int] | None = None
        self._batches: list[list[int]] = []

    def global_batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.batches_per_epoch)
        w, i = divmod(j, self.window)
        if self._window_at != (epoch, w):
            first = w * self.window
            count = min(self.window, self.batches_per_epoch - first)
            b = self.batch_size
            rows = self.permutation(epoch)[first * b : (first + count) * b].numpy()
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            order = np.random.default_rng((self.seed, epoch, w)).permutation(count)
            self._window_at, self._batches = (epoch, w), [rows[o * b : (o + 1) * b].tolist() for o in order]
        return self._batches[i]


def padding_share(sampler: StepBatchSampler, lengths: np.ndarray, max_batches: int = 2000) -> float:
    """Share of padding among the tokens of `sampler`'s first `max_batches` global batches (all
    processes' slices, each padded to its own longest row)."""
    lengths = np.asarray(lengths)
    world = sampler.batch_size // sampler.per_rank
    real = total = 0
    for k in range(sampler.start, min(sampler.stop, sampler.start + max_batches)):
        slices = lengths[sampler.global_batch(k)].reshape(world, sampler.per_rank)
        real += int(slices.sum())
        total += int(slices.max(axis=1).sum()) * sampler.per_rank
    return 1.0 - real / total if total else 0.0
