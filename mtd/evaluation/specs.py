"""Models to evaluate, named by a spec string, all behind one `encode(texts, role)` interface.

Spec grammar (eval.py MODEL arguments):
    PATH              a sentence-transformers folder (a teacher, an mtd export) or an mtd run
                      folder (runs/NAME: its final/ export); hf:ORG/NAME is a hub model, and so
                      is ORG/NAME when it does not look local (mtd/hf.py)
    PATH:HEAD         one head of an mtd run or mtd student folder (e.g. runs/default:fc256)
    LABEL=SPEC        defines LABEL, which later specs may use (minilm=models/all-MiniLM-L6-v2)
    A+B               the multi-teacher combination: each part L2-normalized, concatenated,
                      normalized again (what a student is trained to imitate)
    SPEC@DIM          the first DIM dimensions (Matryoshka prefix), renormalized
    PATH#onnx         PATH's Transformer as onnx/model.onnx in onnxruntime (fp32), the rest of
                      its modules as they are (mtd/onnx.py)
    PATH#int8         the same with onnx/model_qint8_avx512_vnni.onnx (dynamic int8); both files
                      are written by `python -m mtd.onnx FOLDER` (e.g. runs/default/final#int8)

Every model returns L2-normalized float32 (N, D) vectors and has a fingerprint (weights hash,
prompts, head, dims) so vectors can be cached by model and texts.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mtd import config
from mtd.errors import MtdError
from mtd.hf import HUB_PREFIX, ModelPathError, require_weights, resolve_model
from mtd.io import (
    atomic_save_npy,
    atomic_write_bytes,
    check_safetensors,
    hash_file,
    hash_folder,
    hash_texts,
    read_json,
    reading_weights,
)
from mtd.models.student import STUDENT_FILE, load_student
from mtd.models.student import encode as student_encode
from mtd.onnx import FP32_FILE, INT8_FILE, OnnxError, check_st_folder, load_onnx_model, require_onnx_file
from mtd.reduce import principal_axes
from mtd.targets import teachers

logger = logging.getLogger(__name__)

ROLES = ("query", "document")


class ModelSpecError(MtdError, ValueError):
    """A model spec that does not name a usable model."""


class Encoder(Protocol):
    name: str
    fingerprint: str

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        """(N, D) L2-normalized float32."""
        ...


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class SentenceTransformerEncoder:
    """A sentence-transformers folder; its own "query"/"document" prompts are used (as MTEB does)."""

    name: str
    folder: Path
    device: str | None = None
    _model: object = field(default=None, repr=False)

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            with reading_weights(self.folder):
                self._model = SentenceTransformer(str(self.folder), device=self.device)
        return self._model

    @cached_property
    def fingerprint(self) -> str:
        return hash_folder(self.folder)

    def prompt(self, role: str) -> str | None:
        prompts = getattr(self.model, "prompts", None) or {}
        return prompts.get(role) or (prompts.get("passage") if role == "document" else None)

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        vecs = self.model.encode(texts, batch_size=batch_size, prompt=self.prompt(role),
                                 convert_to_numpy=True, show_progress_bar=len(texts) > batch_size)
        return _normalize(vecs)


@dataclass
class ImageTextEncoder(SentenceTransformerEncoder):
    """An mtd export with an image side (image/): texts as sentence-transformers encodes them,
    images through the image path into the same vector space (eval.py's image-text task)."""

    _both: object = field(default=None, repr=False)

    @property
    def model(self):
        if self._both is None:
            from mtd.export import load_image_text_model

            self._both = load_image_text_model(self.folder, self.device)
        return self._both.text

    def encode_images(self, images: list, batch_size: int = 32) -> np.ndarray:
        self.model  # noqa: B018  (loads both sides)
        return _normalize(self._both.encode_image(images, batch_size, progress=len(images) > batch_size))


@dataclass
class OnnxEncoder(SentenceTransformerEncoder):
    """A sentence-transformers folder whose Transformer runs as one of its ONNX files
    (`PATH#onnx`, `PATH#int8`); prompts and the other modules are the folder's own."""

    file_name: str = FP32_FILE

    @property
    def model(self):
        if self._model is None:
            self._model = load_onnx_model(self.folder, self.file_name)
        return self._model

    @cached_property
    def fingerprint(self) -> str:
        return f"{hash_folder(self.folder)}|{self.file_name}:{hash_file(self.folder / self.file_name)}"


# PATH#BACKEND: the ONNX file each backend runs.
BACKENDS = {"onnx": FP32_FILE, "int8": INT8_FILE}


@dataclass
class StudentHeadEncoder:
    """One head of an mtd student, encoded by mtd itself (heads beyond the exported one)."""

    name: str
    folder: Path  # an mtd student folder (runs/NAME/student)
    head: str
    device: str | None = None
    _loaded: tuple | None = field(default=None, repr=False)

    @cached_property
    def fingerprint(self) -> str:
        return f"{hash_folder(self.folder)}:{self.head}"

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        if self._loaded is None:
            self._loaded = load_student(self.folder)
            self._loaded[0].to(self.device or "cpu")
            if self.head not in self._loaded[0].heads:
                raise ModelSpecError(f"{self.name}: no head {self.head!r}; "
                                     f"heads: {list(self._loaded[0].heads)}.")
        student, tokenizer, max_length = self._loaded
        return student_encode(student, tokenizer, texts, self.head, max_length, batch_size,
                              progress=len(texts) > batch_size)


@dataclass
class TeacherEncoder:
    """A configured teacher (its pooling, prompt, max length, dtype) exactly as the target cache
    runs it, so the report scores the vectors the student was trained on."""

    name: str
    cfg: config.TeacherConfig
    device: str | None = None
    _model: object = field(default=None, repr=False)

    @cached_property
    def folder(self) -> Path:
        return teachers.teacher_folder(self.cfg)

    @cached_property
    def fingerprint(self) -> str:
        identity = teachers.teacher_identity(self.cfg, self.folder)
        return hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        if self._model is None:
            self._model = teachers.load_teacher(self.cfg, self.folder, self.device)
        return _normalize(teachers.encode(self._model, texts, self.cfg))


@dataclass
class ConcatEncoder:
    """Each part normalized, concatenated, normalized again: the multi-teacher target."""

    name: str
    parts: list[Encoder]

    @property
    def fingerprint(self) -> str:
        return "+".join(p.fingerprint for p in self.parts)

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        return _normalize(np.concatenate([p.encode(texts, role, batch_size) for p in self.parts], 1))


@dataclass
class PrefixEncoder:
    """The first `dim` dimensions, renormalized (Matryoshka-style truncation)."""

    name: str
    inner: Encoder
    dim: int

    def __post_init__(self):
        if self.dim < 1:
            raise ModelSpecError(f"{self.name}: a prefix needs at least 1 dimension, got {self.dim}.")

    @property
    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint}@{self.dim}"

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        return self.truncate(self.inner.encode(texts, role, batch_size))

    def truncate(self, vecs: np.ndarray) -> np.ndarray:
        if self.dim > vecs.shape[1]:
            raise ModelSpecError(f"{self.name}: prefix {self.dim} > the model's {vecs.shape[1]} dims.")
        return _normalize(vecs[:, : self.dim])


@dataclass
class ProjectedEncoder:
    """`inner`'s vectors centered and projected onto `components`, renormalized: e.g. PCA of a
    model's vectors as a model of its own (bench/peers.py scores PCA of the teachers' combination).

    Storing the projection beside the vectors (`save`, `load`) lets a fresh process, such as the
    speed task's, rebuild the model without refitting it.
    """

    name: str
    inner: Encoder
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows

    @classmethod
    def pca(cls, name: str, inner: Encoder, vectors: np.ndarray, dim: int) -> ProjectedEncoder:
        """Fit PCA with `dim` components on `vectors` (N, D), e.g. `inner`'s vectors of a corpus."""
        x = np.asarray(vectors, dtype=np.float64)
        if not 1 <= dim <= min(x.shape):
            raise ModelSpecError(f"{name}: PCA to {dim} dimensions needs 1 <= dim <= min(N, D) of the "
                                 f"{x.shape} fitting vectors; lower the dimension or fit on more texts.")
        mean, axes = principal_axes(torch.from_numpy(x))  # python -m mtd.reduce --method pca's
        return cls(name, inner, mean.float().numpy(), axes[:dim].float().numpy())

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.mean.tobytes() + self.components.tobytes()).hexdigest()[:16]
        return f"{self.inner.fingerprint}|projected:{digest}"

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        return self.project(self.inner.encode(texts, role, batch_size))

    def project(self, vecs: np.ndarray) -> np.ndarray:
        return _normalize((np.asarray(vecs, dtype=np.float32) - self.mean) @ self.components.T)

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, name: str, inner: Encoder, path: str | Path) -> ProjectedEncoder:
        with np.load(path) as f:
            return cls(name, inner, f["mean"], f["components"])


SPEC_FORMS = ("A model is a sentence-transformers folder, an mtd run (runs/NAME), RUN:HEAD, a LABEL "
              "defined earlier, A+B, PATH#onnx, PATH#int8, or hf:ORG/NAME (a hub model).")


def _from_path(spec: str, name: str) -> Encoder:
    hub = spec.startswith(HUB_PREFIX)
    rest = spec.removeprefix(HUB_PREFIX)
    if "#" in rest and not Path(rest).exists():
        rest, _, backend = rest.rpartition("#")
        return _onnx_encoder(spec, name, _from_path(HUB_PREFIX + rest if hub else rest, name), backend)
    path, _, head = rest.partition(":") if ":" in rest and not Path(rest).exists() else (rest, "", "")
    try:
        folder = resolve_model(HUB_PREFIX + path if hub else path, f"Model {spec!r}", weights=False)
    except ModelPathError as e:
        raise ModelSpecError(f"{e} {SPEC_FORMS}") from None
    if head:
        student = folder / "student" if (folder / "student" / STUDENT_FILE).is_file() else folder
        if not (student / STUDENT_FILE).is_file():
            raise ModelSpecError(f"Model {spec!r}: {folder} is not an mtd run or student folder.")
        return StudentHeadEncoder(name, student, head)
    if (folder / "final" / "modules.json").is_file():  # an mtd run: its export
        folder = folder / "final"
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise ModelSpecError(f"Model {spec!r}: {folder} holds no model (no modules.json/config.json).")
    require_weights(folder, f"Model {spec!r}")
    if (folder / "image" / "config.json").is_file():  # an mtd export with an image side
        return ImageTextEncoder(name, folder)
    return SentenceTransformerEncoder(name, folder)


def _onnx_encoder(spec: str, name: str, base: Encoder, backend: str) -> OnnxEncoder:
    """`base` (what the spec names before #) served from its ONNX file for `backend`."""
    if backend not in BACKENDS:
        raise ModelSpecError(f"Model {spec!r}: unknown backend #{backend}; write #onnx (fp32) or #int8. "
                             f"{SPEC_FORMS}")
    if not isinstance(base, SentenceTransformerEncoder):
        raise ModelSpecError(f"Model {spec!r}: #{backend} serves a sentence-transformers folder, and "
                             f"{spec.rpartition('#')[0]!r} is one head of an mtd run. Export that head "
                             "first (python -m mtd.export RUN OUT --head HEAD) and name OUT#" + backend + ".")
    try:
        folder = check_st_folder(base.folder)
        require_onnx_file(folder, BACKENDS[backend])
    except OnnxError as e:
        raise ModelSpecError(f"Model {spec!r}: {e}") from None
    return OnnxEncoder(name, folder, file_name=BACKENDS[backend])


def parse_models(specs: list[str]) -> dict[str, Encoder]:
    """Resolve eval.py MODEL arguments in order; returns {label: encoder} of those to evaluate.

    A `LABEL=SPEC` definition is evaluated too; its label may be used by later specs.
    """
    labels: dict[str, Encoder] = {}
    out: dict[str, Encoder] = {}
    for raw in specs:
        label, eq, spec = raw.partition("=")
        if not eq:
            label, spec = raw, raw
        out[label] = labels[label] = _resolve(spec, label, labels)
    return out


def _resolve(spec: str, name: str, labels: dict[str, Encoder]) -> Encoder:
    base, at, dim = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if at:
        if not dim.isdigit() or int(dim) < 1:
            raise ModelSpecError(f"Model {spec!r}: the prefix after @ must be a positive int.")
        return PrefixEncoder(name, _resolve(base, base, labels), int(dim))
    if "+" in spec:
        return ConcatEncoder(name, [_resolve(p, p, labels) for p in spec.split("+")])
    if spec in labels:
        return labels[spec]
    return _from_path(spec, name)


def _folders(model: Encoder) -> list[Path]:
    if isinstance(model, ConcatEncoder):
        return [f for part in model.parts for f in _folders(part)]
    if isinstance(model, PrefixEncoder):
        return _folders(model.inner)
    return [model.folder]


def check_weights(models: dict[str, Encoder]) -> None:
    """Every model's .safetensors headers read (cheap), so a truncated file is named before any
    model is scored, not after hours of scoring the others."""
    for folder in dict.fromkeys(f for m in models.values() for f in _folders(m)):
        check_safetensors(folder)


def load_encoder(specs: tuple[str, ...], label: str) -> Encoder:
    """Picklable way to rebuild one model in another process (speed measurements)."""
    return parse_models(list(specs))[label]


def with_prefixes(models: dict[str, Encoder], dims: list[int]) -> dict[str, Encoder]:
    """Add a Matryoshka-prefix variant of every model for each of `dims` (eval.py --dims)."""
    out = dict(models)
    for label, model in models.items():
        for d in dims:
            out[f"{label}@{d}"] = PrefixEncoder(f"{label}@{d}", model, d)
    return out


def student_heads(models: dict[str, Encoder]) -> dict[str, Encoder]:
    """Every other head of each mtd run among `models`, as its own model (eval.py --dims heads)."""
    out = dict(models)
    for label, model in models.items():
        torch_export = isinstance(model, SentenceTransformerEncoder) and not isinstance(model, OnnxEncoder)
        if torch_export and model.folder.name == "final":
            student = model.folder.parent / "student"
            if (student / STUDENT_FILE).is_file():
                for head in read_json(student / STUDENT_FILE)["heads"]:
                    out.setdefault(f"{label}:{head}", StudentHeadEncoder(f"{label}:{head}", student, head))
    return out


def cached_encode(model: Encoder, texts: list[str], role: str, cache_dir: str | Path | None,
                  batch_size: int = 64) -> np.ndarray:
    """model.encode, memoized on disk by (model fingerprint, role, texts).

    Combinations, prefixes and projections are built from their parts' cached vectors, so `a+b`
    after `a` and `b` encodes nothing.
    """
    if cache_dir is None:
        return model.encode(texts, role, batch_size)
    if isinstance(model, ConcatEncoder):
        parts = [cached_encode(p, texts, role, cache_dir, batch_size) for p in model.parts]
        return _normalize(np.concatenate(parts, axis=1))
    if isinstance(model, PrefixEncoder):
        return model.truncate(cached_encode(model.inner, texts, role, cache_dir, batch_size))
    if isinstance(model, ProjectedEncoder):
        return model.project(cached_encode(model.inner, texts, role, cache_dir, batch_size))
    key = hashlib.sha256(f"{model.fingerprint}|{role}|{hash_texts(texts)}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / "vectors" / f"{key}.npy"
    if path.is_file():
        try:
            vecs = np.load(path)
            if vecs.shape[0] == len(texts) and np.isfinite(vecs).all():
                logger.info("%s: reusing cached %s vectors %s", model.name, role, path)
                return vecs
        except (OSError, ValueError):
            pass
        logger.warning("Cached vectors %s are unreadable or wrong; encoding again.", path)
    vecs = model.encode(texts, role, batch_size)
    atomic_save_npy(path, vecs)
    return vecs
