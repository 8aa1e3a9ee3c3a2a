"""Tests for mtd.data.corpus and mtd.data.tokens: corpus reading, the multi-teacher target, the
step-indexed samplers (random and length-grouped), and token ids computed once and padded."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from mtd.data import tokens as tokens_module
from mtd.data.corpus import (
    CorpusError,
    LengthGroupedSampler,
    StepBatchSampler,
    TargetDataset,
    multi_teacher_target,
    padding_share,
    read_corpus,
)
from mtd.data.tokens import TokenizedTexts, TokenizerError
from mtd.models.student import tokenize


def _write(path, lines, encoding="utf-8"):
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


# --- read_corpus ---------------------------------------------------------------------------------------


def test_txt_and_jsonl_read_in_order(tmp_path):
    txt = _write(tmp_path / "a.txt", ["  first text ", "second text"])
    jsonl = _write(tmp_path / "b.jsonl", [json.dumps({"body": "third", "id": 1}),
                                          json.dumps({"body": "fourth ünïcode"})])
    c = read_corpus([txt, jsonl], text_field="body", shuffle=False)
    assert c.train == ["first text", "second text", "third", "fourth ünïcode"]
    assert c.dev == [] and c.texts == c.train


def test_blank_lines_skipped_and_counted(tmp_path, caplog):
    txt = _write(tmp_path / "a.txt", ["one", "", "   ", "two", "\t"])
    jsonl = _write(tmp_path / "b.jsonl", [json.dumps({"text": "three"}), "", json.dumps({"text": "  "})])
    with caplog.at_level(logging.WARNING, logger="mtd.data.corpus"):
        c = read_corpus([txt, jsonl], shuffle=False)
    assert c.train == ["one", "two", "three"]
    assert "Skipped 5 blank lines" in caplog.text


def test_no_blank_warning_for_clean_corpus(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtd.data.corpus"):
        read_corpus([_write(tmp_path / "a.txt", ["one", "two"])])
    assert "blank" not in caplog.text


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("ok line\nanother\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError) as e:
        read_corpus([path])
    msg = str(e.value)
    assert f"{path}:3:" in msg and "UTF-8" in msg and "iconv" in msg


def test_jsonl_without_field_names_text_field(tmp_path):
    path = _write(tmp_path / "c.jsonl", [json.dumps({"text": "fine"}), json.dumps({"body": "x"})])
    with pytest.raises(CorpusError) as e:
        read_corpus([path])
    msg = str(e.value)
    assert f"{path}:2:" in msg and "data.text_field" in msg and "'text'" in msg


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"text": 5}', '{"text": null}',
                                  '{"text": ["a"]}'])
def test_jsonl_bad_record_is_a_corpus_error(tmp_path, line):
    path = _write(tmp_path / "c.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: .*data\.text_field"):
        read_corpus([path])


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.txt not found.*data\.corpus"):
        read_corpus([tmp_path / "nope.txt"])
    csv = _write(tmp_path / "c.csv", ["a"])
    with pytest.raises(CorpusError, match=r"\.jsonl"):
        read_corpus([csv])


def test_blank_corpus(tmp_path):
    path = _write(tmp_path / "a.txt", ["", "  "])
    with pytest.raises(CorpusError, match="holds no text"):
        read_corpus([path])


def test_too_few_texts_for_dev_size(tmp_path):
    path = _write(tmp_path / "a.txt", ["a", "b", "c"])
    with pytest.raises(CorpusError, match="dev_size=3"):
        read_corpus([path], dev_size=3)
    with pytest.raises(CorpusError, match="2 usable texts"):
        read_corpus([path], dev_size=2, max_texts=2)
    c = read_corpus([path], dev_size=2)
    assert len(c.train) == 1 and len(c.dev) == 2


def test_max_chars_cuts_long_texts(tmp_path, caplog):
    path = _write(tmp_path / "a.txt", ["short", "x" * 50, "y" * 10])
    with caplog.at_level(logging.WARNING, logger="mtd.data.corpus"):
        c = read_corpus([path], max_chars=10, shuffle=False)
    assert c.train == ["short", "x" * 10, "y" * 10]
    assert "Cut 1 texts longer than 10" in caplog.text


def test_five_megabyte_line(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("a\n" + "w" * 5_000_000 + "\nb\n", encoding="utf-8")
    c = read_corpus([path], shuffle=False)
    assert [len(t) for t in c.train] == [1, 20_000, 1]


def test_shuffle_is_deterministic_by_seed(tmp_path):
    lines = [f"text {i}" for i in range(200)]
    path = _write(tmp_path / "a.txt", lines)
    a = read_corpus([path], seed=1, dev_size=20)
    b = read_corpus([path], seed=1, dev_size=20)
    c = read_corpus([path], seed=2, dev_size=20)
    assert a == b
    assert a.texts != c.texts and sorted(a.texts) == sorted(c.texts) == sorted(lines)
    assert a.texts != lines  # really shuffled
    assert read_corpus([path], shuffle=False).texts == lines


def test_dev_split_and_max_texts(tmp_path):
    lines = [f"text {i}" for i in range(100)]
    path = _write(tmp_path / "a.txt", lines)
    c = read_corpus([path], dev_size=10, seed=3)
    assert len(c.train) == 90 and len(c.dev) == 10
    assert not set(c.train) & set(c.dev) and sorted(c.texts) == sorted(lines)
    m = read_corpus([path], dev_size=10, max_texts=30, seed=3)
    assert len(m.train) == 20 and len(m.dev) == 10
    assert m.texts == c.texts[:30]  # max_texts is taken after the same shuffle
    ordered = read_corpus([path], dev_size=10, shuffle=False)
    assert ordered.dev == lines[-10:]


# --- multi_teacher_target ---------------------------------------------------------------------------------


def _reference_target(parts, weights):
    normed = [w * p / np.linalg.norm(p, axis=1, keepdims=True) for p, w in zip(parts, weights, strict=True)]
    cat = np.concatenate(normed, axis=1)
    return cat / np.linalg.norm(cat, axis=1, keepdims=True)


@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0], [2.0, 0.5, 1.0]])
def test_multi_teacher_target_matches_numpy(weights):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(6, d)) * s for d, s in ((4, 1.0), (7, 30.0), (3, 0.01))]
    got = multi_teacher_target(parts, weights)
    ref = _reference_target(parts, weights or [1.0] * 3)
    assert got.shape == (6, 14) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_teacher_weights_change_the_balance():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(5, 4)), rng.normal(size=(5, 6))]
    t = multi_teacher_target(parts, [3.0, 1.0]).numpy()
    # each teacher's block has norm w_k / sqrt(sum w^2)
    np.testing.assert_allclose(np.linalg.norm(t[:, :4], axis=1), 3 / np.sqrt(10), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t[:, 4:], axis=1), 1 / np.sqrt(10), rtol=1e-5)


def test_target_dataset_collate_gathers_offset_rows():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 4)).astype(np.float16), rng.normal(size=(10, 6)).astype(np.float16)
    texts = [f"t{i}" for i in range(7, 10)]
    ds = TargetDataset(texts, [a, b], [1.0, 2.0], offset=7)
    got_texts, target = ds.collate([2, 0])
    assert got_texts == ["t9", "t7"]
    ref = _reference_target([a[[9, 7]].astype(np.float32), b[[9, 7]].astype(np.float32)], [1.0, 2.0])
    np.testing.assert_allclose(target.numpy(), ref, rtol=1e-5, atol=1e-6)


# --- StepBatchSampler ------------------------------------------------------------------------------


def _run(n=50, batch_size=8, seed=0, start=0, stop=30, rank=0, world_size=1):
    return list(StepBatchSampler(n, batch_size, seed, start, stop, rank, world_size))


def test_batch_k_is_a_pure_function_of_seed_and_k():
    full = _run(stop=30)
    assert len(full) == 30
    for start in (1, 6, 7, 13, 29):
        assert _run(start=start, stop=30) == full[start:]
    assert _run(seed=1) != full


def test_epochs_are_permutations_with_drop_last():
    n, bs = 50, 8  # 6 batches per epoch, 2 texts dropped each epoch
    batches = _run(n=n, batch_size=bs, stop=18)
    assert all(len(b) == bs for b in batches)
    epochs = [sum(batches[e * 6 : (e + 1) * 6], []) for e in range(3)]
    for idx in epochs:
        assert len(idx) == len(set(idx)) == 48 and set(idx) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh permutation each epoch
    assert len(StepBatchSampler(n, bs, 0, 4, 18)) == 14


def test_exact_epochs_cover_every_index():
    batches = _run(n=48, batch_size=8, stop=12)
    for e in range(2):
        assert sorted(sum(batches[e * 6 : (e + 1) * 6], [])) == list(range(48))


def test_rank_slices_concatenate_to_the_global_batch():
    full = _run(batch_size=8, start=3, stop=20)
    r0 = _run(batch_size=8, start=3, stop=20, rank=0, world_size=2)
    r1 = _run(batch_size=8, start=3, stop=20, rank=1, world_size=2)
    assert all(len(b) == 4 for b in r0 + r1)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    quarters = [_run(batch_size=8, start=3, stop=20, rank=r, world_size=4) for r in range(4)]
    assert [sum(bs, []) for bs in zip(*quarters, strict=True)] == full


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divide evenly over 3 processes"):
        StepBatchSampler(50, 8, 0, 0, 10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="larger than the 5 training texts"):
        StepBatchSampler(5, 8, 0, 0, 10)


def test_batches_are_slices_of_the_seeded_epoch_permutation():
    """The random order itself (train.group_by_length=false): runs keep the batches they had."""
    for k in (0, 5, 6, 13):
        epoch, j = divmod(k, 6)
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        assert _run(seed=3, start=k, stop=k + 1) == [perm[j * 8 : (j + 1) * 8].tolist()]


# --- LengthGroupedSampler ---------------------------------------------------------------------------


def _lengths(n=200, seed=0):
    return np.random.default_rng(seed).integers(3, 60, size=n)


def _grouped(n=200, batch_size=8, seed=0, start=0, stop=60, rank=0, world_size=1, window=5, lengths=None):
    lengths = _lengths(n) if lengths is None else lengths
    return list(LengthGroupedSampler(n, batch_size, seed, start, stop, rank, world_size,
                                     lengths=lengths, window=window))


def test_grouped_batch_k_is_a_pure_function_of_seed_and_k():
    full = _grouped(stop=60)  # 25 batches an epoch in windows of 5: 2.4 epochs
    for start in (1, 4, 5, 24, 25, 26, 59):
        assert _grouped(start=start, stop=60) == full[start:]
    assert _grouped(seed=1) != full
    # A sampler asked out of order (as padding_share and a resume do) gives the same batches.
    sampler = LengthGroupedSampler(200, 8, 0, 0, 60, lengths=_lengths(), window=5)
    assert [sampler.global_batch(k) for k in (37, 3, 59, 3, 0)] == [full[k] for k in (37, 3, 59, 3, 0)]


def test_grouped_epochs_hold_the_random_epochs_rows_once_each():
    n, bs = 203, 8  # 25 batches an epoch, 3 rows dropped: the same 3 as without grouping
    grouped, plain = _grouped(n=n, lengths=_lengths(n), stop=75), _run(n=n, batch_size=bs, stop=75)
    for e in range(3):
        rows = sum(grouped[e * 25 : (e + 1) * 25], [])
        assert len(rows) == len(set(rows)) == 200
        assert set(rows) == set(sum(plain[e * 25 : (e + 1) * 25], []))
    assert grouped[:25] != plain[:25]


def test_grouped_batches_take_consecutive_lengths_within_a_window():
    lengths = _lengths()
    batches = _grouped(lengths=lengths, stop=25, window=5)
    for w in range(5):
        spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches[w * 5 : (w + 1) * 5])
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:], strict=False))
    # ... and the batch order within a window is shuffled, not a length curriculum.
    assert any(lengths[batches[i]].min() > lengths[batches[i + 1]].max() for i in range(25) if i % 5 < 4)


def test_grouped_rank_slices_partition_the_global_batch():
    full = _grouped(start=3, stop=40)
    slices = [_grouped(start=3, stop=40, rank=r, world_size=4) for r in range(4)]
    assert all(len(b) == 2 for s in slices for b in s)
    assert [sum(parts, []) for parts in zip(*slices, strict=True)] == full


def test_grouping_lowers_the_padding():
    lengths = _lengths(2000)
    args = (2000, 32, 0, 0, 100)
    plain = padding_share(StepBatchSampler(*args), lengths)
    grouped = padding_share(LengthGroupedSampler(*args, lengths=lengths), lengths)
    assert grouped < 0.1 < 0.3 < plain
    # The share counts each process's slice padded to its own longest row.
    one = StepBatchSampler(4, 4, 0, 0, 1, world_size=2)
    lengths = np.zeros(4, dtype=int)
    lengths[one.global_batch(0)] = [1, 3, 2, 2]  # slices [1, 3] and [2, 2]: 3 * 2 + 2 * 2 positions
    assert padding_share(one, lengths) == pytest.approx(2 / 10)


def test_grouped_sampler_rejects_lengths_of_another_size():
    with pytest.raises(ValueError, match="199 lengths for 200 rows"):
        LengthGroupedSampler(200, 8, 0, 0, 10, lengths=_lengths(199))


# --- TokenizedTexts ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")


def _texts(tiny_assets, n=40):
    texts = (tiny_assets / "corpus.txt").read_text().splitlines()[:n]
    return texts + [" ".join(texts[:6]), "x", texts[3]]  # one far beyond max_length, one tiny


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_token_ids_equal_tokenizing_the_batch(tiny_tokenizer, tiny_assets, monkeypatch, side):
    monkeypatch.setattr(tokens_module, "TOKENIZE_BATCH", 7)  # several tokenizer calls
    tiny_tokenizer.padding_side = side
    texts = _texts(tiny_assets)
    built = TokenizedTexts.build(tiny_tokenizer, texts, max_length=12, progress=False)
    assert built.ids.dtype == np.int32 and built.ids.ndim == 1 and len(built) == len(texts)
    assert built.lengths.max() == 12 and built.lengths.min() < 12  # truncation happened
    for rows in ([0, 1, 2], [40, 41, 5, 42], [41], list(range(len(texts)))):
        got = built.pad(rows)
        want = tokenize(tiny_tokenizer, [texts[i] for i in rows], 12)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (rows, k)


def test_target_dataset_keeps_token_ids_of_its_own_texts(tiny_tokenizer, tiny_assets):
    texts = _texts(tiny_assets)
    built = TokenizedTexts.build(tiny_tokenizer, texts, max_length=12, progress=False)
    with pytest.raises(ValueError, match="43 rows of token ids for 42 texts"):
        TargetDataset(texts[:-1], [], [], tokens=built)


def test_a_tokenizer_without_pad_token_is_refused(tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    with pytest.raises(TokenizerError, match="no pad token.*pad_token"):
        TokenizedTexts.build(tiny_tokenizer, ["a b", "c"], max_length=8, progress=False)
