"""Teachers: any sentence-transformers folder, or a plain transformers model with chosen pooling.

Teachers are loaded and run through sentence-transformers itself, so their vectors are exactly
the ones their authors publish (pooling, Dense, Normalize, prompts), and they only ever run while
the target cache is filled, never during student training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtd.config import TeacherConfig
from mtd.errors import MtdError
from mtd.hf import position_limit, resolve_model
from mtd.io import hash_folder, read_json, reading_weights

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherError(MtdError, RuntimeError):
    """A teacher that cannot be found or loaded."""


def teacher_folder(cfg: TeacherConfig) -> Path:
    """The teacher's local folder (a hub id downloaded), checked to hold safetensors weights."""
    return resolve_model(cfg.path, f"teacher {cfg.name}")


def pooling_of(folder: Path, configured: str) -> str:
    """The pooling a sentence-transformers folder declares, else the configured one."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return configured
    for module in read_json(modules):
        if module["type"].endswith("Pooling"):
            cfg = read_json(folder / module["path"] / "config.json")
            if "pooling_mode" in cfg:
                return str(cfg["pooling_mode"])
            modes = [k[len("pooling_mode_") :] for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            return "+".join(m.removesuffix("_tokens").removesuffix("_token") for m in modes)
    return "none"


def teacher_identity(cfg: TeacherConfig, folder: Path, hash_memo: Path | None = None) -> dict[str, Any]:
    """Everything that changes this teacher's vectors; part of the target cache key.

    hash_memo: where the weights' hash is remembered while the files keep their size and mtime
    (see mtd.io.hash_folder), so a start does not read every weight file again."""
    return {
        "name": cfg.name,
        "path": cfg.path,
        "weights_sha256": hash_folder(folder, hash_memo),
        "pooling": pooling_of(folder, cfg.pooling),
        "prompt": cfg.prompt,
        "max_length": cfg.max_length,
        "dtype": cfg.dtype,
    }


def load_teacher(cfg: TeacherConfig, folder: Path, device: str | None = None):
    """A SentenceTransformer for the teacher (the folder's own modules, or Transformer + Pooling)."""
    with reading_weights(folder):
        return _load_teacher(cfg, folder, device)


def _load_teacher(cfg: TeacherConfig, folder: Path, device: str | None):
    from sentence_transformers import SentenceTransformer, models

    if cfg.dtype not in DTYPES:
        raise TeacherError(f"teacher {cfg.name}: dtype {cfg.dtype!r} not in {list(DTYPES)}.")
    model_kwargs = {"dtype": DTYPES[cfg.dtype]}
    if (folder / "modules.json").is_file():
        model = SentenceTransformer(
            str(folder),
            device=device,
            trust_remote_code=cfg.trust_remote_code,
            model_kwargs=model_kwargs,
            local_files_only=True,
        )
    elif (folder / "config.json").is_file():
        transformer = models.Transformer(
            str(folder),
            model_kwargs={**model_kwargs, "trust_remote_code": cfg.trust_remote_code},
            config_kwargs={"trust_remote_code": cfg.trust_remote_code},
            processor_kwargs={"trust_remote_code": cfg.trust_remote_code},
        )
        pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=cfg.pooling)
        model = SentenceTransformer(modules=[transformer, pooling], device=device)
    else:
        raise TeacherError(
            f"teacher {cfg.name}: {folder} has neither modules.json (sentence-transformers) "
            "nor config.json (transformers). Point the path at the model's folder."
        )
    if cfg.max_length is not None:
        _check_max_length(cfg, model)
        model.max_seq_length = cfg.max_length
    model.eval()
    return model


def _check_max_length(cfg: TeacherConfig, model) -> None:
    """A max_length beyond the model's positions would crash on the first long text."""
    auto_model = getattr(model[0], "auto_model", None)
    limit = position_limit(auto_model) if auto_model is not None else None
    if limit is not None and cfg.max_length > limit:
        raise TeacherError(f"teacher {cfg.name}: max_length={cfg.max_length} is more than the {limit} "
                           f"positions the model takes. Set its max_length to {limit} or less.")


def encode(model, texts: list[str], cfg: TeacherConfig) -> np.ndarray:
    """(N, D) float32 teacher vectors, as the model's own encode() returns them."""
    return model.encode(
        texts,
        batch_size=cfg.batch_size,
        prompt=cfg.prompt or None,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype(np.float32, copy=False)


def embedding_dim(model) -> int:
    return int(model.get_embedding_dimension())
