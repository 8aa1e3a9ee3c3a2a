"""The student: a transformers encoder, mean pooling, and named fully connected heads.

A head maps the pooled hidden state to an output size: the multi-teacher target size ("fc1" in
Jasper) or smaller sizes for dimension reduction. The student turns token ids into vectors and
nothing else; losses and training live elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mtd.errors import MtdError
from mtd.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
STUDENT_FILE = "student.json"


class StudentError(MtdError, ValueError):
    """A student that cannot be built as configured."""


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): average over real tokens, as sentence-transformers does."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Student(nn.Module):
    def __init__(self, encoder: nn.Module, head_dims: dict[str, int]):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, dim) for name, dim in head_dims.items()})

    @property
    def head_dims(self) -> dict[str, int]:
        return {name: head.out_features for name, head in self.heads.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, T) token ids -> {head: (B, D_head)} unnormalized vectors."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)  # (B, H)
        return {name: head(pooled) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------
# Building


def transformer_subfolder(folder: Path) -> Path:
    """Where the transformers weights sit: a sentence-transformers folder may nest them."""
    modules = folder / "modules.json"
    if modules.is_file():
        for module in read_json(modules):
            if module["type"].endswith("Transformer"):
                return folder / module["path"]
    return folder


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer blocks (BERT, MPNet, RoBERTa, XLM-R, ModernBERT, ...)."""
    n = model.config.num_hidden_layers
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise StudentError(f"Could not find the {n} encoder layers of {type(model).__name__}.")
    return candidates[0]


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only `layers` (e.g. [0, 3, 6, 9]) of the encoder, in that order (seed 001, option 2)."""
    blocks = layer_list(model)
    n = len(blocks)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers or len(set(layers)) != len(layers):
        raise StudentError(f"student.layers={layers}: need distinct indices in 0..{n - 1}.")
    kept = [blocks[i] for i in layers]
    blocks._modules.clear()
    for _i, block in enumerate(kept):
        blocks.append(block)
    model.config.num_hidden_layers = len(layers)
    return model


def build_encoder(
    init: str,
    path: str | Path | None,
    layers: list[int] | None,
    model_config: dict[str, Any],
    trust_remote_code: bool = False,
):
    """(encoder, tokenizer) from scratch (config + tokenizer folder) or from pretrained weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if path is None:
        raise StudentError("The student needs a path: the tokenizer (scratch) or the weights.")
    folder = transformer_subfolder(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if init == "scratch":
        cfg = dict(model_config)
        if "model_type" not in cfg:
            raise StudentError("student.model_config needs model_type (e.g. bert) for init=scratch.")
        cfg.setdefault("vocab_size", len(tokenizer))
        encoder = AutoModel.from_config(AutoConfig.for_model(**cfg))
    else:
        encoder = AutoModel.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    if layers is not None:
        keep_layers(encoder, layers)
    return encoder, tokenizer


def resolve_head_dims(heads: dict[str, Any], target_dim: int) -> dict[str, int]:
    return {name: target_dim if dim == "target" else int(dim) for name, dim in heads.items()}


# ---------------------------------------------------------------------------------------------
# Saving, loading, encoding


def save_student(student: Student, tokenizer, folder: str | Path, max_length: int) -> None:
    """mtd's own format: encoder/ (transformers, safetensors), heads.safetensors, student.json."""
    folder = Path(folder)
    student.encoder.save_pretrained(folder / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "encoder")
    state = {k: v.detach().contiguous().cpu() for k, v in student.heads.state_dict().items()}
    save_file(state, str(folder / HEADS_FILE))
    atomic_write_json(folder / STUDENT_FILE, {"heads": student.head_dims, "max_length": max_length})


def load_student(folder: str | Path):
    """(student, tokenizer, max_length) saved by `save_student`."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / STUDENT_FILE).is_file():
        raise StudentError(f"{folder} is not an mtd student folder (no {STUDENT_FILE}).")
    meta = read_json(folder / STUDENT_FILE)
    encoder = AutoModel.from_pretrained(folder / "encoder", use_safetensors=True)
    student = Student(encoder, meta["heads"])
    student.heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(folder / "encoder")
    return student, tokenizer, int(meta["max_length"])


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def encode(
    student: Student,
    tokenizer,
    texts: list[str],
    head: str,
    max_length: int,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """(N, D_head) L2-normalized float32 vectors of one head, batches sorted by length for speed."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), student.head_dims[head]), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="encode"):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, [texts[i] for i in idx], max_length).items()}
        vec = student(**batch)[head].float()
        out[idx] = torch.nn.functional.normalize(vec, dim=-1).cpu().numpy()
    student.train(was_training)
    return out


def set_trainable(student: Student, mode: str, heads: list[str]) -> list[str]:
    """Freeze all but the stage's part: "heads", "all", or "last:K" (heads + last K layers).

    Returns the names of the trainable parameters. Heads a stage does not name stay frozen.
    """
    student.requires_grad_(False)
    for name in heads:
        student.heads[name].requires_grad_(True)
    if mode == "all":
        student.encoder.requires_grad_(True)
    elif mode.startswith("last:"):
        blocks = layer_list(student.encoder)
        k = int(mode.removeprefix("last:"))
        if not 0 < k <= len(blocks):
            raise StudentError(f"train=last:{k} but the encoder has {len(blocks)} layers.")
        for block in list(blocks)[-k:]:
            block.requires_grad_(True)
    elif mode != "heads":
        raise StudentError(f"Unknown train mode {mode!r}: use heads, all or last:K.")
    if getattr(student.encoder, "pooler", None) is not None:
        # Mean pooling never reads the [CLS] pooler; trainable, DDP would wait for its gradients.
        student.encoder.pooler.requires_grad_(False)
    return [n for n, p in student.named_parameters() if p.requires_grad]
