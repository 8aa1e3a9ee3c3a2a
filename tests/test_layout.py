"""The package layout shows the data flow: no module imports from a layer below it (README Layout)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

MTD = Path(__file__).resolve().parents[1] / "mtd"
# Lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"errors", "io", "hf", "config", "compat", "synthetic"},
    {"data"},
    {"targets"},
    {"models"},
    {"losses"},
    {"export", "onnx"},
    {"reduce"},  # `python -m mtd.reduce`: a model's smaller vectors, exported like a student
    {"evaluation"},
    {"training"},
    {"cache", "layers"},  # commands over the training pipeline: mtd.cache, mtd.layers
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtd."):
            found.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "mtd":
            found += [f"mtd.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("mtd.")]
    return found


@pytest.mark.parametrize("path", sorted(p for p in MTD.rglob("*.py") if p.name != "__init__.py"),
                         ids=lambda p: str(p.relative_to(MTD)))
def test_no_module_imports_upward(path):
    here = layer_of("mtd." + ".".join(path.relative_to(MTD).with_suffix("").parts))
    upward = [m for m in imports(path) if layer_of(m) > here]
    assert not upward, f"{path.relative_to(MTD)} imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", sorted(p for p in MTD.rglob("*.py") if p.name != "io.py"),
                         ids=lambda p: str(p.relative_to(MTD)))
def test_safetensors_are_read_through_one_helper(path):
    """mtd.io.load_safetensors names a truncated or missing file; a bare load_file names none."""
    text = path.read_text()
    assert "load_file(" not in text and "safe_open(" not in text, (
        f"{path.relative_to(MTD)}: read safetensors with mtd.io.load_safetensors (or wrap a library "
        "load in mtd.io.reading_weights)")


# Packages only some evaluations use, which a GPU machine may lack: training, the cache CLI and the
# end-of-run report must import without them.
EVAL_ONLY = ("faiss", "pytrec_eval", "open_clip", "onnx", "onnxruntime")


def test_training_imports_without_evaluation_only_packages():
    hide = "".join(f"sys.modules[{name!r}] = None; " for name in EVAL_ONLY)  # import raises ImportError
    code = f"import sys; {hide}import mtd.training.pipeline, mtd.cache, mtd.evaluation.report, train"
    proc = subprocess.run([sys.executable, "-c", code], cwd=MTD.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("path", sorted(MTD.rglob("*.py")), ids=lambda p: str(p.relative_to(MTD)))
def test_datasets_is_imported_only_where_used(path):
    """`datasets` (hub data sets, image sets from the hub) is imported inside the functions that use
    it, never at a module's top, so machines without it train and evaluate local data."""
    top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.partition(".")[0] == "datasets"], (
        f"{path.relative_to(MTD)} imports datasets at the top: import it inside the function using it")
