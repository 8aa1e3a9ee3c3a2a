"""Documents cut into chunks of consecutive sentences (data.chunk_share, data.chunk_sentences)."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import pytest

from mtd.config import ConfigError, load_config
from mtd.data import corpus as corpus_module
from mtd.data.corpus import CorpusError, chunk_texts, corpus_of, read_corpus, split_sentences

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ENDS = [".", "!", "?"]


def _name(n: int) -> str:
    """A number in words (pysbd takes "line 3. Next" for a numbered list and splits before "3.")."""
    return "-".join(WORDS[int(d)] for d in str(n))


def _corpus_file(folder: Path, docs: list[str]) -> Path:
    path = folder / "c.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def _docs(n: int, seed: int = 0, single_every: int = 0) -> list[str]:
    """Documents of 2-15 sentences ("Doc D says line L."), every `single_every`-th of one sentence."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        size = 1 if single_every and d % single_every == 0 else rng.randint(2, 15)
        docs.append(" ".join(f"Doc {_name(d)} says line {_name(i)}{rng.choice(ENDS)}" for i in range(size)))
    return docs


def _doc_of(chunk: str) -> str:
    """The document a chunk's sentences come from (all of them, checked)."""
    names = set(re.findall(r"Doc ([a-z-]+) says", chunk))
    assert len(names) == 1, chunk
    return names.pop()


def _sentence_count(chunk: str) -> int:
    return len(re.findall(r"Doc [a-z-]+ says line", chunk))


def _chunks_by_doc(out: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for text in out:
        grouped.setdefault(_doc_of(text), []).append(text)
    return grouped


def test_same_seed_same_texts_other_seed_other_cuts():
    docs = _docs(300)
    a = chunk_texts(docs, 0.3, (1, 10), seed=4)
    assert a == chunk_texts(docs, 0.3, (1, 10), seed=4)  # target cache keys stay the same
    assert a != docs
    assert a != chunk_texts(docs, 0.3, (1, 10), seed=5)


def test_the_share_of_multi_sentence_documents_is_cut():
    docs = _docs(1000, single_every=4)  # 250 single-sentence texts, 750 of 2-15 sentences
    out = chunk_texts(docs, 0.3, (1, 1), seed=0)  # one sentence a chunk: every cut text splits
    cut = [doc for doc, chunks in _chunks_by_doc(out).items() if len(chunks) > 1]
    assert len(cut) == round(0.3 * 750)  # exactly that share of them, rounded


def test_chunk_sizes_stay_within_bounds_and_cover_them():
    docs = _docs(400)
    out = chunk_texts(docs, 1.0, (2, 4), seed=1)
    inner, last = [], []
    for chunks in _chunks_by_doc(out).values():
        sizes = [_sentence_count(c) for c in chunks]
        inner += sizes[:-1]
        last.append(sizes[-1])
    assert set(inner) == {2, 3, 4}  # drawn over the whole range, none outside it
    assert 1 in last and max(last) <= 4  # the last chunk takes what is left


def test_a_cut_documents_chunks_give_back_its_sentences_in_order():
    docs = _docs(200)
    out = chunk_texts(docs, 0.5, (1, 10), seed=2)
    grouped = _chunks_by_doc(out)
    sentences = split_sentences(docs)
    cut = 0
    for doc, parts in zip(docs, sentences, strict=True):
        chunks = grouped[_doc_of(doc)]
        assert " ".join(chunks) == " ".join(parts) == doc
        cut += len(chunks) > 1
    assert cut > 50  # the check above did see cut documents
    assert " ".join(out) == " ".join(docs)  # each document's chunks in its place


def test_single_sentence_texts_are_never_cut(caplog):
    docs = _docs(200, single_every=2)  # 100 of one sentence
    singles = [d for d in docs if _sentence_count(d) == 1]
    with caplog.at_level(logging.INFO, logger="mtd.data.corpus"):
        out = chunk_texts(docs, 1.0, (1, 1), seed=0)
    assert all(out.count(s) == 1 for s in singles)
    assert len(out) == len(singles) + sum(_sentence_count(d) for d in docs if d not in singles)
    assert "Cut 100 of the 100 texts of 2+ sentences" in caplog.text  # only those could be picked


def test_texts_pysbd_splits_with_characters_lost_stay_whole():
    text = "It is in B\u266d major. It is loud."  # pysbd returns only "It is loud."
    assert split_sentences([text]) == [[text]]
    assert chunk_texts([text, "One here. Two here."], 1.0, (1, 1)) == [text, "One here.", "Two here."]


def test_blank_segments_never_become_chunks(monkeypatch):
    import pysbd

    monkeypatch.setattr(pysbd.Segmenter, "segment", lambda self, text: ["One. ", " \t ", "", "Two."])
    assert split_sentences(["One.  \t  Two."]) == [["One.", "Two."]]
    assert chunk_texts(["One.  \t  Two."], 1.0, (1, 1)) == ["One.", "Two."]


@pytest.mark.parametrize("bounds", [(0, 3), (5, 2), (3,), (1, 2, 3)])
def test_bad_bounds_are_refused(bounds):
    with pytest.raises(CorpusError, match=r"1 <= min <= max.*data\.chunk_sentences"):
        chunk_texts(_docs(5), 0.3, bounds)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_bad_share_is_refused(share):
    with pytest.raises(CorpusError, match=r"data\.chunk_share"):
        chunk_texts(_docs(5), share)


@pytest.mark.parametrize("override, message", [
    ("data.chunk_sentences=[5,2]", "data.chunk_sentences=[5, 2]: give [min, max] sentences per chunk "
                                   "with min <= max, e.g. [1, 10]."),
    ("data.chunk_sentences=[3]", "data.chunk_sentences=[3]: give [min, max]"),
    ("data.chunk_sentences=[0,4]", "data.chunk_sentences.0=0 is out of range: it must be at least 1."),
    ("data.chunk_share=1.2", "data.chunk_share=1.2 is out of range: it must be in [0, 1]."),
])
def test_bad_chunk_settings_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(TINY, [override])


def test_zero_share_leaves_the_corpus_as_it_was_without_splitting(tmp_path, monkeypatch):
    def no_split(texts):
        raise AssertionError("split sentences although nothing is cut")

    monkeypatch.setattr(corpus_module, "split_sentences", no_split)
    docs = _docs(100)
    assert chunk_texts(docs, 0.0) == docs
    path = _corpus_file(tmp_path, docs)
    assert read_corpus([path], dev_size=10, chunk_share=0.0) == read_corpus([path], dev_size=10)


def test_chunks_of_one_document_stay_on_its_side_of_the_dev_split(tmp_path):
    docs = _docs(60)
    path = _corpus_file(tmp_path, docs)
    c = read_corpus([path], dev_size=20, chunk_share=1.0, chunk_sentences=(1, 1), seed=3)
    sentences = {s: d for d, parts in enumerate(split_sentences(docs)) for s in parts}
    assert sorted(c.texts) == sorted(sentences)  # every sentence once, as a chunk of its own
    assert c == read_corpus([path], dev_size=20, chunk_share=1.0, chunk_sentences=(1, 1), seed=3)
    dev_docs, train_docs = {sentences[t] for t in c.dev}, {sentences[t] for t in c.train}
    assert len(dev_docs) == 20 and not dev_docs & train_docs  # dev_size counts documents


def test_a_runs_data_settings_reach_the_corpus(tmp_path):
    docs = _docs(60)
    path = _corpus_file(tmp_path, docs)
    cfg = load_config(TINY, [f"data.corpus=[{path}]", "data.dev_size=20", "data.seed=3",
                             "data.chunk_share=1", "data.chunk_sentences=[1,1]"])
    assert corpus_of(cfg.data) == read_corpus([path], dev_size=20, chunk_share=1.0,
                                              chunk_sentences=(1, 1), seed=3)


def test_the_analysis_pairs_the_dev_chunks_the_run_held_out(tmp_path):
    from mtd.evaluation.analysis import dev_text_pairs

    path = _corpus_file(tmp_path, _docs(60))
    cfg = load_config(TINY, [f"data.corpus=[{path}]", "data.dev_size=20", "data.seed=3",
                             "data.chunk_share=0.5", "data.chunk_sentences=[1,2]"])
    dev = corpus_of(cfg.data).dev
    pairs = dev_text_pairs(cfg)
    n = len(dev) // 2
    assert (pairs.first, pairs.second) == (dev[0 : 2 * n : 2], dev[1 : 2 * n : 2])
