"""python -m mtd.reduce: smaller vectors of any sentence-transformers model, exported as that
model plus Dense and Normalize."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtd.config import DataConfig, TeacherConfig
from mtd.data.corpus import corpus_of, read_corpus
from mtd.reduce import dev_size_for, fit_self, main, reduce_model
from mtd.targets.cache import build_teacher_cache, cached_targets

ROOT = Path(__file__).resolve().parents[1]
TEXTS, DEV = 300, 30  # corpus texts used, held out for dev (a tenth)
FAST = {"max_texts": TEXTS, "dev_size": DEV, "steps": 40, "batch_size": 16, "lr": 1e-2}


def flags(**kw) -> list[str]:
    return [f for k, v in kw.items() for f in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def normalized_model(tiny_assets, tmp_path_factory) -> Path:
    """teacher_a (Transformer, mean Pooling) with a Normalize at the end, as most published models."""
    from sentence_transformers import SentenceTransformer, models

    st = SentenceTransformer(str(tiny_assets / "teacher_a"), device="cpu")
    folder = tmp_path_factory.mktemp("normalized") / "teacher_n"
    SentenceTransformer(modules=[*st, models.Normalize()], device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reduce-cache")


@pytest.fixture(scope="module")
def reduced(tiny_assets, normalized_model, cache_dir, tmp_path_factory) -> dict:
    """{(model, method): (source folder, {dim: exported folder})}, made by the command itself."""
    out = tmp_path_factory.mktemp("reduced")
    made = {}
    for source in (tiny_assets / "teacher_a", normalized_model):
        for method in ("self", "pca"):
            argv = [str(source), "--dims", "16,8", "--corpus", str(tiny_assets / "corpus.txt"),
                    "--out", str(out), "--method", method, "--cache-dir", str(cache_dir), *flags(**FAST)]
            assert main(argv) == 0
            made[source.name, method] = source, {d: out / f"{source.name}-{method}-{d}" for d in (16, 8)}
    return made


def train_vectors(tiny_assets, cache_dir, name: str, path: Path) -> np.ndarray:
    """The cached full-size vectors of the training texts, as the command reads them."""
    texts = read_corpus([tiny_assets / "corpus.txt"], max_texts=TEXTS).train
    vectors = cached_targets([TeacherConfig(name=name, path=str(path))], texts, cache_dir)[0]
    return np.asarray(vectors[: len(texts) - dev_size_for(len(texts), DEV)], dtype=np.float64)


@pytest.mark.parametrize("method", ["self", "pca"])
@pytest.mark.parametrize("source", ["teacher_a", "teacher_n"])
def test_export_round_trip(reduced, tiny_assets, source, method):
    """SentenceTransformer(out) loads with no mtd code and gives the model's normalized vectors
    through its Dense, renormalized; a model that already normalizes gets no second Normalize."""
    from sentence_transformers import SentenceTransformer, models

    folder, outs = reduced[source, method]
    texts = (tiny_assets / "corpus.txt").read_text().splitlines()[:50]
    model = SentenceTransformer(str(folder), device="cpu")
    full = torch.nn.functional.normalize(torch.from_numpy(model.encode(texts)), dim=-1)
    ends_normalized = isinstance(list(model)[-1], models.Normalize)
    assert ends_normalized == (source == "teacher_n")
    for dim, out in outs.items():
        small = SentenceTransformer(str(out), device="cpu")
        kinds = [type(m).__name__ for m in small]
        assert kinds == ["Transformer", "Pooling", "Normalize", "Dense", "Normalize"]
        dense = small[3]
        assert small.get_embedding_dimension() == dim and dense.linear.weight.shape == (dim, 32)
        expected = torch.nn.functional.normalize(full @ dense.linear.weight.T + dense.linear.bias, dim=-1)
        got = small.encode(texts, convert_to_tensor=True)
        assert got.shape == (len(texts), dim)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [16, 8])
def test_pca_equals_numpy_svd(reduced, tiny_assets, cache_dir, dim):
    """The exported Dense projects exactly as numpy's SVD of the centered training vectors (up
    to each component's sign)."""
    from sentence_transformers import SentenceTransformer

    folder, outs = reduced["teacher_a", "pca"]
    x = train_vectors(tiny_assets, cache_dir, "teacher_a", folder)
    centered = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    expected = centered @ vt[:dim].T
    dense = SentenceTransformer(str(outs[dim]), device="cpu")[3].linear
    got = x @ dense.weight.detach().double().numpy().T + dense.bias.detach().double().numpy()
    signs = np.sign((got * expected).sum(axis=0))
    np.testing.assert_allclose(got, expected * signs, atol=1e-4)
    # the sign is a function of the data: each component's largest entry is positive
    weight = dense.weight.detach().numpy()
    assert (weight[np.arange(dim), np.abs(weight).argmax(axis=1)] > 0).all()


def test_self_target_has_no_grad():
    """The model's vectors are the target and the input: neither may receive gradients."""
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(120, 24), dim=-1).requires_grad_()
    heads = fit_self(vectors[:100], vectors[100:], [8], steps=3, batch_size=16, lr=1e-2, seed=0)
    assert vectors.grad is None
    assert not heads[8].weight.requires_grad


@pytest.mark.parametrize("init", ["random", "pca"])
def test_self_distillation_learns(tiny_assets, cache_dir, tmp_path, init):
    """The dev sim loss falls from its start (a random map, or the PCA map) after training."""
    rows = reduce_model(tiny_assets / "teacher_a", [16, 8], [tiny_assets / "corpus.txt"], tmp_path,
                        init=init, cache_dir=cache_dir, **FAST)
    for row in rows:
        assert row["dev_sim"] < row["dev_sim_start"] * (0.75 if init == "random" else 1.0), row


def test_runs_are_reproducible(tiny_assets, cache_dir, tmp_path):
    """The same seed gives the same maps; another seed other ones."""
    from sentence_transformers import SentenceTransformer

    def weight(out: Path, seed: int) -> torch.Tensor:
        reduce_model(tiny_assets / "teacher_a", [8], [tiny_assets / "corpus.txt"], out, init="random",
                     seed=seed, cache_dir=cache_dir, **FAST)
        return SentenceTransformer(str(out / "teacher_a-self-8"), device="cpu")[3].linear.weight

    first = weight(tmp_path / "a", 0)
    torch.testing.assert_close(weight(tmp_path / "b", 0), first, rtol=0, atol=0)
    assert not torch.equal(weight(tmp_path / "c", 1), first)


def test_cache_is_reused(tiny_assets, tmp_path, monkeypatch):
    """A run on the teacher cache a training run of the same teacher (name, path, max_length) and
    corpus filled encodes nothing, nor does a second run."""
    from sentence_transformers import SentenceTransformer

    cache = tmp_path / "cache"
    corpus = tiny_assets / "corpus.txt"
    teacher = TeacherConfig(name="ta", path=str(tiny_assets / "teacher_a"), max_length=16)
    texts = corpus_of(DataConfig(corpus=[str(corpus)], max_texts=TEXTS, dev_size=DEV)).texts
    build_teacher_cache(teacher, texts, cache)  # as train.py fills it
    folders = sorted(cache.iterdir())

    def never(*args, **kwargs):
        raise AssertionError("the model encoded texts although their vectors are cached")

    monkeypatch.setattr(SentenceTransformer, "encode", never)
    for method in ("pca", "self"):
        reduce_model(teacher.path, [8], [corpus], tmp_path / "out", method=method, name="ta", max_length=16,
                     cache_dir=cache, **FAST)
    assert sorted(cache.iterdir()) == folders
    # max_length set how the corpus was encoded; the output keeps the model's own 32 tokens
    assert SentenceTransformer(str(tmp_path / "out" / "ta-self-8"), device="cpu").max_seq_length == 32


# ------------------------------------------------------------------------------- bad input


@pytest.fixture
def cli(tiny_assets, tmp_path, caplog):
    """cli(*argv, model=..., corpus=...) -> (exit code, logged errors) of `python -m mtd.reduce`."""

    def run(*argv: str, model: Path | None = None, corpus: Path | None = None,
            dims: str = "8") -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = main([str(model or tiny_assets / "teacher_a"), "--dims", dims, "--corpus",
                         str(corpus or tiny_assets / "corpus.txt"), "--out", str(tmp_path / "out"),
                         "--cache-dir", str(tmp_path / "cache"), *flags(**FAST), *argv])
        return code, " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)

    return run


def test_missing_model(cli, tmp_path):
    code, said = cli(model=tmp_path / "nope")
    assert code == 2 and "is not a folder on this machine" in said and "Fix the path" in said


def test_not_a_sentence_transformers_folder(cli, tiny_assets, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_assets / "teacher_a", plain)
    (plain / "modules.json").unlink()  # a transformers folder with weights, no sentence-transformers modules
    code, said = cli(model=plain)
    assert code == 2 and "is not a sentence-transformers folder" in said and "modules.json" in said


@pytest.mark.parametrize("dims, expected", [
    ("", "--dims is empty"), (",", "--dims is empty"), ("8,x", "give whole numbers"),
    ("8,0", "sizes must be at least 1"), ("-4", "sizes must be at least 1"),
    ("8,32", "dims larger than the model's"), ("64", "Give sizes from 1 to 31"),
])
def test_bad_dims(cli, dims, expected):
    code, said = cli(dims=dims)
    assert code == 2 and expected in said, said


@pytest.mark.parametrize("argv, expected", [
    (["--method", "svd"], "Unknown --method 'svd'"),
    (["--init", "zeros"], "Unknown --init 'zeros'"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: must be above 0"),
])
def test_bad_options(cli, argv, expected):
    code, said = cli(*argv)
    assert code == 2 and expected in said, said


def test_empty_corpus(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, said = cli(corpus=empty)
    assert code == 2 and "holds no text" in said


def test_fewer_texts_than_the_batch(cli, tiny_assets, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("\n".join((tiny_assets / "corpus.txt").read_text().splitlines()[:20]) + "\n")
    code, said = cli("--batch-size", "24", corpus=few)
    assert code == 2 and "18 training texts" in said and "fewer than --batch-size 24" in said


def test_pca_needs_as_many_texts_as_dims(cli, tiny_assets, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("\n".join((tiny_assets / "corpus.txt").read_text().splitlines()[:20]) + "\n")
    code, said = cli("--batch-size", "4", "--method", "pca", corpus=few, dims="24")
    assert code == 2 and "PCA to 24 dims needs at least 24 training texts" in said


def test_out_exists(cli, tmp_path):
    assert cli("--method", "pca")[0] == 0
    code, said = cli("--method", "pca")
    assert code == 2 and "already holds a sentence-transformers model" in said and "--overwrite" in said
    assert cli("--method", "pca", "--overwrite")[0] == 0


def test_out_inside_the_model(cli, tiny_assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_assets / "teacher_a", model)
    code, said = cli("--out", str(model / "small"), model=model)
    assert code == 2 and "inside the model's folder" in said
    assert not (model / "small").exists()


# ------------------------------------------------------------------------- bench/reduce_table.py


@pytest.fixture(scope="module")
def reduce_table(bench_script):
    return bench_script("reduce_table")


def test_bench_scores_what_eval_py_scores(reduce_table, tiny_assets, unseen_data, tmp_path):
    """The table's scores, derived from the full model's vectors through each output's Dense,
    equal eval.py's on the exported folders; both methods and sizes, the full model first."""
    common = ["--model", str(tiny_assets / "teacher_a"), "--name", "ta", "--max-length", "16",
              "--corpus", str(tiny_assets / "corpus.txt"), "--max-texts", str(TEXTS), "--dims", "16,8",
              "--cache-dir", str(tmp_path / "cache"), "--eval-cache", str(tmp_path / "vectors"),
              "--data", str(unseen_data), "--threads", "1", *flags(steps=20, batch_size=16, dev_size=DEV)]
    derived, by_eval = tmp_path / "derived.json", tmp_path / "eval.json"
    assert reduce_table.main([*common, "--work", str(tmp_path / "a"), "--out", str(derived)]) == 0
    assert reduce_table.main([*common, "--work", str(tmp_path / "b"), "--out", str(by_eval),
                              "--eval-cli"]) == 0
    ours, theirs = json.loads(derived.read_text()), json.loads(by_eval.read_text())
    labels = {"self-16", "pca-16", "self-8", "pca-8"}
    assert set(ours["scoring"]["max_abs_diff_own_vs_derived"]) == labels
    assert max(ours["scoring"]["max_abs_diff_own_vs_derived"].values()) < 1e-5
    assert set(ours["scores"]) == {"ta", *labels} == set(theirs["scores"])
    for model, scores in ours["scores"].items():
        assert set(scores) == {"my-sts/test spearman", "my-ir/test ndcg@10"}
        assert scores == pytest.approx(theirs["scores"][model], abs=1e-3), model
    table = derived.with_suffix(".md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in table[2:7]] == [
        ["| full", "ta"], ["| 16", "self"], ["| 16", "pca"], ["| 8", "self"], ["| 8", "pca"]]
    assert "--eval-cli" not in table[-1] and "--dims 16,8" in table[-1]
