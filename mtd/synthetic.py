"""Tiny random assets for tests, CI and configs/tiny.yaml: no downloads, seconds to build.

Builds, from config and a seed: a WordPiece tokenizer over a small made-up vocabulary, a corpus
whose sentences draw most words from one of a few topics (so texts have a real similarity
structure for the teachers to disagree about and the student to learn), and two random BERT
teachers of different widths saved as ordinary sentence-transformers folders, so the whole
pipeline runs through exactly the code real teachers use.

`make_tiny_image_assets` draws a small image-caption set (shapes of a color, size and position;
captions in words of the same vocabulary) that a tiny vision tower can learn to match.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from pathlib import Path

import torch

from mtd.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "ze", "po", "da", "fi", "gu", "he"]
# name -> (hidden size, layers, pooling); different dims exercise the concatenated target
TEACHERS = {"teacher_a": (32, 2, "mean"), "teacher_b": (48, 1, "cls")}
# Weight init std of the random teachers. At BERT's 0.02 a 1-layer random BERT's [CLS] output is
# its [CLS] embedding plus a ~1e-5 content term (cosine 0.99999 between any two texts), which the
# float16 target cache rounds away; at 0.15 cosines spread over ~0.6-0.99 (CLS) / ~0.35-0.99 (mean)
# and still follow word overlap.
INIT_STD = 0.15
# Part of the DONE marker: bump it whenever the assets built from the same seed change, so stale
# folders are rebuilt, not reused (v2: the tokenizer really tokenizes, where v1 mapped every
# word to [UNK]; teachers initialized at INIT_STD).
ASSETS_VERSION = 3  # v3: IMAGE_WORDS in the vocabulary
IMAGE_ASSETS_VERSION = 1


def _words(n: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def make_corpus(words: list[str], n_texts: int, rng: random.Random, n_topics: int = 12) -> list[str]:
    topics = [rng.sample(words, 20) for _ in range(n_topics)]
    texts = set()
    while len(texts) < n_texts:
        topic = rng.choice(topics)
        length = rng.randint(3, 14)
        texts.add(" ".join(rng.choice(topic) if rng.random() < 0.8 else rng.choice(words)
                           for _ in range(length)))
    return sorted(texts)


def build_tokenizer(words: list[str]):
    """A BERT WordPiece tokenizer (lowercasing, [CLS] $A [SEP]) over SPECIAL + `words`, ids in order.

    Built as a `tokenizers.Tokenizer` and wrapped, because with transformers 5
    `BertTokenizerFast(vocab_file=...)` ignores the file and keeps its 5 special tokens, so every
    word became [UNK] and the tiny teachers saw nothing but the text length.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    if len(vocab) != len(SPECIAL) + len(words):
        raise ValueError("tiny vocabulary has duplicate tokens")
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=backend, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )


def _save_tokenizer(words: list[str], folder: Path):
    tokenizer = build_tokenizer(words)
    tokenizer.save_pretrained(folder)
    # For people reading the folder (and overwriting a stale one); tokenizer.json is what loads.
    atomic_write_text(folder / "vocab.txt", "\n".join(SPECIAL + words) + "\n")
    return tokenizer


def _save_teacher(folder: Path, tokenizer, hidden: int, layers: int, pooling: str, seed: int):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
        initializer_range=INIT_STD,
    )
    raw = folder.with_name(folder.name + ".hf")
    BertModel(config).save_pretrained(raw, safe_serialization=True)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=32)
    pooling_module = models.Pooling(hidden, pooling_mode=pooling)
    SentenceTransformer(modules=[transformer, pooling_module], device="cpu").save(str(folder))
    shutil.rmtree(raw)


def _built(done: Path, stamp: str) -> bool:
    """Whether assets were already built with these settings (DONE is written last, holding them)."""
    return done.is_file() and done.read_text() == stamp


def make_tiny_assets(folder: str | Path, n_texts: int = 3000, seed: int = 0) -> Path:
    """Build (once) tokenizer/, corpus.txt, teacher_a/ (32-d) and teacher_b/ (48-d) in `folder`."""
    folder = Path(folder)
    done, stamp = folder / "DONE", f"v{ASSETS_VERSION} {n_texts} {seed}\n"
    if _built(done, stamp):
        return folder
    logger.info("Building tiny random assets in %s", folder)
    rng = random.Random(seed)
    words = _words(300, rng)
    # Appended after the random words, which keeps the rng draws and so the corpus unchanged.
    known = set(words)
    caption_words = [w for w in IMAGE_WORDS if w not in known]
    tokenizer = _save_tokenizer(words + caption_words, folder / "tokenizer")
    atomic_write_text(folder / "corpus.txt", "\n".join(make_corpus(words, n_texts, rng)) + "\n")
    for i, (name, (hidden, layers, pooling)) in enumerate(TEACHERS.items()):
        _save_teacher(folder / name, tokenizer, hidden, layers, pooling, seed + 1 + i)
    atomic_write_text(done, stamp)
    return folder


# --------------------------------------------------------------------------- tiny image-text set

# Plain English words of the image captions, appended to the tiny vocabulary after the random
# words (so the random draws, hence the text corpus and its topics, are unchanged).
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
          "yellow": (235, 210, 20), "purple": (140, 40, 180), "black": (15, 15, 15)}
SHAPES = {"circle": "round", "square": "boxy", "triangle": "pointy", "cross": "plus"}  # -> alias
SIZES = {"small": 0.14, "large": 0.26}  # half-width as a fraction of the image side
# position -> (centre x, centre y as fractions of the side, "where" phrase, "side" phrase)
POSITIONS = {
    "left": (0.27, 0.5, "on the left", "left side"),
    "right": (0.73, 0.5, "on the right", "right side"),
    "top": (0.5, 0.27, "at the top", "top part"),
    "bottom": (0.5, 0.73, "at the bottom", "bottom part"),
    "center": (0.5, 0.5, "in the center", "middle"),
}
PAIRS = [("left", "right"), ("top", "bottom")]  # where two shapes of one image go
IMAGE_WORDS = sorted(
    set(COLORS) | set(SHAPES) | set(SHAPES.values()) | set(SIZES)
    | {w for p in POSITIONS.values() for phrase in p[2:] for w in phrase.split()}
    | {"a", "and", "with", "there", "is", "of", "picture", "shape", "shapes", "two", "one",
       "background", "plain", "noisy", "that", ",", ":"}
)


def _scene(rng: random.Random) -> tuple[str, tuple[tuple[str, str, str, str], ...]]:
    """(background, objects): one object of any size anywhere, or two small ones side by side;
    an object is (color, shape, size, position)."""
    background = rng.choice(["plain", "noisy"])
    if rng.random() < 0.5:
        return background, ((rng.choice(list(COLORS)), rng.choice(list(SHAPES)),
                             rng.choice(list(SIZES)), rng.choice(list(POSITIONS))),)
    positions = rng.choice(PAIRS)
    return background, tuple((rng.choice(list(COLORS)), rng.choice(list(SHAPES)), "small", p)
                             for p in positions)


def _captions(background: str, objects: tuple[tuple[str, str, str, str], ...]) -> list[str]:
    """Five descriptions of the same scene in different words and word orders."""
    if len(objects) == 1:
        (color, shape, size, pos), = objects
        where, side = POSITIONS[pos][2:]
        return [
            f"a {size} {color} {shape} {where}",
            f"{side}: a {size} {color} {SHAPES[shape]} shape",
            f"there is a {color} {shape} {where} of the picture",
            f"{where}, a {color} {shape} that is {size}",
            f"a {background} background with one {size} {color} {shape}",
        ]
    (c1, s1, _, p1), (c2, s2, _, p2) = objects
    (w1, d1), (w2, d2) = POSITIONS[p1][2:], POSITIONS[p2][2:]
    return [
        f"a {c1} {s1} {w1} and a {c2} {s2} {w2}",
        f"{d1}: a {c1} {SHAPES[s1]} shape, {d2}: a {c2} {SHAPES[s2]} shape",
        f"there is a {c2} {s2} {w2} and a {c1} {s1} {w1}",
        f"two small shapes: a {c1} {s1} and a {c2} {s2}",
        f"a {background} background with a {c2} {s2} and a {c1} {s1}",
    ]


def _draw(background: str, objects, size: int, noise_seed: list[int]):
    """The scene as a (size, size) RGB PIL image."""
    import numpy as np
    from PIL import Image, ImageDraw

    pixels = np.full((size, size, 3), 190, dtype=np.int16)
    if background == "noisy":  # per-pixel grey noise: the tower must look past it
        pixels += np.random.default_rng(noise_seed).integers(-45, 46, (size, size, 1), dtype=np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for color, shape, scale, pos in objects:
        cx, cy = POSITIONS[pos][0] * size, POSITIONS[pos][1] * size
        r = SIZES[scale] * size
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:  # cross
            w = max(1.0, r / 3)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return image


def _unique_scenes(n: int, rng: random.Random) -> list:
    # Identical scenes would share captions, so image->text retrieval could not tell them apart.
    scenes, seen = [], set()
    while len(scenes) < n:
        scene = _scene(rng)
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    return scenes


def make_tiny_image_assets(folder: str | Path, n_train: int = 240, n_test: int = 60, size: int = 32,
                           seed: int = 0) -> Path:
    """Build (once) a learnable image-caption set in the layout of coco_mini in `folder`.

    train.jsonl / test.jsonl hold one ``{"image": "images/NNN.png", "captions": [5 strings]}`` per
    line; each (size, size) PNG shows one shape (circle/square/triangle/cross, in one of six
    colors, small or large, left/right/top/bottom/center) or two small ones side by side, on a
    plain or noisy grey background, and its captions describe exactly that in different words.
    Every caption word is in the tiny tokenizer's vocabulary (IMAGE_WORDS).
    """
    folder = Path(folder)
    done, stamp = folder / "DONE", f"v{IMAGE_ASSETS_VERSION} {n_train} {n_test} {size} {seed}\n"
    if _built(done, stamp):
        return folder
    logger.info("Building tiny image-text assets in %s", folder)
    scenes = _unique_scenes(n_train + n_test, random.Random(seed))
    digits = max(3, len(str(len(scenes) - 1)))
    lines = []
    for i, (background, objects) in enumerate(scenes):
        name = f"images/{i:0{digits}d}.png"
        buffer = io.BytesIO()
        _draw(background, objects, size, [seed, i]).save(buffer, format="PNG")
        atomic_write_bytes(folder / name, buffer.getvalue())
        lines.append(json.dumps({"image": name, "captions": _captions(background, objects)}))
    atomic_write_text(folder / "train.jsonl", "\n".join(lines[:n_train]) + "\n")
    atomic_write_text(folder / "test.jsonl", "\n".join(lines[n_train:]) + "\n")
    atomic_write_text(done, stamp)
    return folder
