"""Shared fixtures: tiny random teachers + tokenizer + corpus, built once per test session."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mtd.config import RunConfig, load_config
from mtd.synthetic import make_tiny_assets

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with tokenizer/, corpus.txt (3000 texts), teacher_a/ (32-d) and teacher_b/ (48-d)."""
    return make_tiny_assets(tmp_path_factory.mktemp("tiny-assets"))


@pytest.fixture
def tiny_config(tiny_assets: Path, tmp_path: Path) -> Callable[..., RunConfig]:
    """`tiny_config(*overrides)` -> configs/tiny.yaml with every path on the session's tiny assets.

    output_dir and cache_dir live under this test's tmp_path; extra dotted overrides
    (e.g. "train.seed=3") are applied after the path overrides.
    """

    def make(*overrides: str) -> RunConfig:
        q = lambda p: json.dumps(str(p))  # noqa: E731  (quoted: YAML-safe whatever the path)
        paths = [
            f"synthetic_assets={q(tiny_assets)}",
            f"output_dir={q(tmp_path / 'runs')}",
            f"cache_dir={q(tmp_path / 'cache')}",
            f"teachers.0.path={q(tiny_assets / 'teacher_a')}",
            f"teachers.1.path={q(tiny_assets / 'teacher_b')}",
            f"data.corpus=[{q(tiny_assets / 'corpus.txt')}]",
            f"student.path={q(tiny_assets / 'tokenizer')}",
        ]
        return load_config(TINY_YAML, overrides=paths + list(overrides))

    return make


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP threads
    waiting on each other make every step ~100x slower. (Speed tests set their own threads.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One target cache for every run (content-addressed by teacher and corpus, so sharing is safe)."""
    return tmp_path_factory.getbasetemp() / "shared-target-cache"


@pytest.fixture
def config(tiny_config, shared_cache) -> Callable[..., RunConfig]:
    """tiny_config, with the target cache shared between tests (building it is the slow part)."""
    return lambda *overrides: tiny_config(f"cache_dir={json.dumps(str(shared_cache))}", *overrides)


@pytest.fixture
def offline_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`datasets`, never reaching the network, caching under this test's tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these once, at import: set the values they use too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    return datasets


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def unseen_data(tiny_assets: Path, tmp_path: Path) -> Path:
    """A made-up STS set (tsv) and a made-up BEIR set built from the tiny corpus (eval.py's data
    layouts)."""
    texts = (tiny_assets / "corpus.txt").read_text().splitlines()[:60]
    rng = random.Random(0)
    root = tmp_path / "data"
    sts = root / "my-sts" / "test.tsv"
    sts.parent.mkdir(parents=True)
    lines = ["sentence1\tsentence2\tscore"]
    lines += [f"{texts[i]}\t{texts[i + 1]}\t{rng.uniform(0, 5):.2f}" for i in range(0, 40, 2)]
    sts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    beir = root / "my-ir"
    corpus = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(texts)]
    _write_jsonl(beir / "corpus.jsonl", corpus)
    _write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": texts[i][:20]} for i in range(10)])
    qrels = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t{1 + i % 2}" for i in range(10)]
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def bench_script() -> Iterator[Callable]:
    """bench_script(NAME) -> bench/NAME.py as a module, registered in sys.modules (its dataclasses
    look their module up there) until the session ends."""
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
