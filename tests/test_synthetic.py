"""Tests for mtd.synthetic: the tiny tokenizer really tokenizes and the tiny teachers see content.

Before these tests the tiny tokenizer mapped every word to [UNK], so the teachers' vectors
depended on the word count alone and every tiny-config test ran on text length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from mtd.config import TeacherConfig
from mtd.evaluation.image_text import load_image_text, load_images
from mtd.synthetic import IMAGE_WORDS, TEACHERS, make_tiny_image_assets
from mtd.targets import teachers


@pytest.fixture(scope="module")
def tokenizer(tiny_assets: Path):
    return AutoTokenizer.from_pretrained(str(tiny_assets / "tokenizer"))


@pytest.fixture(scope="module")
def corpus(tiny_assets: Path) -> list[str]:
    return tiny_assets.joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()


def _same_length_pairs(corpus: list[str], n: int = 20) -> list[tuple[str, str]]:
    """`n` pairs of different corpus texts with the same word count (5 words)."""
    five = [t for t in corpus if len(t.split()) == 5]
    return list(zip(five[:n], five[n:2 * n], strict=True))


def test_vocabulary_words_are_their_own_tokens(tokenizer, corpus):
    words = sorted({w for text in corpus for w in text.split()})
    assert len(tokenizer) > 300 and len(words) > 200
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert all(len(i) == 1 for i in ids)
    assert tokenizer.unk_token_id not in {i[0] for i in ids}
    assert len({i[0] for i in ids}) == len(words)  # one distinct id per word
    assert tokenizer.convert_ids_to_tokens([i[0] for i in ids]) == words


def test_distinct_texts_get_distinct_ids(tokenizer, corpus):
    enc = tokenizer(corpus[:200])["input_ids"]
    assert len({tuple(i) for i in enc}) == 200
    assert all(i[0] == tokenizer.cls_token_id and i[-1] == tokenizer.sep_token_id for i in enc)
    assert tokenizer("Kalo ZEVO")["input_ids"] == tokenizer("kalo zevo")["input_ids"]  # lowercases


def test_reloaded_tokenizer_gives_identical_ids(tokenizer, corpus, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = corpus[:50] + ["unknownword kalo", ""]
    kwargs = {"padding": True, "truncation": True, "max_length": 8}
    assert again(texts, **kwargs)["input_ids"] == tokenizer(texts, **kwargs)["input_ids"]
    assert again.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("name", list(TEACHERS))
def test_teachers_see_words_not_just_length(tiny_assets, corpus, name):
    folder = tiny_assets / name
    # The teacher folder loads its own copy of the tokenizer; it must be the same one.
    assert AutoTokenizer.from_pretrained(str(folder)).get_vocab() == AutoTokenizer.from_pretrained(
        str(tiny_assets / "tokenizer")).get_vocab()
    cfg = TeacherConfig(name=name, path=str(folder))
    model = teachers.load_teacher(cfg, folder, device="cpu")
    pairs = _same_length_pairs(corpus)
    a = teachers.encode(model, [p[0] for p in pairs], cfg)
    b = teachers.encode(model, [p[1] for p in pairs], cfg)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cosine = (a * b).sum(1)
    # [UNK]-only tokens gave exactly 1.0; BERT's default init (0.02) gave 0.99999 for teacher_b
    assert cosine.max() < 0.99, "same word count, (nearly) the same vector: words are not seen"
    assert cosine.mean() < 0.97


# --- the tiny image-text set ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_assets(tmp_path_factory) -> Path:
    return make_tiny_image_assets(tmp_path_factory.mktemp("tiny-images"), n_train=40, n_test=12)


def _records(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_image_set_loads_like_coco_mini(image_assets):
    for split, n in (("train", 40), ("test", 12)):
        ds = load_image_text(image_assets / f"{split}.jsonl")
        assert ds.n_images == n and ds.n_captions == 5 * n
        images, ok, problems = load_images(ds.image_paths)
        assert ok.all() and not problems
        assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    names = [r["image"] for r in _records(image_assets, "train") + _records(image_assets, "test")]
    assert len(set(names)) == 52 and all(n.startswith("images/") and n.endswith(".png") for n in names)


def test_image_set_is_deterministic_and_idempotent(image_assets, tmp_path):
    again = make_tiny_image_assets(tmp_path / "again", n_train=40, n_test=12)
    for split in ("train", "test"):
        assert (again / f"{split}.jsonl").read_text() == (image_assets / f"{split}.jsonl").read_text()
    for png in sorted((image_assets / "images").iterdir()):
        assert (again / "images" / png.name).read_bytes() == png.read_bytes()
    stamp = (again / "images" / "000.png").stat().st_mtime_ns
    make_tiny_image_assets(again, n_train=40, n_test=12)  # DONE: nothing rewritten
    assert (again / "images" / "000.png").stat().st_mtime_ns == stamp
    other = make_tiny_image_assets(tmp_path / "other", n_train=40, n_test=12, seed=1)
    assert (other / "train.jsonl").read_text() != (again / "train.jsonl").read_text()


def test_captions_are_in_the_vocabulary(image_assets, tokenizer):
    records = _records(image_assets, "train") + _records(image_assets, "test")
    captions = [c for r in records for c in r["captions"]]
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in i for i in ids)
    # every caption word is one token of its own
    for word in IMAGE_WORDS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids) == [word]


def test_image_pixels_follow_the_scene(tmp_path):
    from mtd import synthetic

    plain = np.asarray(synthetic._draw("plain", (("red", "square", "large", "left"),), 32, [0, 0]))
    assert tuple(plain[16, 8]) == synthetic.COLORS["red"]  # inside the square, left half
    assert tuple(plain[16, 26]) == (190, 190, 190)  # background on the right
    noisy = np.asarray(synthetic._draw("noisy", (("blue", "circle", "small", "top"),), 32, [0, 0]))
    assert tuple(noisy[8, 16]) == synthetic.COLORS["blue"] and noisy[28].std() > 5


@pytest.mark.parametrize("name", list(TEACHERS))
def test_captions_of_different_scenes_get_different_vectors(tiny_assets, name):
    from mtd import synthetic

    scenes = [(("red", "circle", "small", "left"),), (("blue", "circle", "small", "left"),),
              (("red", "square", "small", "left"),), (("red", "circle", "small", "right"),)]
    captions = [synthetic._captions("plain", s)[0] for s in scenes]
    folder = tiny_assets / name
    cfg = TeacherConfig(name=name, path=str(folder))
    vecs = teachers.encode(teachers.load_teacher(cfg, folder, device="cpu"), captions, cfg)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cosine = vecs @ vecs.T
    # One word apart (color, shape or position): apart by more than float16 cache rounding.
    assert cosine[np.triu_indices(len(scenes), k=1)].max() < 0.998
