"""Image-caption training data for the image path (Jasper stage 4).

Sources: `.jsonl` files in the coco_mini layout ({"image": "images/NNN.jpg", "captions": [...]},
paths relative to the file; read by mtd.evaluation.image_text.load_image_text) or a hub data set
(or a local folder laid out like one) with an image column and a caption column.

Every image is decoded once before training: one that does not decode is skipped, counted and
logged with its path; a set with no decodable image is an error naming the files. During training
images are decoded again in DataLoader workers and turned into pixels by the tower's transform.

Targets: every caption has a row in each target array (the multi-teacher target of the caption,
or the student's own text vector of it). An image's target is the mean of its captions'
normalized targets (renormalized), or one caption drawn per step (`captions: sample`), the draw a
pure function of (seed, step, image) so a resumed run draws the same captions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mtd.data.corpus import StepBatchSampler
from mtd.data.image_text import load_image_text
from mtd.errors import MtdError

logger = logging.getLogger(__name__)


class ImageDataError(MtdError, ValueError):
    """Image-caption training data that cannot be used; the message names the file and the fix."""


def open_image(ref: Any) -> Image.Image:
    """A fully decoded RGB image from a path."""
    with Image.open(ref) as img:
        out = img.convert("RGB")
        out.load()
    return out


@dataclass(frozen=True)
class ImageCaptions:
    """`images[i]` (a path, or a row number of a hub data set) has captions `captions[owner == i]`;
    `load(images[i])` decodes it (picklable: it runs in DataLoader workers)."""

    images: list[Any]
    captions: list[str]
    owner: np.ndarray  # (N_captions,) int image index of each caption
    load: Callable[[Any], Image.Image] = open_image
    name: str = ""  # the hub set, for messages

    def describe(self, ref: Any) -> str:
        return f"{self.name}[{ref}]" if self.name else str(ref)

    def caption_rows(self) -> list[np.ndarray]:
        """Per image, the indices of its captions."""
        order = np.argsort(self.owner, kind="stable")
        bounds = np.searchsorted(self.owner[order], np.arange(len(self.images) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.images))]


def read_jsonl_sets(paths: Sequence[str]) -> ImageCaptions:
    images: list[Path] = []
    captions: list[str] = []
    owner: list[np.ndarray] = []
    for p in paths:
        if not Path(p).is_file():
            raise ImageDataError(f"Image-caption file {p} not found (images.train). Check the path.")
        part = load_image_text(p)
        owner.append(part.caption_image + len(images))
        images += part.image_paths
        captions += part.captions
    return ImageCaptions(images, captions, np.concatenate(owner))


class _HubImages:
    """Decodes row i's image of a hub data set's image column (PIL image or bytes/path dict)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __call__(self, i: int) -> Image.Image:
        value = self.dataset[int(i)][self.column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes"):
            import io

            return open_image(io.BytesIO(value["bytes"]))
        return open_image(value["path"] if isinstance(value, dict) else value)


def read_hub_set(name: str, split: str, image_column: str, caption_column: str) -> ImageCaptions:
    """A hub data set (or a local folder laid out like a hub repo) with images and captions."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for a missing repo, config or split
        raise ImageDataError(f"images.hub={name!r} (split {split!r}) cannot be loaded: {e}") from None
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise ImageDataError(f"images.hub={name!r} has no column(s) {missing}; its columns: "
                             f"{ds.column_names}. Set images.image_column / images.caption_column.")
    captions, owner = [], []
    for i, caps in enumerate(ds[caption_column]):
        caps = [caps] if isinstance(caps, str) else list(caps)
        captions += caps
        owner += [i] * len(caps)
    return ImageCaptions(list(range(len(ds))), captions, np.asarray(owner, dtype=np.int64),
                         load=_HubImages(ds, image_column), name=name)


def keep_decodable(data: ImageCaptions) -> ImageCaptions:
    """Drop images that do not decode (logged with their path, counted) and their captions."""
    ok = np.zeros(len(data.images), dtype=bool)
    problems = []
    for i, ref in enumerate(tqdm(data.images, desc="check images", unit="img")):
        try:
            data.load(ref)
            ok[i] = True
        except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError) as e:
            problems.append(f"{data.describe(ref)}: {type(e).__name__}: {e}")
    for p in problems:
        logger.warning("Skipping an image that does not decode: %s", p)
    if not ok.any():
        shown = "\n  ".join(problems[:5])
        raise ImageDataError(f"None of the {len(problems)} training images decodes; check the image "
                             f"folder beside the .jsonl (images.train):\n  {shown}")
    if problems:
        logger.warning("Skipped %d of %d training images that do not decode.", len(problems), len(ok))
    new_index = np.cumsum(ok) - 1
    keep = ok[data.owner]
    return ImageCaptions([r for r, k in zip(data.images, ok, strict=True) if k],
                         [c for c, k in zip(data.captions, keep, strict=True) if k],
                         new_index[data.owner[keep]], data.load, data.name)


def mean_targets(rows: list[np.ndarray], target: np.ndarray) -> np.ndarray:
    """(N_images, D) float32: per image the mean of its captions' normalized targets, renormalized."""
    t = np.asarray(target, dtype=np.float32)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    out = np.stack([t[r].mean(0) for r in rows])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Item (step, i): image i as pixels (decoded in the worker) and its target rows.

    targets: {source: (N_captions, D) array} by target source ("teacher", "self:fc1", ...).
    """

    def __init__(self, data: ImageCaptions, targets: dict[str, np.ndarray], transform: Callable,
                 captions: str = "mean", seed: int = 0, tokens: np.ndarray | None = None):
        """tokens: (N_images, N, Dv) outputs of a frozen tower, computed once (tower_tokens); then
        items carry them instead of pixels and the tower is not run again every step."""
        self.data, self.transform, self.mode, self.seed = data, transform, captions, seed
        self.tokens = tokens
        self.rows = data.caption_rows()
        if captions == "mean":  # the mean is fixed: compute it once, not per batch
            self.targets = {k: mean_targets(self.rows, v) for k, v in targets.items()}
        else:
            self.targets = {k: np.asarray(v) for k, v in targets.items()}

    def __len__(self) -> int:
        return len(self.data.images)

    def __getitem__(self, item: tuple[int, int]):
        step, i = item
        ref = self.data.images[i]
        try:
            pixels = self.pixels(i) if self.tokens is None else torch.from_numpy(self.tokens[i])
        except (OSError, SyntaxError, EOFError, ValueError) as e:  # decoded at start, broken since
            raise ImageDataError(f"Training image {self.data.describe(ref)} no longer decodes ({e}). "
                                 "Restore it, or rerun with --resume after removing it.") from None
        if self.mode == "mean":
            row = i
        else:
            rng = np.random.default_rng((self.seed, step, i))
            row = int(rng.choice(self.rows[i]))
        return pixels, row

    def pixels(self, i: int) -> torch.Tensor:
        """(3, H, W) image i through the tower's transform."""
        return self.transform(self.data.load(self.data.images[i]))

    def collate(self, items: list[tuple[torch.Tensor, int]]):
        pixels = torch.stack([p for p, _ in items])
        key = "pixel_values" if self.tokens is None else "vision_tokens"
        rows = [r for _, r in items]
        targets = {k: torch.from_numpy(np.asarray(v[rows], dtype=np.float32))
                   for k, v in self.targets.items()}
        return {key: pixels}, targets


@torch.no_grad()
def tower_tokens(dataset: ImageCaptionDataset, tower: torch.nn.Module, batch_size: int = 32) -> np.ndarray:
    """(N_images, N, Dv) float32 tokens of every image by a frozen tower in eval mode: exactly what
    it would give at every step (the transform is deterministic), computed once."""
    was_training = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="tower tokens", unit="batch"):
        idx = range(start, min(start + batch_size, len(dataset)))
        pixels = torch.stack([dataset.pixels(i) for i in idx]).to(device)
        out.append(tower(pixels).float().cpu().numpy())
    tower.train(was_training)
    return np.concatenate(out)


class StepTaggedSampler(StepBatchSampler):
    """StepBatchSampler whose items carry their global batch number: (k, i)."""

    def __iter__(self):
        for k in range(self.start, self.stop):
            batch = self.global_batch(k)
            yield [(k, i) for i in batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]]
