"""Notebooks execute headlessly from a clean kernel (house style rule 13)."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mtd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STSB_TEST = ROOT.parent / "shared" / "data" / "sts" / "stsb" / "test.jsonl"
# Plots each notebook shows on the tiny run: analysis.ipynb's quality-speed plot needs STS-B test.
PLOTS = {"inspect_run.ipynb": 2, "analysis.ipynb": 3 + STSB_TEST.is_file()}


def tiny_run(output_dir: Path) -> Path:
    """configs/tiny.yaml trained into output_dir (about a minute on 2 CPU cores)."""
    from mtd.training.pipeline import run

    overrides = ["name=analysis-tiny", "train.log_every=2", f"output_dir={json.dumps(str(output_dir))}"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    return run(cfg, resume=False)


def set_parameters(nb: nbformat.NotebookNode, values: dict[str, str]) -> None:
    """Papermill's way: a cell after the first one, tagged "parameters", sets new values."""
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), \
        "the first cell holds the parameters, tagged 'parameters'"
    for name in values:
        assert re.search(rf"^{name} = ", first.source, flags=re.M), f"no parameter {name} in the first cell"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    # The notebook writes its run under the project; keep it out of the developer's runs/.
    monkeypatch.setenv("MTD_NOTEBOOK_OUTPUT", str(tmp_path))
    # The kernel (and the processes it starts) import this checkout's mtd, whichever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if path.name == "analysis.ipynb":
        monkeypatch.chdir(ROOT)  # the tiny config's paths are relative to the project root
        # A run of its own, and no peers' results: the notebook scores the run itself instead.
        set_parameters(nb, {"RUN": str(tiny_run(tmp_path)), "PEERS": str(tmp_path / "no-peers.json")})
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    # Plots show inline (no headless backend forced), and progress bars do not flood the cells.
    plots = sum("image/png" in o.get("data", {}) for o in outputs)
    assert plots >= PLOTS.get(path.name, 1), f"{plots} plots displayed"
    assert len(outputs) < 40, f"{len(outputs)} outputs: progress bars or logs flood the notebook"


def test_analysis_notebook_studies_the_default_run_unless_told():
    first = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4).cells[0]
    assert first.metadata.get("tags") == ["parameters"]
    assert re.search(r'^RUN = "runs/default"', first.source, flags=re.M)
