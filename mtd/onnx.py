"""ONNX and int8 files for CPU serving of a sentence-transformers folder, in sentence-transformers'
own layout, and a loader that runs them.

`export_onnx(folder)` (or `python -m mtd.onnx FOLDER`) writes the folder's Transformer module as
ONNX graphs inside the folder, where sentence-transformers looks for them:

    FOLDER/onnx/model.onnx                      fp32; inputs input_ids, attention_mask (and
                                                token_type_ids when the model takes them), output
                                                last_hidden_state; batch and sequence axes dynamic
    FOLDER/onnx/model_qint8_avx512_vnni.onnx    onnxruntime dynamic quantization of it: int8
                                                weights per channel, uint8 activations, what
                                                sentence-transformers' export_dynamic_quantized_onnx_model
                                                writes for its "avx512_vnni" config

Pooling, Dense and Normalize stay the folder's own modules. Where optimum supports the installed
transformers, `SentenceTransformer(FOLDER, backend="onnx", model_kwargs={"file_name":
"onnx/model_qint8_avx512_vnni.onnx"})` loads exactly these files. It does not here: optimum-onnx
0.1.0, its newest release, needs transformers<4.58, and mtd pins transformers 5. So
`load_onnx_model(FOLDER, file_name=...)` runs them with onnxruntime alone: sentence-transformers
tokenizes (the folder's tokenizer, max_seq_length and prompts), onnxruntime computes the token
embeddings, and the folder's remaining modules pool them, so its vectors are
`SentenceTransformer(FOLDER).encode`'s up to ONNX numerics (int8: up to quantization).

The graph is traced with torch.onnx's TorchScript exporter (the one optimum uses; it needs only
the `onnx` package), then checked against the torch model on a batch of another shape, so a
trace that froze a shape-dependent branch is refused instead of written.

Usage: python -m mtd.onnx FOLDER [--no-int8] [--overwrite]

FOLDER is a sentence-transformers folder: an mtd export (runs/NAME/final, or `python -m
mtd.export` output) or a model such as models/all-MiniLM-L6-v2. Existing ONNX files are kept
unless --overwrite; both files are written to temporary names and renamed into place.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtd.errors import MtdError, cli_main
from mtd.hf import require_weights
from mtd.io import check_writable_dir, read_json, reading_weights

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = f"{ONNX_DIR}/model.onnx"
# sentence-transformers' name for the "avx512_vnni" dynamic quantization: model_{qint8}_{config}.onnx
INT8_FILE = f"{ONNX_DIR}/model_qint8_avx512_vnni.onnx"
OPSET = 17  # LayerNormalization is one op from 17 on; onnxruntime 1.32 runs up to 23
OUTPUT = "last_hidden_state"
# The largest difference from torch an export may show on the check batch (token embeddings of
# unit-scale transformers; float32 ONNX differs by about 1e-5).
EXPORT_ATOL = 1e-3
COMMAND = "python -m mtd.onnx"


class OnnxError(MtdError):
    """A folder that cannot be exported or served with ONNX, or ONNX files that are missing."""


def check_st_folder(folder: str | Path) -> Path:
    """`folder` as a Path when it is a sentence-transformers folder whose first module is a
    Transformer with safetensors weights; else an OnnxError naming what it is and what to give."""
    folder = Path(folder).expanduser()
    give = ("Give a sentence-transformers folder: an mtd export (runs/NAME/final) or a model such as "
            "models/all-MiniLM-L6-v2.")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OnnxError(f"{folder} {what}. {give}")
    if not (folder / "modules.json").is_file():
        if (folder / "final" / "modules.json").is_file():
            why = f"it is an mtd run; its export is {folder / 'final'}"
        elif (folder / "student.json").is_file() or (folder / "student" / "student.json").is_file():
            why = "it is an mtd student; export it first: python -m mtd.export RUN OUT"
        else:
            why = "it has no modules.json"
        raise OnnxError(f"{folder} is not a sentence-transformers folder: {why}. {give}")
    modules = read_json(folder / "modules.json")
    first = modules[0]["type"].rsplit(".", 1)[-1] if modules else "nothing"
    if first != "Transformer":
        raise OnnxError(f"{folder}: its first module is {first}, not a Transformer; only a transformer "
                        f"encoder is exported to ONNX. {give}")
    require_weights(folder, f"ONNX model {folder}")
    return folder


def _load_st(folder: Path):
    from sentence_transformers import SentenceTransformer

    with reading_weights(folder):
        return SentenceTransformer(str(folder), device="cpu")


class _LastHidden(nn.Module):
    """The Transformer module's encoder with positional inputs and one output, for tracing."""

    def __init__(self, encoder: nn.Module, names: list[str]):
        super().__init__()
        self.encoder, self.names = encoder, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(**dict(zip(self.names, inputs, strict=True))).last_hidden_state


def input_names(encoder: nn.Module, tokenizer) -> list[str]:
    """input_ids, attention_mask, and token_type_ids when both the model and its tokenizer use
    them (BERT: yes; MPNet, RoBERTa-style tokenizers: no), as optimum's exports have them."""
    names = ["input_ids", "attention_mask"]
    takes = "token_type_ids" in inspect.signature(encoder.forward).parameters
    if takes and "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        names.append("token_type_ids")
    return names


@contextmanager
def _quiet_trace():
    """Hide what tracing says about every transformer: the exporter is the TorchScript one
    (deprecated, kept for optimum parity), and shape conditions become constants; the check
    against torch on another shape (`_check_graph`) is what guards the latter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        yield


def _tokens(st, texts: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    features = st.preprocess(texts)
    return {n: features[n] for n in names}


def _export_graph(st, path: Path) -> list[str]:
    """Trace the Transformer module of `st` into `path`; returns the graph's input names."""
    encoder = st[0].auto_model
    names = input_names(encoder, st.tokenizer)
    # In eval mode as a whole: the exporter restores the wrapper's training flag on all of it
    # afterwards, which would leave dropout on in the encoder.
    wrapper = _LastHidden(encoder, names).eval()
    # Two texts of different lengths, so the traced batch holds padding and the mask is used.
    example = _tokens(st, ["an example sentence to trace the encoder", "short"], names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in [*names, OUTPUT]}
    with torch.no_grad(), _quiet_trace():
        torch.onnx.export(wrapper, tuple(example[n] for n in names), str(path),
                          dynamo=False, opset_version=OPSET, input_names=names, output_names=[OUTPUT],
                          dynamic_axes=axes, do_constant_folding=True)
    return names


def _check_graph(st, path: Path, names: list[str]) -> None:
    """The graph must compute the torch model's token embeddings on a batch of another size and
    length than the traced one; a trace that froze a shape-dependent branch would not."""
    import onnxruntime as ort

    texts = ["one", "a second, much longer text with many more words than any text traced", "three words"]
    batch = _tokens(st, texts, names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {n: batch[n].numpy().astype(np.int64) for n in names})[0]
    with torch.no_grad():
        want = st[0].auto_model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[..., None].astype(bool)
    diff = float(np.abs((got - want) * mask).max()) if got.shape == want.shape else float("inf")
    if not diff <= EXPORT_ATOL:
        raise OnnxError(f"The ONNX graph of {path.parent.parent} does not reproduce the model on a batch "
                        f"of another shape (largest difference {diff:.3g}, shape {got.shape} vs "
                        f"{want.shape}): this architecture does not trace with torch.onnx's TorchScript "
                        "exporter. Nothing was written; serve it with sentence-transformers on torch.")


def _temp_file(folder: Path, stem: str) -> Path:
    """A new empty file in `folder` (readable by all, as a model folder is shared) to write into
    and rename into place."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".onnx.tmp")
    os.close(fd)
    os.chmod(name, 0o644)
    return Path(name)


class _QuantizerChatter(logging.Filter):
    """onnxruntime's quantizer logs on the root logger: a line per tensor left in float (INFO),
    and advice to run a shape pre-pass first (optimum does not run it either)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname:
            return True
        advice = "pre-processing before quantization" in record.getMessage()
        return record.levelno > logging.INFO and not advice


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """onnxruntime dynamic int8 quantization of the graph `src` into `dst`, as
    sentence-transformers' "avx512_vnni" config does it through optimum's ORTQuantizer:
    QInt8 weights, symmetric and per channel, uint8 asymmetric activations, full 8-bit range,
    every operator type onnxruntime quantizes dynamically, MatMuls between activations included."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    hint = _QuantizerChatter()
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=list(IntegerOpsRegistry), per_channel=True,
            reduce_range=False, weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "EnableSubgraph": False,
                           "ForceSymmetric": False, "MatMulConstBOnly": False},
        )
    finally:
        logging.getLogger().removeFilter(hint)


def export_onnx(folder: str | Path, int8: bool = True, overwrite: bool = False) -> list[Path]:
    """Write onnx/model.onnx (and onnx/model_qint8_avx512_vnni.onnx unless `int8` is False) into
    the sentence-transformers `folder`; returns the paths written.

    Every check comes before the model loads; both files are written under temporary names and
    renamed into place only when both are complete, so a failure leaves the folder as it was.
    """
    folder = Path(folder).expanduser()
    if folder.is_symlink():  # e.g. models/all-MiniLM-L6-v2, a link into an installed package
        raise OnnxError(f"{folder} is a symbolic link (to {os.readlink(folder)}); refusing to write into "
                        f"what it points to. Copy it (cp -rL {folder} COPY) and export the copy.")
    folder = check_st_folder(folder)
    targets = [folder / FP32_FILE] + ([folder / INT8_FILE] if int8 else [])
    there = [str(p.relative_to(folder)) for p in targets if p.exists()]
    if there and not overwrite:
        raise OnnxError(f"{folder} already holds {' and '.join(there)}; refusing to replace it. Pass "
                        "--overwrite (overwrite=True) to write it again.")
    out_dir = folder / ONNX_DIR
    made_dir = not out_dir.exists()
    check_writable_dir(out_dir, "copy the model folder somewhere writable")
    temps = {path: _temp_file(out_dir, path.stem) for path in targets}
    try:
        st = _load_st(folder)
        names = _export_graph(st, temps[targets[0]])
        _check_graph(st, temps[targets[0]], names)
        if int8:
            quantize_int8(temps[targets[0]], temps[targets[1]])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if made_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    if not int8 and (folder / INT8_FILE).exists():
        logger.warning("%s was left as it was: it is quantized from the previous %s. Run %s %s "
                       "--overwrite (without --no-int8) to quantize the new one.",
                       INT8_FILE, FP32_FILE, COMMAND, folder)
    for path in targets:
        logger.info("Wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return targets


class OnnxSentenceTransformer:
    """A sentence-transformers folder whose Transformer module runs as an ONNX file in onnxruntime.

    Tokenization, prompts, length-sorted batching and the modules after the Transformer (Pooling,
    Dense, Normalize) are the folder's own, loaded by `SentenceTransformer(folder)` on CPU; the
    Transformer's torch weights are dropped after loading.
    """

    def __init__(self, folder: str | Path, file_name: str = FP32_FILE, threads: int | None = None):
        import onnxruntime as ort

        self.folder = check_st_folder(folder)
        self.file_name = file_name
        self.path = require_onnx_file(self.folder, file_name)
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise OnnxError(f"threads must be >= 1 (or None for onnxruntime's choice), got {threads}.")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.st = _load_st(self.folder)
        self.st[0].auto_model.to("meta")  # the ONNX file computes this module: free its weights
        self.prompts = self.st.prompts
        self.max_seq_length = self.st.max_seq_length

    def get_embedding_dimension(self) -> int | None:
        return self.st.get_embedding_dimension()

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, prompt: str | None = None,
               show_progress_bar: bool = False, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True) -> np.ndarray:
        """(N, D) float32, as `SentenceTransformer(folder).encode` returns them: normalized where
        the folder ends with Normalize (mtd exports do) or with `normalize_embeddings`.
        `prompt` None uses the folder's default prompt, if it names one. `convert_to_numpy` is
        accepted for call compatibility; the result is always numpy."""
        from tqdm.auto import trange

        if batch_size < 1:
            raise OnnxError(f"batch_size must be >= 1, got {batch_size}.")
        if prompt is None and self.st.default_prompt_name is not None:
            prompt = self.prompts.get(self.st.default_prompt_name)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # as sentence-transformers sorts
        out: list[np.ndarray] = []
        for start in trange(0, len(texts), batch_size, desc="Batches", disable=not show_progress_bar):
            features = self.st.preprocess([texts[i] for i in order[start:start + batch_size]], prompt=prompt)
            feed = {n: _input(features, n) for n in self.inputs}
            hidden = self.session.run([OUTPUT], feed)[0]
            features["token_embeddings"] = torch.from_numpy(hidden)
            for module in list(self.st)[1:]:  # Pooling, Dense, Normalize as the folder has them
                features = module(features)
            vecs = features["sentence_embedding"].float()
            if normalize_embeddings:
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)
            out.append(vecs.numpy())
        if not out:
            return np.zeros((0, self.get_embedding_dimension() or 0), np.float32)
        vecs = np.concatenate(out)
        result = np.empty_like(vecs)
        result[order] = vecs
        return result


def _input(features: dict[str, Any], name: str) -> np.ndarray:
    """One graph input from the tokenizer's features (int64, as exported); token_type_ids the
    tokenizer does not make are zeros, as optimum fills them."""
    if name in features:
        return features[name].numpy().astype(np.int64)
    if name == "token_type_ids":
        return np.zeros_like(features["input_ids"].numpy(), dtype=np.int64)
    raise OnnxError(f"The ONNX graph wants an input {name!r} that the folder's tokenizer does not make; "
                    f"export the graph from this folder again: {COMMAND} FOLDER --overwrite.")


def require_onnx_file(folder: Path, file_name: str) -> Path:
    """folder/file_name, or an OnnxError naming the command that writes it."""
    path = folder / file_name
    if path.is_file():
        return path
    if file_name in (FP32_FILE, INT8_FILE):
        flags = " --overwrite" if (folder / FP32_FILE).is_file() else ""
        fix = f"write it with `{COMMAND} {folder}{flags}`"
    else:
        fix = f"give the name of an .onnx file in {folder} (e.g. {FP32_FILE})"
    raise OnnxError(f"{path} does not exist: {fix}.")


def load_onnx_model(folder: str | Path, file_name: str = FP32_FILE,
                    threads: int | None = None) -> OnnxSentenceTransformer:
    """The folder's ONNX file `file_name` (FP32_FILE or INT8_FILE) behind an `encode` like
    SentenceTransformer's; `threads`: onnxruntime's intra-op threads (None: its default, one per
    physical core)."""
    return OnnxSentenceTransformer(folder, file_name, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sentence-transformers folder (e.g. runs/NAME/final)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help=f"write {FP32_FILE} only, not {INT8_FILE}")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the ONNX files the folder already holds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return cli_main("onnx", lambda: _export(args.folder, args.int8, args.overwrite))


def _export(folder: Path, int8: bool, overwrite: bool) -> None:
    export_onnx(folder, int8, overwrite)


if __name__ == "__main__":
    sys.exit(main())
