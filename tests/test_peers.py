"""bench/peers.py: the pieces that run without models (the whole script runs with --smoke)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_peers_section_created_replaced_or_appended(peers):
    new = peers.replace_section("", "Peers", "table 1")
    assert new == "# Results\n\n## Peers\n\ntable 1\n"
    doc = "# Results\n\nintro\n\n## Peers\n\nold table\n\n## Images\n\nkept\n"
    again = peers.replace_section(doc, "Peers", "new table\n")
    assert again == "# Results\n\nintro\n\n## Peers\n\nnew table\n\n## Images\n\nkept\n"
    assert peers.replace_section(again, "Peers", "new table") == again  # rerunning changes nothing
    other = peers.replace_section("# Results\n\n## Peers of peers\n\nx\n", "Peers", "t")
    assert other == "# Results\n\n## Peers of peers\n\nx\n\n## Peers\n\nt\n"  # appended, not clobbered


def test_run_without_config_names_the_fix(peers, tmp_path):
    with pytest.raises(peers.PeersError, match=r"no config.yaml, so not an mtd run\. Train one first"):
        peers.run_config(tmp_path, None)
