"""Tests for mtd.evaluation.image_text (offline; one test reads the shared coco_mini set if present)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtd.evaluation.image_text import (
    ImageLoadError,
    ImageTextFormatError,
    ImageTextSet,
    drop_images,
    image_text_recall,
    load_image_text,
    load_images,
)

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "image_text" / "coco_mini"


def _with_cosines(cos: list[list[float]]) -> np.ndarray:
    """Caption vectors whose cosines to the images e0, e1, e2 (padded to 4-D) are exactly ``cos``:
    a 4th coordinate tops each row up to unit length."""
    c = np.asarray(cos, dtype=np.float64)
    return np.hstack([c, np.sqrt(1.0 - (c**2).sum(axis=1, keepdims=True))])


# 3 images x 2 captions; rows are cosines to (img0, img1, img2). Own-image rank per caption
# (t2i): 1, 2, 1, 2, 2, 3. Nearest captions per image (i2t): img0 -> c0 (own), img1 -> c2 (own),
# img2 -> c3 (img1's) then c4 (own), so img2 is hit at rank 2.
COSINES = [
    [0.9, 0.0, 0.1],  # c0 -> img0
    [0.4, 0.8, 0.1],  # c1 -> img0, own image 2nd
    [0.1, 0.9, 0.0],  # c2 -> img1
    [0.2, 0.3, 0.7],  # c3 -> img1, own image 2nd
    [0.7, 0.2, 0.5],  # c4 -> img2, own image 2nd
    [0.6, 0.3, 0.2],  # c5 -> img2, own image 3rd
]
OWNER = np.array([0, 0, 1, 1, 2, 2])


# --------------------------------------------------------------------------- recall


def test_recall_hand_computed() -> None:
    images = np.eye(3, 4) * np.array([[2.0], [0.5], [7.0]])  # not unit length on purpose
    texts = _with_cosines(COSINES) * 3.0
    r = image_text_recall(images, texts, OWNER, ks=(1, 2, 5, 10))
    assert r["t2i_R@1"] == pytest.approx(100 * 2 / 6)
    assert r["t2i_R@2"] == pytest.approx(100 * 5 / 6)
    assert r["t2i_R@5"] == r["t2i_R@10"] == 100.0  # k above 3 images counts all of them
    assert r["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert r["i2t_R@2"] == r["i2t_R@5"] == r["i2t_R@10"] == 100.0
    assert (r["images"], r["captions"]) == (3, 6)
    assert list(r) == [
        *(f"i2t_R@{k}" for k in (1, 2, 5, 10)), *(f"t2i_R@{k}" for k in (1, 2, 5, 10)), "images", "captions"
    ]


def test_recall_rank_two_misses_r1_hits_r5() -> None:
    # one caption whose own image (img0) is second: R@1 = 0 but R@5 = 100 for it
    images = np.eye(2)
    texts = np.array([[0.6, 0.8], [0.0, 1.0]])  # caption 0 is nearer img1 (0.8) than its img0 (0.6)
    r = image_text_recall(images, texts, np.array([0, 1]))
    assert r["t2i_R@1"] == 50.0 and r["t2i_R@5"] == 100.0
    r = image_text_recall(images, texts, np.array([0, 1]), ks=(1,))
    assert list(r) == ["i2t_R@1", "t2i_R@1", "images", "captions"]


def test_i2t_counts_any_caption() -> None:
    # img0's first caption is far, its second is the nearest caption: an i2t hit at rank 1
    images = np.eye(2)
    texts = np.array([[-1.0, 0.0], [1.0, 0.1], [0.1, 1.0]])
    r = image_text_recall(images, texts, np.array([0, 0, 1]), ks=(1,))
    assert r["i2t_R@1"] == 100.0
    assert r["t2i_R@1"] == pytest.approx(100 * 2 / 3)


def _brute_force(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, ks) -> dict[str, float]:
    img = images / np.linalg.norm(images, axis=1, keepdims=True)
    txt = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    sim = txt @ img.T  # (N_txt, N_img)
    t2i_rank = (sim > sim[np.arange(len(owner)), owner][:, None]).sum(axis=1)
    own = owner[None, :] == np.arange(len(images))[:, None]  # (N_img, N_txt)
    best_own = np.where(own, sim.T, -np.inf).max(axis=1)
    i2t_rank = (sim.T > best_own[:, None]).sum(axis=1)
    out = {f"i2t_R@{k}": 100 * float((i2t_rank < k).mean()) for k in ks}
    out.update({f"t2i_R@{k}": 100 * float((t2i_rank < k).mean()) for k in ks})
    return out


def test_faiss_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    n_img, dim = 40, 8
    owner = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 80)])
    images = rng.normal(size=(n_img, dim))
    texts = images[owner] + rng.normal(scale=1.5, size=(len(owner), dim))  # noisy: ranks spread
    ks = (1, 3, 5, 10)
    got = image_text_recall(images, texts, owner, ks=ks)
    want = _brute_force(images, texts, owner, ks)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert 0 < got["t2i_R@1"] < 100 and 0 < got["i2t_R@1"] < 100  # the case is not degenerate


@pytest.mark.parametrize(
    ("images", "texts", "owner", "message"),
    [
        (np.eye(2), np.eye(3)[:, :2], np.array([0, 1]), "caption_image must be ints of shape"),
        (np.eye(2), np.eye(2), np.array([0, 2]), "outside"),
        (np.eye(2), np.eye(2), np.array([0, 0]), "no caption"),
        (np.eye(2), np.eye(3), np.array([0, 1, 1]), "D=2"),
        (np.eye(2), np.full((2, 2), np.nan), np.array([0, 1]), "NaN"),
        (np.zeros((0, 2)), np.eye(2), np.array([0, 1]), "non-empty 2-D"),
    ],
)
def test_recall_rejects_bad_input(images, texts, owner, message) -> None:
    with pytest.raises(ValueError, match=message):
        image_text_recall(images, texts, owner)


# --------------------------------------------------------------------------- loading


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_image_text(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "test.jsonl",
        [
            json.dumps({"image": "images/001.jpg", "captions": ["a cat", "a small cat"], "id": 7}),
            "",
            json.dumps({"image": "images/002.jpg", "captions": ["a dog"]}),
        ],
    )
    ds = load_image_text(path)
    assert ds.name == f"{tmp_path.name}/test"
    assert ds.image_paths == [tmp_path.resolve() / "images/001.jpg", tmp_path.resolve() / "images/002.jpg"]
    assert all(p.is_absolute() for p in ds.image_paths)
    assert ds.captions == ["a cat", "a small cat", "a dog"]
    assert ds.caption_image.tolist() == [0, 0, 1]
    assert (ds.n_images, ds.n_captions) == (2, 3)


GOOD = json.dumps({"image": "a.jpg", "captions": ["x"]})


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ([GOOD, '{"image": "b.jpg", "captions": ["y"]'], 2, "invalid JSON"),
        ([GOOD, '["b.jpg"]'], 2, "expected a JSON object"),
        ([json.dumps({"image": "b.jpg"})], 1, "missing key(s) 'captions'"),
        ([json.dumps({"captions": ["y"]})], 1, "missing key(s) 'image'"),
        ([GOOD, json.dumps({"image": "b.jpg", "captions": []})], 2, "empty 'captions' list"),
        ([json.dumps({"image": "b.jpg", "captions": ["y", 3]})], 1, "caption 1 must be a string"),
        ([json.dumps({"image": "b.jpg", "captions": "y"})], 1, "must be a list of strings"),
        ([json.dumps({"image": "", "captions": ["y"]})], 1, "'image' must be a non-empty"),
        ([GOOD, GOOD], 2, "already listed on line 1"),
    ],
)
def test_load_image_text_errors(tmp_path: Path, lines: list[str], line: int, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ImageTextFormatError) as info:
        load_image_text(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}, line {line}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_load_image_text_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ImageTextFormatError, match=r"empty\.jsonl: empty file"):
        load_image_text(path)


def test_load_image_text_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image_text(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- images


def _jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 60, (48, 64, 3)) + np.array(color) // 2).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)  # noise: a few KB, not a few bytes
    return path


def test_load_images_skips_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])  # valid header, half the scan data
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    gray = _jpeg(tmp_path / "second.jpg", (10, 200, 10))
    missing = tmp_path / "missing.jpg"
    paths = [good, truncated, missing, garbage, gray]

    with caplog.at_level(logging.WARNING, logger="mtd.evaluation.image_text"):
        images, ok, problems = load_images(paths)
    assert ok.tolist() == [True, False, False, False, True]
    assert len(images) == 2 and all(im.mode == "RGB" and im.size == (64, 48) for im in images)
    assert len(problems) == 3
    assert problems[0].startswith(f"{truncated}: cannot decode") and "truncated" in problems[0]
    assert problems[1] == f"{missing}: file not found"
    assert problems[2].startswith(f"{garbage}: cannot decode")
    assert "skipped 3 of 5 images" in caplog.text

    images, _, _ = load_images([good], mode="L")
    assert images[0].mode == "L"


def test_load_images_all_broken_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="none of the 2 images could be loaded") as info:
        load_images([tmp_path / "a.jpg", tmp_path / "b.jpg"])
    assert len(info.value.problems) == 2
    with pytest.raises(ValueError, match="no image paths"):
        load_images([])


def test_drop_images_reindexes(tmp_path: Path) -> None:
    ds = ImageTextSet(
        "x/test",
        [tmp_path / f"{i}.jpg" for i in range(4)],
        ["a0", "b0", "c1", "d2", "e3", "f3"],
        np.array([0, 0, 1, 2, 3, 3]),
    )
    kept = drop_images(ds, np.array([True, False, True, True]))
    assert kept.image_paths == [tmp_path / "0.jpg", tmp_path / "2.jpg", tmp_path / "3.jpg"]
    assert kept.captions == ["a0", "b0", "d2", "e3", "f3"]
    assert kept.caption_image.tolist() == [0, 0, 1, 2, 2]
    assert kept.name == ds.name and ds.n_images == 4  # the input is untouched
    assert drop_images(ds, np.ones(4, dtype=bool)).caption_image.tolist() == ds.caption_image.tolist()
    with pytest.raises(ValueError, match="drops every image"):
        drop_images(ds, np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        drop_images(ds, np.array([1, 0, 1, 1]))


def test_end_to_end_with_a_broken_image(tmp_path: Path) -> None:
    for i in range(3):
        _jpeg(tmp_path / "images" / f"{i}.jpg", (80 * i, 40, 200 - 60 * i))
    (tmp_path / "images" / "1.jpg").write_bytes(b"broken")
    path = _write_jsonl(
        tmp_path / "test.jsonl",
        [json.dumps({"image": f"images/{i}.jpg", "captions": [f"c{i}a", f"c{i}b"]}) for i in range(3)],
    )
    ds = load_image_text(path)
    images, ok, problems = load_images(ds.image_paths)
    ds = drop_images(ds, ok)
    assert (len(images), ds.n_images, ds.captions) == (2, 2, ["c0a", "c0b", "c2a", "c2b"])
    r = image_text_recall(np.eye(2), np.eye(2)[ds.caption_image], ds.caption_image)
    assert r["t2i_R@1"] == r["i2t_R@1"] == 100.0


@pytest.mark.skipif(not (COCO_MINI / "test.jsonl").is_file(), reason="shared coco_mini set not present")
def test_real_coco_mini() -> None:
    ds = load_image_text(COCO_MINI / "test.jsonl")
    assert (ds.n_images, ds.n_captions) == (60, 300)
    assert ds.name == "coco_mini/test"
    images, ok, problems = load_images(ds.image_paths)
    assert ok.all() and not problems and len(images) == 60
