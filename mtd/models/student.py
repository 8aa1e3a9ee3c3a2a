"""The student: a transformers encoder, mean pooling, and named fully connected heads, optionally
with an image path (vision tower -> projection pool -> the same encoder; models/projection.py).

A head maps the pooled hidden state to an output size: the multi-teacher target size ("fc1" in
Jasper) or smaller sizes for dimension reduction. The student turns token ids or pixels into
vectors and nothing else; losses and training live elsewhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mtd.errors import MtdError
from mtd.hf import position_limit, require_weights, transformer_subfolder
from mtd.io import atomic_write_json, load_safetensors, read_json, reading_weights

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
# forward() output key of a head's learned ckd logit scale (1 / temperature), e.g. "logit_scale:fc1"
LOGIT_SCALE = "logit_scale:"
MAX_LOGIT_SCALE = 100.0  # temperature at least 0.01, as CLIP clamps its logit scale
IMAGE_FILE = "image.safetensors"
STUDENT_FILE = "student.json"
# A damaged student folder is rebuilt from the run's last stage-end checkpoint.
STUDENT_FIX = ("run its config again with --resume (the finished run rebuilds student/ and final/ "
               "from its last checkpoint), or copy the folder again from where it came from")


class StudentError(MtdError, ValueError):
    """A student that cannot be built as configured."""


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): average over real tokens, as sentence-transformers does."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Student(nn.Module):
    def __init__(self, encoder: nn.Module, head_dims: dict[str, int], image=None):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, dim) for name, dim in head_dims.items()})
        self.image = image  # models.projection.ImagePath or None (text only)
        # head -> log(1 / temperature) of its ckd term, where a stage learns it. Kept on the model
        # (as CLIP keeps its logit scale) so that DDP/FSDP train it like any weight; never exported.
        self.log_scales = nn.ParameterDict()
        # Trainable weights are float32 whatever a checkpoint stores (transformers 5 keeps a
        # float16 file's dtype): half-precision master weights lose small updates (NaN under
        # bf16 autocast, dtype clashes without it). Mixed precision is Accelerate's autocast.
        self.float()

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The encoder's block classes (transformers' convention): FSDP's default auto-wrap policy
        under Accelerate makes each block a unit of its own."""
        return getattr(self.encoder, "_no_split_modules", None)

    def add_logit_scale(self, head: str, temperature: float) -> None:
        """A learned ckd temperature for `head`, starting at `temperature` (kept if it exists)."""
        if head not in self.log_scales:
            self.log_scales[head] = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    @property
    def head_dims(self) -> dict[str, int]:
        return {name: head.out_features for name, head in self.heads.items()}

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                vision_tokens: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, T) token ids, (B, 3, H, W) pixels, a frozen tower's (B, N, Dv) tokens, or a frozen
        encoder's (B, H) pooled outputs (see pooled_features) -> {head: (B, D_head)} unnormalized
        vectors, and each learned logit scale as a 0-d tensor under LOGIT_SCALE + head."""
        if pooled is None:
            pooled = self.pool(input_ids, attention_mask, pixel_values, vision_tokens)
        out = {name: head(pooled) for name, head in self.heads.items()}
        return out | {LOGIT_SCALE + h: p.exp().clamp(max=MAX_LOGIT_SCALE) for h, p in self.log_scales.items()}

    def pool(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None,
             vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's mean-pooled (B, H) output, which every head reads."""
        if pixel_values is not None or vision_tokens is not None:
            if self.image is None:
                raise StudentError("This student has no image path (student.vision is not set).")
            embeds, attention_mask = self.image(pixel_values, self.encoder.get_input_embeddings(),
                                                tokens=vision_tokens)
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


# ---------------------------------------------------------------------------------------------
# Building


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
        with reading_weights(folder):
            encoder = AutoModel.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=trust_remote_code
            )
    if layers is not None:
        keep_layers(encoder, layers)
    return encoder, tokenizer


def student_from_sentence_transformer(path: str | Path):
    """(student, tokenizer) computing exactly a sentence-transformers model's vectors: its encoder,
    mean pooling, and its Dense layer as head "fc1" (an identity head where it has none). The text
    side that stage 4 can align images to when there is no mtd run."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    modules = read_json(folder / "modules.json") if (folder / "modules.json").is_file() else None
    if modules is None:
        raise StudentError(f"{folder} is not a sentence-transformers folder (no modules.json).")
    kinds = {m["type"].rsplit(".", 1)[-1]: folder / m["path"] for m in modules}
    pooling = read_json(kinds["Pooling"] / "config.json") if "Pooling" in kinds else {}
    unknown = set(kinds) - {"Transformer", "Pooling", "Dense", "Normalize"}
    mean = pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens") is True
    if not mean or unknown or len(modules) - len(kinds):
        raise StudentError(f"{folder}: the student's text side is Transformer + mean Pooling + at most "
                           f"one Dense (+ Normalize); this model has {[m['type'] for m in modules]}.")
    with reading_weights(kinds["Transformer"]):
        encoder = AutoModel.from_pretrained(kinds["Transformer"], use_safetensors=True).float()
    tokenizer = AutoTokenizer.from_pretrained(kinds["Transformer"])
    hidden = encoder.config.hidden_size
    if "Dense" in kinds:
        dense = read_json(kinds["Dense"] / "config.json")
        if not dense.get("activation_function", "").endswith("Identity"):
            raise StudentError(f"{folder}: a Dense layer with {dense['activation_function']} is not "
                               "a linear head; only identity-activation Dense layers can be heads.")
        student = Student(encoder, {"fc1": int(dense["out_features"])})
        state = {k.removeprefix("linear."): v.float()
                 for k, v in load_safetensors(kinds["Dense"] / "model.safetensors").items()}
        state.setdefault("bias", torch.zeros(int(dense["out_features"])))  # Dense(bias=False)
        student.heads["fc1"].load_state_dict(state)
    else:
        student = Student(encoder, {"fc1": hidden})
        with torch.no_grad():
            student.heads["fc1"].weight.copy_(torch.eye(hidden))
            student.heads["fc1"].bias.zero_()
    return student, tokenizer


def resolve_head_dims(heads: dict[str, Any], target_dim: int) -> dict[str, int]:
    return {name: target_dim if dim == "target" else int(dim) for name, dim in heads.items()}


def check_positions(student: Student, max_length: int) -> None:
    """Refuse inputs longer than the encoder has positions for, before any training: the first
    batch that long would crash mid-stage. An image takes its K vision tokens plus the markers and
    the begin/end tokens."""
    limit = position_limit(student.encoder)
    if limit is None:
        return
    if max_length > limit:
        raise StudentError(
            f"student.max_length={max_length} is more than the {limit} positions the student's "
            f"encoder ({type(student.encoder).__name__}) takes. Set student.max_length to {limit} "
            "or less.")
    image = student.image
    if image is not None:
        length = image.projection.tokens + 2 + sum(i is not None for i in (image.begin_id, image.end_id))
        if length > limit:
            raise StudentError(
                f"student.vision.tokens={image.projection.tokens}: an image then takes {length} "
                f"positions (with its markers and begin/end tokens), more than the {limit} the "
                f"student's encoder takes. Lower student.vision.tokens by {length - limit}.")


# ---------------------------------------------------------------------------------------------
# Saving, loading, encoding


def save_student(student: Student, tokenizer, folder: str | Path, max_length: int,
                 matryoshka: dict[str, list[int]] | None = None) -> None:
    """mtd's own format: encoder/ (transformers, safetensors), heads.safetensors, student.json.

    `matryoshka` ({head: prefix dims}) records the prefixes trained as vectors of their own, so an
    export can offer them by dim."""
    folder = Path(folder)
    student.encoder.save_pretrained(folder / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "encoder")
    save_file(_cpu_state(student.heads), str(folder / HEADS_FILE))
    meta = {"heads": student.head_dims, "max_length": max_length}
    if matryoshka:
        meta["matryoshka"] = {head: sorted(dims) for head, dims in matryoshka.items()}
    if len(student.log_scales):  # learned ckd temperatures, so a run started from this one goes on
        meta["log_scales"] = {head: float(p.detach()) for head, p in student.log_scales.items()}
    if student.image is not None:
        save_file(_cpu_state(student.image), str(folder / IMAGE_FILE))
        meta["image"] = student.image.config()
    atomic_write_json(folder / STUDENT_FILE, meta)  # written last: marks the folder complete


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def load_student(folder: str | Path):
    """(student, tokenizer, max_length) saved by `save_student`."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / STUDENT_FILE).is_file():
        raise StudentError(f"{folder} is not an mtd student folder (no {STUDENT_FILE}).")
    meta = read_json(folder / STUDENT_FILE)
    require_weights(folder / "encoder", f"mtd student {folder}")
    wanted = [HEADS_FILE, IMAGE_FILE] if "image" in meta else [HEADS_FILE]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        raise StudentError(f"mtd student {folder} lacks {', '.join(missing)}: the folder is incomplete. "
                           "Copy it again (a run's student/: `train.py CONFIG --resume` rebuilds it "
                           "from the last checkpoint).")
    with reading_weights(folder / "encoder", STUDENT_FIX):
        encoder = AutoModel.from_pretrained(folder / "encoder", use_safetensors=True).float()
    image = None
    if "image" in meta:
        from mtd.models.projection import build_image_path

        image = build_image_path(meta["image"])
        image.load_state_dict(load_safetensors(folder / IMAGE_FILE, STUDENT_FIX))
    student = Student(encoder, meta["heads"], image)
    student.heads.load_state_dict(load_safetensors(folder / HEADS_FILE, STUDENT_FIX))
    for head, value in meta.get("log_scales", {}).items():
        student.log_scales[head] = nn.Parameter(torch.tensor(float(value)))
    tokenizer = AutoTokenizer.from_pretrained(folder / "encoder")
    return student, tokenizer, int(meta["max_length"])


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def _encode_rows(student: Student, sizes: Sequence[int], batch_of, vectors, dim: int, batch_size: int,
                 progress: bool, desc: str) -> np.ndarray:
    """(N, dim) float32 rows of vectors(student, batch_of(rows)), in eval mode, the rows in batches
    by decreasing `sizes`."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    order = np.argsort([-n for n in sizes], kind="stable")
    out = np.empty((len(sizes), dim), dtype=np.float32)
    for start in tqdm(range(0, len(sizes), batch_size), disable=not progress, desc=desc):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in batch_of(idx).items()}
        out[idx] = vectors(student, batch).float().cpu().numpy()
    student.train(was_training)
    return out


def _encode_texts(student: Student, tokenizer, texts: list[str], vectors, dim: int, max_length: int,
                  batch_size: int, progress: bool, desc: str) -> np.ndarray:
    """(N, dim) float32 rows of vectors(student, batch), in eval mode, batches sorted by length."""
    return _encode_rows(student, [len(t) for t in texts],
                        lambda idx: tokenize(tokenizer, [texts[i] for i in idx], max_length),
                        vectors, dim, batch_size, progress, desc)


def encode(student: Student, tokenizer, texts: list[str], head: str, max_length: int,
           batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(N, D_head) L2-normalized float32 vectors of one head, batches sorted by length for speed."""
    def vectors(model, batch):
        return torch.nn.functional.normalize(model(**batch)[head].float(), dim=-1)

    return _encode_texts(student, tokenizer, texts, vectors, student.head_dims[head], max_length,
                         batch_size, progress, "encode")


def pooled_features(student: Student, tokenizer, texts: list[str], max_length: int,
                    batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(N, H) float32 mean-pooled encoder outputs in eval mode: while the encoder is frozen (a
    heads-only stage) exactly what every training step would compute again, so a stage can compute
    them once and train its heads on them (`forward(pooled=...)`)."""
    return _encode_texts(student, tokenizer, texts, _pool, student.encoder.config.hidden_size,
                         max_length, batch_size, progress, "frozen encoder features")


def pooled_features_of(student: Student, sizes: Sequence[int], batch_of, batch_size: int = 64,
                       progress: bool = True) -> np.ndarray:
    """pooled_features of rows given as token ids: batch_of(rows) -> {"input_ids",
    "attention_mask"} of those rows, padded (e.g. tokens.TokenizedTexts.pad), batched by
    decreasing `sizes` (the texts' lengths in characters give pooled_features' batches)."""
    return _encode_rows(student, sizes, batch_of, _pool, student.encoder.config.hidden_size,
                        batch_size, progress, "frozen encoder features")


def _pool(model: Student, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.pool(**batch)


def vision_parts(mode: str) -> list[str]:
    """"vision" -> every part of the image path; "vision:projection,markers" -> those parts."""
    named = mode.removeprefix("vision").removeprefix(":")
    return named.split(",") if named else ["tower", "projection", "markers"]


def set_trainable(student: Student, mode: str, heads: list[str],
                  learn_temperature: bool = False) -> list[str]:
    """Freeze all but the stage's part: "heads", "all", or "last:K" (heads + last K layers); or in
    image stages "vision[:PARTS]" (only the image path: the text side, heads included, stays frozen).

    Returns the names of the trainable parameters. Heads a stage does not name stay frozen, and so
    do the learned ckd temperatures unless `learn_temperature`.
    """
    student.requires_grad_(False)
    if mode.startswith("vision"):
        if student.image is None:
            raise StudentError(f"train={mode} but the student has no image path (student.vision).")
        for part in vision_parts(mode):
            student.image.parts()[part].requires_grad_(True)
        return [n for n, p in student.named_parameters() if p.requires_grad]

    for name in heads:
        student.heads[name].requires_grad_(True)
        if name in student.log_scales:
            student.log_scales[name].requires_grad_(learn_temperature)
    if mode == "all":
        student.encoder.requires_grad_(True)
    elif mode.startswith("last:"):
        blocks = layer_list(student.encoder)
        k = int(mode.removeprefix("last:"))
        if not 0 < k <= len(blocks):
            raise StudentError(f"train=last:{k} but the encoder has {len(blocks)} layers; use "
                               f"last:{len(blocks)} or less, or all, for this stage (stages.N.train).")
        for block in list(blocks)[-k:]:
            block.requires_grad_(True)
    elif mode != "heads":
        raise StudentError(f"Unknown train mode {mode!r}: use heads, all or last:K.")
    if getattr(student.encoder, "pooler", None) is not None:
        # Mean pooling never reads the [CLS] pooler; trainable, DDP would wait for its gradients.
        student.encoder.pooler.requires_grad_(False)
    return [n for n, p in student.named_parameters() if p.requires_grad]


def set_train_mode(student: nn.Module) -> None:
    """student.train(), but every module whose parameters are all frozen in eval mode: frozen
    features carry no dropout noise (frozen heads, lower layers under last:K, a frozen encoder
    under heads or vision) and a frozen CNN tower's BatchNorm keeps its running statistics.
    Call after set_trainable."""
    student.train()
    for module in student.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
