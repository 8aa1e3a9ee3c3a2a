"""Image-text retrieval evaluation: data loading and the recall metric.

Loads image-caption sets (``.jsonl``, one ``{"image": "images/NNN.jpg", "captions": [...]}`` per
line, image paths relative to the file's folder), decodes the images with PIL (skipping and
counting broken ones), and scores image and caption embeddings with the COCO/Flickr retrieval
recall: text->image R@k and image->text R@k, x100, by exact inner-product search with FAISS.

Typical use (the image encoder is supplied by the caller)::

    ds = load_image_text("coco_mini/test.jsonl")
    images, ok, problems = load_images(ds.image_paths)
    ds = drop_images(ds, ok)                       # captions of broken images go too
    scores = image_text_recall(encode_images(images), encode_texts(ds.captions), ds.caption_image)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtd.data.image_text import (  # noqa: F401  (loading lives in data; re-exported here)
    ImageLoadError,
    ImageTextFormatError,
    ImageTextSet,
    drop_images,
    load_image_text,
    load_images,
    require_images,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ImageLoadError",
    "ImageTextFormatError",
    "ImageTextSet",
    "drop_images",
    "image_text_recall",
    "load_image_text",
    "load_images",
    "require_images",
]

# --------------------------------------------------------------------------- scoring


def _unit_rows(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array (N, D), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or inf; check the encoder output")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(a)


def _check_caption_image(caption_image: Any, n_img: int, n_txt: int) -> np.ndarray:
    owner = np.asarray(caption_image)
    if owner.shape != (n_txt,) or not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"caption_image must be ints of shape ({n_txt},), got {owner.dtype} {owner.shape}")
    if owner.min() < 0 or owner.max() >= n_img:
        raise ValueError(f"caption_image holds indices outside [0, {n_img})")
    uncaptioned = np.setdiff1d(np.arange(n_img), owner)
    if uncaptioned.size:
        # such an image can never be hit and would silently pull i2t recall down
        raise ValueError(
            f"{uncaptioned.size} image(s) have no caption (first: index {uncaptioned[0]}); "
            "drop them with drop_images() or add captions"
        )
    return owner


def _top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (N_query, k) of the k largest inner products in ``base``, best first (exact)."""
    import faiss  # here, not at the top: the end-of-run report imports this module without needing it

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    _, idx = index.search(queries, k)
    return idx


def _first_hit(hits: np.ndarray) -> np.ndarray:
    """0-based rank of the first True per row of ``hits`` (N, k); ``k`` where there is none."""
    return np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])


def image_text_recall(
    image_vecs: Any, text_vecs: Any, caption_image: Any, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """Cross-modal retrieval recall x100 (COCO/Flickr convention), by exact cosine search.

    Args:
        image_vecs: (N_img, D) image embeddings; L2-normalized here.
        text_vecs: (N_txt, D) caption embeddings; L2-normalized here.
        caption_image: (N_txt,) int, the image index of each caption; every image needs >= 1.
        ks: cut-offs; a k above the number of candidates counts every candidate.

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ..., "images": N_img, "captions": N_txt}``. t2i R@k: share
        of captions whose own image is among the k images nearest to it. i2t R@k: share of
        images with ANY of their captions among the k captions nearest to them.
    """
    img = _unit_rows(image_vecs, "image_vecs")
    txt = _unit_rows(text_vecs, "text_vecs")
    owner = _check_caption_image(caption_image, img.shape[0], txt.shape[0])
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_vecs have D={img.shape[1]} but text_vecs have D={txt.shape[1]}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive cut-offs, got {tuple(ks)}")

    k_max = max(int(k) for k in ks)
    t2i_rank = _first_hit(_top_k(img, txt, min(k_max, img.shape[0])) == owner[:, None])
    i2t_idx = _top_k(txt, img, min(k_max, txt.shape[0]))
    i2t_rank = _first_hit(owner[i2t_idx] == np.arange(img.shape[0])[:, None])

    result: dict[str, Any] = {}
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{direction}_R@{k}"] = float((rank < int(k)).mean() * 100.0)
    result["images"], result["captions"] = img.shape[0], txt.shape[0]
    logger.info(
        "image-text recall on %d images / %d captions: %s",
        img.shape[0],
        txt.shape[0],
        ", ".join(f"{k} {v:.2f}" for k, v in result.items() if "@" in k),
    )
    return result
