"""Image-caption files: reading them and decoding their images.

One ``{"image": "images/NNN.jpg", "captions": [...]}`` per line, image paths relative to the
file's folder (the coco_mini layout). Used for training (mtd.data.images) and evaluation
(mtd.evaluation.image_text).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mtd.errors import MtdError
from mtd.io import DataFormatError, jsonl_objects

logger = logging.getLogger(__name__)

# PIL reports a broken file with whichever exception its decoder happens to raise: OSError
# (truncated data, unidentified format, missing file), SyntaxError (broken PNG chunks), EOFError,
# struct.error and ValueError from header parsers, DecompressionBombError for absurd sizes.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)


class ImageTextFormatError(DataFormatError):
    """An image-text file cannot be read; the message names the file and, where known, the line."""


class ImageLoadError(MtdError, RuntimeError):
    """Not one image could be decoded; ``problems`` lists each path with its reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:5]) + ("\n  ..." if len(problems) > 5 else "")
        super().__init__(
            f"none of the {len(problems)} images could be loaded; check that the image folder "
            f"sits next to the .jsonl file and holds readable images:\n  {shown}"
        )


@dataclass(frozen=True)
class ImageTextSet:
    """``len(image_paths)`` images with ``len(captions)`` captions; caption ``j`` describes image
    ``caption_image[j]`` (int array, shape (N_txt,)). Every image has at least one caption."""

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        idx = self.caption_image
        if idx.ndim != 1 or idx.shape[0] != len(self.captions):
            raise ValueError(
                f"ImageTextSet {self.name!r}: caption_image has shape {idx.shape}, "
                f"expected ({len(self.captions)},)"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.image_paths)):
            raise ValueError(
                f"ImageTextSet {self.name!r}: caption_image holds indices outside "
                f"[0, {len(self.image_paths)})"
            )

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


def _records(path: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    lines = enumerate(text.splitlines(), start=1)
    return jsonl_objects(path, lines, ImageTextFormatError, ("image", "captions"))


def _check_record(path: Path, record: dict[str, Any], line: int) -> tuple[str, list[str]]:
    image, captions = record["image"], record["captions"]
    if not isinstance(image, str) or not image.strip():
        raise ImageTextFormatError(path, f"'image' must be a non-empty path string, got {image!r}", line)
    if not isinstance(captions, list):
        raise ImageTextFormatError(
            path, f"'captions' must be a list of strings, got {type(captions).__name__}", line
        )
    if not captions:
        raise ImageTextFormatError(
            path, "empty 'captions' list (every image needs at least one caption; drop the line)", line
        )
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ImageTextFormatError(
                path, f"caption {i} must be a string, got {type(caption).__name__}", line
            )
    return image, captions


def load_image_text(jsonl_path: str | os.PathLike[str]) -> ImageTextSet:
    """Read an image-caption set from a ``.jsonl`` file.

    One JSON object per line, ``{"image": "images/NNN.jpg", "captions": ["...", ...]}`` (extra
    keys ignored, blank lines skipped). Image paths are made absolute relative to the file's
    folder; the files are not opened here (see :func:`load_images`). The set is named
    ``"<parent dir>/<file stem>"``, e.g. ``"coco_mini/test"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTextFormatError: undecodable UTF-8, invalid JSON, missing key, empty or non-string
            caption list entries, an image listed twice, or an empty file; names file and line.
    """
    path = Path(jsonl_path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImageTextFormatError(path, f"not valid UTF-8 (byte offset {exc.start})") from None
    folder = path.parent.resolve()
    image_paths: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    first_line: dict[Path, int] = {}
    for line_no, record in _records(path, text):
        image, caps = _check_record(path, record, line_no)
        image_path = folder / image  # an absolute "image" stays as it is
        # A repeated image would tie with itself in text->image search and make recall depend
        # on tie-breaking, so it is an error rather than a silent second entry.
        if image_path in first_line:
            raise ImageTextFormatError(
                path,
                f"image {image!r} already listed on line {first_line[image_path]}; "
                "merge its captions into one line",
                line_no,
            )
        first_line[image_path] = line_no
        owner.extend([len(image_paths)] * len(caps))
        image_paths.append(image_path)
        captions.extend(caps)
    if not image_paths:
        raise ImageTextFormatError(path, "empty file (no image lines)")
    name = f"{path.parent.name}/{path.stem}"
    logger.debug("loaded %s: %d images, %d captions from %s", name, len(image_paths), len(captions), path)
    return ImageTextSet(name, image_paths, captions, np.asarray(owner, dtype=np.int64))


def require_images(ds: ImageTextSet, path: str | os.PathLike[str]) -> None:
    """Raise naming the file when not one of its images exists (a moved or missing image folder):
    cheap, so it runs before any model is scored rather than when the images are decoded."""
    if not any(p.is_file() for p in ds.image_paths):
        raise ImageTextFormatError(
            path,
            f"none of its {ds.n_images} images exists (first: {ds.image_paths[0]}). Image paths are "
            f"relative to the file's folder: put the images there (e.g. {Path(path).parent / 'images'}) "
            "or fix the 'image' entries",
        )


def _open_image(path: Path, mode: str) -> Image.Image:
    with Image.open(path) as img:
        # convert() decodes; load() makes sure a no-op convert (already in `mode`) decodes too,
        # so a truncated file fails here and not later inside the encoder.
        out = img.convert(mode)
        out.load()
    return out


def load_images(
    paths: Sequence[str | os.PathLike[str]], *, mode: str = "RGB"
) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Open and fully decode every image, skipping the ones that cannot be read.

    Returns:
        ``(images, ok_mask, problems)``: the decoded images in ``mode`` (one per True entry of
        ``ok_mask``, in order), ``ok_mask`` (bool, shape (N,)) and one ``"<path>: <reason>"``
        string per skipped image. Skips are logged as one warning with the count; pass
        ``ok_mask`` to :func:`drop_images` to drop the broken images' captions as well.
        All images are held in memory.

    Raises:
        ValueError: ``paths`` is empty.
        ImageLoadError: not a single image could be loaded (a wrong folder, not bad luck).
    """
    if len(paths) == 0:
        raise ValueError("load_images: no image paths given")
    images: list[Image.Image] = []
    ok = np.zeros(len(paths), dtype=bool)
    problems: list[str] = []
    for i, p in enumerate(tqdm(paths, desc="load images", unit="img")):
        path = Path(p)
        try:
            images.append(_open_image(path, mode))
        except FileNotFoundError:
            problems.append(f"{path}: file not found")
        except _DECODE_ERRORS as exc:
            problems.append(f"{path}: cannot decode ({type(exc).__name__}: {exc})")
        else:
            ok[i] = True
    if not ok.any():
        raise ImageLoadError(problems)
    if problems:
        logger.warning(
            "load_images: skipped %d of %d images that could not be read (first: %s)",
            len(problems),
            len(paths),
            problems[0],
        )
    return images, ok, problems


def drop_images(ds: ImageTextSet, ok_mask: Any) -> ImageTextSet:
    """A copy of ``ds`` without the images where ``ok_mask`` (bool, shape (N_img,)) is False and
    without their captions; ``caption_image`` is renumbered to the kept images."""
    ok = np.asarray(ok_mask)
    if ok.dtype != bool or ok.shape != (ds.n_images,):
        raise ValueError(
            f"drop_images: ok_mask must be a bool array of shape ({ds.n_images},), "
            f"got {ok.dtype} {ok.shape}"
        )
    if not ok.any():
        raise ValueError(f"drop_images: ok_mask drops every image of {ds.name!r}")
    new_index = np.cumsum(ok) - 1  # old image index -> new index (valid where ok)
    keep_caption = ok[ds.caption_image]
    return ImageTextSet(
        ds.name,
        [p for p, keep in zip(ds.image_paths, ok, strict=True) if keep],
        [c for c, keep in zip(ds.captions, keep_caption, strict=True) if keep],
        new_index[ds.caption_image[keep_caption]].astype(np.int64),
    )
