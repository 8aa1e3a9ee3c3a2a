"""Tiny random assets for tests, CI and configs/tiny.yaml: no downloads, seconds to build.

Builds, from config and a seed: a WordPiece tokenizer over a small made-up vocabulary, a corpus
whose sentences draw most words from one of a few topics (so texts have a real similarity
structure for the teachers to disagree about and the student to learn), and two random BERT
teachers of different widths saved as ordinary sentence-transformers folders, so the whole
pipeline runs through exactly the code real teachers use.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import torch

from mtd.io import atomic_write_text

logger = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "ze", "po", "da", "fi", "gu", "he"]
# name -> (hidden size, layers, pooling); different dims exercise the concatenated target
TEACHERS = {"teacher_a": (32, 2, "mean"), "teacher_b": (48, 1, "cls")}


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


def _save_tokenizer(words: list[str], folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _save_teacher(folder: Path, tokenizer, hidden: int, layers: int, pooling: str, seed: int):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
    )
    raw = folder.with_name(folder.name + ".hf")
    BertModel(config).save_pretrained(raw, safe_serialization=True)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=32)
    pooling_module = models.Pooling(hidden, pooling_mode=pooling)
    SentenceTransformer(modules=[transformer, pooling_module], device="cpu").save(str(folder))
    shutil.rmtree(raw)


def make_tiny_assets(folder: str | Path, n_texts: int = 3000, seed: int = 0) -> Path:
    """Build (once) tokenizer/, corpus.txt, teacher_a/ (32-d) and teacher_b/ (48-d) in `folder`."""
    folder = Path(folder)
    done = folder / "DONE"
    if done.is_file() and done.read_text() == f"{n_texts} {seed}\n":
        return folder
    logger.info("Building tiny random assets in %s", folder)
    rng = random.Random(seed)
    words = _words(300, rng)
    tokenizer = _save_tokenizer(words, folder / "tokenizer")
    atomic_write_text(folder / "corpus.txt", "\n".join(make_corpus(words, n_texts, rng)) + "\n")
    for i, (name, (hidden, layers, pooling)) in enumerate(TEACHERS.items()):
        _save_teacher(folder / name, tokenizer, hidden, layers, pooling, seed + 1 + i)
    atomic_write_text(done, f"{n_texts} {seed}\n")
    return folder
