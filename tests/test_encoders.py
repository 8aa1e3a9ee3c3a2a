"""Model specs for evaluation: folders, runs, heads, A+B combinations, prefixes, vector cache."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from mtd.evaluation.specs import (
    ConcatEncoder,
    ModelSpecError,
    PrefixEncoder,
    ProjectedEncoder,
    StudentHeadEncoder,
    cached_encode,
    parse_models,
    student_heads,
    with_prefixes,
)
from mtd.training.pipeline import run


@pytest.fixture
def texts(tiny_assets):
    return (tiny_assets / "corpus.txt").read_text().splitlines()[:40]


def _st(folder, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_combination_equals_manual_concatenation(tiny_assets, texts):
    a, b = tiny_assets / "teacher_a", tiny_assets / "teacher_b"
    models = parse_models([f"a={a}", f"b={b}", "a+b"])
    assert list(models) == ["a", "b", "a+b"]
    combo = models["a+b"]
    assert isinstance(combo, ConcatEncoder) and combo.parts == [models["a"], models["b"]]
    manual = _unit(np.concatenate([_unit(_st(a, texts)), _unit(_st(b, texts))], axis=1))
    got = combo.encode(texts)
    assert got.shape == (len(texts), 32 + 48)
    np.testing.assert_allclose(got, manual, atol=1e-5)


def test_prefix_is_truncated_and_renormalized(tiny_assets, texts):
    models = parse_models([f"a={tiny_assets / 'teacher_a'}", "a@8"])
    assert isinstance(models["a@8"], PrefixEncoder)
    full = _unit(_st(tiny_assets / "teacher_a", texts))
    np.testing.assert_allclose(models["a@8"].encode(texts), _unit(full[:, :8]), atol=1e-5)
    with pytest.raises(ModelSpecError, match="prefix 999"):
        parse_models([f"{tiny_assets / 'teacher_a'}@999"])[f"{tiny_assets / 'teacher_a'}@999"].encode(texts)
    extra = with_prefixes(models, [4, 16])
    assert {"a@4", "a@16", "a@8@4"} <= set(extra)


@pytest.mark.parametrize("spec, problem", [
    ("no/such/folder", "not a folder"),
    ("x@0", "positive int"),
    ("x@abc", "positive int"),
])
def test_bad_specs_name_the_problem(spec, problem):
    with pytest.raises(ModelSpecError, match=problem):
        parse_models([spec])


def test_run_folder_heads_and_export(tiny_config, texts):
    run_dir = run(tiny_config("stages.0.steps=3", "stages.1.steps=3", "stages.2.steps=3"))
    models = parse_models([f"s={run_dir}", f"{run_dir}:fc16"])
    export = models["s"]
    assert export.folder == run_dir / "final"
    head = models[f"{run_dir}:fc16"]
    assert isinstance(head, StudentHeadEncoder) and head.encode(texts).shape == (len(texts), 16)
    heads = student_heads({"s": export})
    assert set(heads) == {"s", "s:fc1", "s:fc16"}
    # the export (fc1 through sentence-transformers) equals mtd's own fc1 head
    np.testing.assert_allclose(export.encode(texts), heads["s:fc1"].encode(texts), atol=1e-5)
    with pytest.raises(ModelSpecError, match="no head 'nope'"):
        parse_models([f"{run_dir}:nope"])[f"{run_dir}:nope"].encode(texts)


class _Counting:
    name, fingerprint = "counting", "fp-1"

    def __init__(self):
        self.calls = 0

    def encode(self, texts, role="document", batch_size=64):
        self.calls += 1
        return _unit(np.arange(1, 1 + 4 * len(texts), dtype=np.float32).reshape(len(texts), 4))


def test_vector_cache_reuses_by_model_role_and_texts(tmp_path):
    model = _Counting()
    first = cached_encode(model, ["a", "b"], "document", tmp_path)
    np.testing.assert_array_equal(cached_encode(model, ["a", "b"], "document", tmp_path), first)
    assert model.calls == 1
    cached_encode(model, ["a", "b"], "query", tmp_path)  # another role
    cached_encode(model, ["a", "c"], "document", tmp_path)  # other texts
    model.fingerprint = "fp-2"  # other weights
    cached_encode(model, ["a", "b"], "document", tmp_path)
    assert model.calls == 4


def test_corrupt_cached_vectors_are_encoded_again(tmp_path):
    model = _Counting()
    cached_encode(model, ["a", "b"], "document", tmp_path)
    (path,) = (tmp_path / "vectors").iterdir()
    path.write_bytes(b"garbage")
    np.testing.assert_array_equal(cached_encode(model, ["a", "b"], "document", tmp_path),
                                  model.encode(["a", "b"]))
    assert model.calls == 3  # first fill, the re-encode, and the reference call above
    assert np.load(path).shape == (2, 4)  # and the file was rewritten


def test_combination_is_built_from_cached_parts(tmp_path):
    a, b = _Counting(), _Counting()
    b.fingerprint = "fp-b"
    combo = ConcatEncoder("a+b", [a, b])
    direct = combo.encode(["x", "y"])
    assert (a.calls, b.calls) == (1, 1)
    cached_encode(a, ["x", "y"], "document", tmp_path)
    cached_encode(b, ["x", "y"], "document", tmp_path)
    np.testing.assert_allclose(cached_encode(combo, ["x", "y"], "document", tmp_path), direct, atol=1e-6)
    assert (a.calls, b.calls) == (2, 2)  # the combination encoded nothing itself
    prefix = PrefixEncoder("a@2", a, 2)
    np.testing.assert_allclose(cached_encode(prefix, ["x", "y"], "document", tmp_path),
                               prefix.encode(["x", "y"]), atol=1e-6)
    assert a.calls == 3  # only the reference call above


def test_prefix_must_keep_a_dimension():
    with pytest.raises(ModelSpecError, match="at least 1"):
        PrefixEncoder("m@-128", _Counting(), -128)


class _Fixed(_Counting):
    """Fixed random vectors per text (a stand-in teacher combination)."""

    def __init__(self, dim=12):
        super().__init__()
        self.dim = dim

    def encode(self, texts, role="document", batch_size=64):
        self.calls += 1
        return _unit(np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.dim)
                               for t in texts]).astype(np.float32))


def test_pca_projection_equals_numpy(tmp_path):
    inner = _Fixed()
    fit_texts = [f"fit {i}" for i in range(50)]
    fit = inner.encode(fit_texts)
    pca = ProjectedEncoder.pca("pca4", inner, fit, 4)
    # numpy's own PCA: the top-4 eigenvectors of the covariance, data centered on the fitting mean
    eigvals, eigvecs = np.linalg.eigh(np.cov(fit.astype(np.float64), rowvar=False))
    top = eigvecs[:, np.argsort(eigvals)[::-1][:4]]
    texts = ["a", "b", "c", "d", "e"]
    expected = _unit((inner.encode(texts) - fit.mean(axis=0)) @ top)
    got = pca.encode(texts)
    assert got.shape == (5, 4)
    # an axis' sign is arbitrary: compare each component up to sign
    signs = np.sign(np.sum(got * expected, axis=0))
    np.testing.assert_allclose(got, expected * signs, atol=1e-5)
    # saved and loaded (how the speed task's fresh process rebuilds it), cached via its inner model
    pca.save(tmp_path / "pca.npz")
    again = ProjectedEncoder.load("pca4", inner, tmp_path / "pca.npz")
    assert again.fingerprint == pca.fingerprint != inner.fingerprint
    calls = inner.calls
    np.testing.assert_allclose(cached_encode(again, texts, "document", tmp_path), got, atol=1e-6)
    cached_encode(inner, texts, "document", tmp_path)
    assert inner.calls == calls + 1  # the projection read its inner model's cached vectors


def test_pca_needs_enough_vectors():
    with pytest.raises(ModelSpecError, match=r"PCA to 8 dimensions needs 1 <= dim <= min\(N, D\)"):
        ProjectedEncoder.pca("pca8", _Fixed(), _Fixed().encode(["a", "b", "c"]), 8)
