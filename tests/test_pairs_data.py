"""Labeled text pairs for contrastive fine-tuning (mtd.data.pairs): readers, groups, combine."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from mtd.data.pairs import (
    Pairs,
    PairsError,
    combine,
    read_caption_pairs,
    read_hub_pairs,
    read_jsonl_pairs,
    read_sts_pairs,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STSB_TRAIN = SHARED / "sts" / "stsb" / "train.jsonl"
COCO_TRAIN = SHARED / "image_text" / "coco_mini" / "train.jsonl"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared data at {SHARED}")


def _jsonl(path: Path, rows: list) -> str:
    """Write rows (dicts, or raw strings written as they are) one per line; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def _reference_groups(anchor: list[str], positive: list[str]) -> list[int]:
    """Connected components of rows linked by a shared anchor/positive text, by depth-first search,
    numbered in order of their first row."""
    rows_of = defaultdict(list)
    for i, texts in enumerate(zip(anchor, positive, strict=True)):
        for t in texts:
            rows_of[t].append(i)
    comp = [-1] * len(anchor)
    count = 0
    for start in range(len(anchor)):
        if comp[start] >= 0:
            continue
        comp[start], stack = count, [start]
        while stack:
            i = stack.pop()
            for j in rows_of[anchor[i]] + rows_of[positive[i]]:
                if comp[j] < 0:
                    comp[j] = count
                    stack.append(j)
        count += 1
    return comp


def _assert_groups(p: Pairs) -> None:
    """Rows sharing a text (transitively) share a group, no others do; groups are 0..G-1."""
    assert p.group.dtype == np.int64 and p.group.shape == (len(p),)
    assert p.group.tolist() == _reference_groups(p.anchor, p.positive)


# --- jsonl ----------------------------------------------------------------------------------------

def test_jsonl_pairs_reads_every_file_stripped_with_negatives(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"q": " x ", "d": "y", "n": "u", "extra": 1}, "", "  ",
                                      {"q": "p", "d": "q\t", "n": "v"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"q": "y", "d": "z", "n": "w"}])
    p = read_jsonl_pairs([a, b], anchor="q", positive="d", negative="n")
    assert (p.anchor, p.positive, p.negative) == (["x", "p", "y"], ["y", "q", "z"], ["u", "v", "w"])
    assert p.group.tolist() == [0, 1, 0] and len(p) == 3 and p.name == f"{tmp_path.name}/a+{tmp_path.name}/b"


def test_jsonl_pairs_without_negatives_have_none(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"anchor": "a", "positive": "b"},
                                      {"anchor": "c", "positive": "d", "negative": None}])
    p = read_jsonl_pairs([f])
    assert p.negative is None and p.group.tolist() == [0, 1]


def test_jsonl_negatives_on_some_rows_only_name_the_first_row_without_one(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"anchor": "a", "positive": "b", "negative": "c"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"anchor": "d", "positive": "e", "negative": "f"},
                                      {"anchor": "g", "positive": "h"}, {"anchor": "i", "positive": "j"}])
    with pytest.raises(PairsError, match=r"b\.jsonl, line 2: no 'negative' field, while .*a\.jsonl line 1 "
                                         r"has one.*Add 'negative' to every row, or drop it from all rows "
                                         r"\(2 of 4 lack it\)"):
        read_jsonl_pairs([a, b])


@pytest.mark.parametrize("line, message", [
    ('{"anchor": "a", "positive": ', r"line 2: invalid JSON"),
    ('["a", "b"]', r"line 2: expected a JSON object"),
    ('{"anchor": "a", "pos": "b"}', r"line 2: missing field\(s\) \['positive'\] \(found \['anchor', 'pos'\]\)"
                                    r".*positive='positive'"),
    ('{"anchor": 3, "positive": "b"}', r"line 2: 'anchor' must be a string, got int.*anchor='anchor'"),
    ('{"anchor": "a", "positive": " \\n "}', r"line 2: 'positive' is empty.*positive='positive'"),
    ('{"anchor": "a", "positive": "b", "negative": ["c"]}', r"line 2: 'negative' must be a string.*"
                                                             r"negative='negative'"),
])
def test_jsonl_bad_lines_name_file_line_field_and_fix(tmp_path, line, message):
    f = _jsonl(tmp_path / "bad.jsonl", ['{"anchor": "x", "positive": "y"}', line])
    with pytest.raises(PairsError, match=r"bad\.jsonl, " + message):
        read_jsonl_pairs([f])


def test_jsonl_missing_or_empty_files_are_errors(tmp_path):
    with pytest.raises(PairsError, match=r"nope\.jsonl: file not found; check the path"):
        read_jsonl_pairs([str(tmp_path / "nope.jsonl")])
    empty = _jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(PairsError, match="no pairs"):
        read_jsonl_pairs([empty])
    (tmp_path / "latin1.jsonl").write_bytes('{"anchor": "caf\xe9", "positive": "b"}\n'.encode("latin-1"))
    with pytest.raises(PairsError, match="not valid UTF-8"):
        read_jsonl_pairs([str(tmp_path / "latin1.jsonl")])


# --- groups ---------------------------------------------------------------------------------------

def test_groups_join_rows_sharing_any_anchor_or_positive_text(tmp_path):
    rows = [("x", "y"), ("p", "q"), ("y", "z"), ("r", "p"), ("z", "w"), ("s", "t")]
    f = _jsonl(tmp_path / "g.jsonl", [{"anchor": a, "positive": b} for a, b in rows])
    assert read_jsonl_pairs([f]).group.tolist() == [0, 1, 0, 1, 0, 2]
    # A row tying the groups of rows 0 and 1 together merges them (and renumbers the rest).
    f = _jsonl(tmp_path / "g.jsonl", [{"anchor": a, "positive": b} for a, b in rows + [("q", "x")]])
    assert read_jsonl_pairs([f]).group.tolist() == [0, 0, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("seed", range(5))
def test_groups_match_the_connected_components_of_shared_texts(tmp_path, seed):
    rng = random.Random(seed)
    vocab = [f"t{i}" for i in range(120)]
    rows = [{"anchor": rng.choice(vocab), "positive": rng.choice(vocab)} for _ in range(100)]
    p = read_jsonl_pairs([_jsonl(tmp_path / "r.jsonl", rows)])
    _assert_groups(p)
    assert 1 < p.group.max() + 1 < len(p)  # neither all one group nor all apart: a real test


def test_pairs_check_their_shapes():
    with pytest.raises(ValueError, match="group must be int64"):
        Pairs(["a"], ["b"], None, np.zeros(1, dtype=np.int32), "x")
    with pytest.raises(ValueError, match="lengths differ"):
        Pairs(["a"], ["b"], ["c", "d"], np.zeros(1, dtype=np.int64), "x")


# --- STS ------------------------------------------------------------------------------------------

@needs_shared
def test_sts_pairs_keep_exactly_the_rows_scoring_at_least_min_score():
    rows = [json.loads(line) for line in STSB_TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in rows if r["score"] >= 4.0]
    p = read_sts_pairs([str(STSB_TRAIN)], min_score=4.0)
    assert len(p) == len(kept) and 0 < len(kept) < len(rows)
    assert p.anchor == [r["sentence1"].strip() for r in kept]
    assert p.positive == [r["sentence2"].strip() for r in kept]
    assert p.negative is None and p.name == "stsb/train"
    _assert_groups(p)
    assert p.group.max() + 1 < len(p)  # some kept rows share a sentence, and are grouped
    # A folder stands for its train.jsonl.
    assert read_sts_pairs([str(STSB_TRAIN.parent)], 4.0).anchor == p.anchor


def test_sts_pairs_skip_empty_sentences_and_count_them(tmp_path, caplog):
    f = _jsonl(tmp_path / "sts" / "train.jsonl", [
        {"sentence1": "a", "sentence2": "b", "score": 5},
        {"sentence1": " ", "sentence2": "c", "score": 4.5},
        {"sentence1": "a", "sentence2": "d", "score": 1.0},
        {"sentence1": "b ", "sentence2": "e", "score": 3.0},
    ])
    with caplog.at_level(logging.WARNING, logger="mtd.data.pairs"):
        p = read_sts_pairs([str(Path(f).parent)], min_score=3.0)
    assert (p.anchor, p.positive, p.group.tolist()) == (["a", "b"], ["b", "e"], [0, 0])
    assert "skipped 1 rows with an empty sentence" in caplog.text


@pytest.mark.parametrize("row, message", [
    ({"sentence1": "a", "sentence2": "b", "score": "high"}, r"line 2: 'score' must be a finite number"),
    ({"sentence1": "a", "sentence2": "b", "score": True}, r"line 2: 'score' must be a finite number"),
    ({"sentence1": "a", "sentence2": "b", "score": float("nan")}, r"line 2: 'score' must be a finite"),
    ({"sentence1": "a", "sentence2": 7, "score": 1}, r"line 2: 'sentence2' must be a string"),
    ({"sentence1": "a", "score": 1}, r"line 2: missing key\(s\) 'sentence2'"),
])
def test_sts_bad_rows_name_file_and_line(tmp_path, row, message):
    f = _jsonl(tmp_path / "train.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 5}, row])
    with pytest.raises(PairsError, match=r"train\.jsonl, " + message):
        read_sts_pairs([f], 0.0)


def test_sts_file_where_no_row_passes_names_the_highest_score(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 5}])
    low = _jsonl(tmp_path / "low.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 0.2},
                                          {"sentence1": "a", "sentence2": "b", "score": 0.9},
                                          {"sentence1": "", "sentence2": "b", "score": 1}])
    with pytest.raises(PairsError, match=r"low\.jsonl: no pair .* min_score=1 \(the highest score is 1\); "
                                         "lower min_score"):
        read_sts_pairs([good, low], min_score=1.0)
    with pytest.raises(PairsError, match=r"missing\.jsonl: file not found"):
        read_sts_pairs([str(tmp_path / "missing.jsonl")], 1.0)


# --- captions -------------------------------------------------------------------------------------

@needs_shared
def test_caption_pairs_of_coco_mini_ring_every_image_and_group_it():
    lines = COCO_TRAIN.read_text(encoding="utf-8").splitlines()
    images = [json.loads(line) for line in lines if line.strip()]
    sizes = [len(r["captions"]) for r in images]
    p = read_caption_pairs([str(COCO_TRAIN)])
    assert len(p) == sum(n if n > 2 else 1 if n == 2 else 0 for n in sizes) and p.negative is None
    caps = [c.strip() for c in images[0]["captions"]]
    n = len(caps)
    ring = [(caps[k], caps[(k + 1) % n]) for k in range(n)]
    assert list(zip(p.anchor[:n], p.positive[:n], strict=True)) == ring
    _assert_groups(p)
    # Every image's pairs form one group (none of the images shares a caption with another).
    assert p.group.max() + 1 == len(images)


def test_caption_pairs_skip_images_with_fewer_than_two_captions(tmp_path, caplog):
    f = _jsonl(tmp_path / "caps.jsonl", [
        {"image": "1.jpg", "captions": ["only one"]},
        {"image": "2.jpg", "captions": ["a", " ", "b "]},  # an empty caption dropped: two left
        {"image": "3.jpg", "captions": ["c", "d", "e"]},
        {"image": "4.jpg", "captions": ["f", ""]},
    ])
    with caplog.at_level(logging.WARNING, logger="mtd.data.pairs"):
        p = read_caption_pairs([f])
    assert list(zip(p.anchor, p.positive, strict=True)) == [("a", "b"), ("c", "d"), ("d", "e"), ("e", "c")]
    assert p.group.tolist() == [0, 1, 1, 1]
    assert "dropped 2 empty captions; skipped 2 images with fewer than 2 captions" in caplog.text
    assert caplog.text.count("Caption pairs") == 1  # logged once


def test_caption_files_without_pairs_or_missing_are_errors(tmp_path):
    f = _jsonl(tmp_path / "caps.jsonl", [{"image": "1.jpg", "captions": ["one"]}])
    with pytest.raises(PairsError, match="no image has 2 non-empty captions"):
        read_caption_pairs([f])
    with pytest.raises(PairsError, match=r"gone\.jsonl: image-caption file not found"):
        read_caption_pairs([str(tmp_path / "gone.jsonl")])


# --- combine --------------------------------------------------------------------------------------

def _part(tmp_path: Path, name: str, rows: list[tuple[str, ...]]) -> Pairs:
    keys = ("anchor", "positive", "negative")
    lines = [dict(zip(keys[:len(r)], r, strict=True)) for r in rows]
    return read_jsonl_pairs([_jsonl(tmp_path / f"{name}.jsonl", lines)])


def test_combine_keeps_groups_of_parts_distinct(tmp_path):
    a = _part(tmp_path, "a", [("x", "y"), ("y", "z")])
    b = _part(tmp_path, "b", [("p", "q"), ("r", "s"), ("q", "t")])
    both = combine([a, b])
    assert both.anchor == a.anchor + b.anchor and both.positive == a.positive + b.positive
    assert both.group.tolist() == [0, 0, 1, 2, 1] and both.negative is None
    assert both.name == f"{a.name}+{b.name}"
    # Rows of different parts that share a text are one group too.
    c = _part(tmp_path, "c", [("z", "k")])
    assert combine([b, c, a]).group.tolist() == [0, 1, 0, 2, 2, 2]


def test_combine_keeps_each_parts_own_groups(tmp_path):
    tied = Pairs(["x", "u"], ["y", "v"], None, np.zeros(2, dtype=np.int64), "tied")  # one group by fiat
    b = _part(tmp_path, "b", [("p", "q"), ("r", "s")])
    assert combine([tied, b]).group.tolist() == [0, 0, 1, 2]


def test_combine_needs_negatives_everywhere_or_nowhere(tmp_path):
    with_neg = _part(tmp_path, "n", [("a", "b", "c")])
    without = _part(tmp_path, "w", [("d", "e")])
    assert combine([with_neg, with_neg]).negative == ["c", "c"]
    with pytest.raises(PairsError, match=rf"the sources \['{without.name}'\] have no hard negatives while "
                                         rf"\['{with_neg.name}'\] have: give hard negatives for all "
                                         "sources, or none"):
        combine([with_neg, without])


def test_combine_of_nothing_is_an_error(tmp_path):
    with pytest.raises(PairsError, match="no pairs in any source"):
        combine([])
    with pytest.raises(PairsError, match="no pairs in any source"):
        combine([Pairs([], [], None, np.zeros(0, dtype=np.int64), "empty")])
    with pytest.raises(PairsError, match="max_pairs=0; give at least 1"):
        combine([_part(tmp_path, "a", [("a", "b")])], max_pairs=0)


def test_combine_max_pairs_draws_a_seeded_subset_in_order(tmp_path):
    a = _part(tmp_path, "a", [(f"a{i}", f"a{i // 3}x", f"n{i}") for i in range(30)])  # groups of 3
    b = _part(tmp_path, "b", [(f"b{i}", f"b{i}x", f"m{i}") for i in range(30)])
    full = combine([a, b])
    sub = combine([a, b], max_pairs=20, seed=3)
    assert len(sub) == 20
    again = combine([a, b], max_pairs=20, seed=3)
    other = combine([a, b], max_pairs=20, seed=4)
    assert (sub.anchor, sub.negative) == (again.anchor, again.negative)
    assert sub.group.tolist() == again.group.tolist()
    assert sub.anchor != other.anchor
    rows = [full.anchor.index(t) for t in sub.anchor]
    assert rows == sorted(rows) and sub.negative == [full.negative[i] for i in rows]
    # Groups: those of the full set restricted to the subset, renumbered 0..G-1.
    kept = full.group[rows]
    assert sorted(set(sub.group.tolist())) == list(range(len(set(kept.tolist()))))
    assert all((sub.group[i] == sub.group[j]) == (kept[i] == kept[j]) for i in range(20) for j in range(20))
    assert combine([a, b], max_pairs=60).anchor == full.anchor


# --- hub ------------------------------------------------------------------------------------------

def test_hub_pairs_from_a_local_folder(tmp_path, offline_datasets):
    repo = tmp_path / "repo"
    _jsonl(repo / "train.jsonl", [{"q": "a ", "p": "b", "n": "c"}, {"q": "d", "p": "a", "n": "e"}])
    p = read_hub_pairs(str(repo), "train", "q", "p", "n")
    assert (p.anchor, p.positive, p.negative) == (["a", "d"], ["b", "a"], ["c", "e"])
    assert p.group.tolist() == [0, 0]
    assert p.name == f"{repo}/train"
    assert read_hub_pairs(str(repo), "train", "q", "p", None).negative is None
    with pytest.raises(PairsError, match=r"no column\(s\) \['neg'\]; its columns: \['q', 'p', 'n'\]"):
        read_hub_pairs(str(repo), "train", "q", "p", "neg")
    with pytest.raises(PairsError, match=r"repo/test: cannot be loaded .* Check the name and the split"):
        read_hub_pairs(str(repo), "test", "q", "p", None)


def test_hub_rows_are_checked_like_lines(tmp_path, offline_datasets):
    repo = tmp_path / "repo"
    _jsonl(repo / "train.jsonl", [{"q": "a", "p": "b"}, {"q": "c", "p": "  "}])
    with pytest.raises(PairsError, match=r"repo/train, row 2: 'p' is empty"):
        read_hub_pairs(str(repo), "train", "q", "p", None)
    saved = tmp_path / "saved"
    offline_datasets.Dataset.from_dict({"q": ["a"], "p": ["b"]}).save_to_disk(str(saved))
    with pytest.raises(PairsError, match="not a save_to_disk folder: write one with to_parquet"):
        read_hub_pairs(str(saved), "train", "q", "p", None)
