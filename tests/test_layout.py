"""The package layout shows the data flow: no module imports from a layer below it (README Layout)."""

from __future__ import annotations

import ast
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
    {"export"},
    {"evaluation"},
    {"training"},
    {"cache"},  # `python -m mtd.cache`: a run's first step, over the training pipeline
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
