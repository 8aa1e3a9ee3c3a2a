"""Export a student as a sentence-transformers folder: Transformer, Pooling(mean), Dense, Normalize.

`SentenceTransformer(path)` then loads it with no mtd code, so MTEB and any ST tooling work
unchanged. One head is exported per folder (choose it with `head`); the Dense has no activation,
exactly the student's linear head.

A student with an image path also gets `image/` beside the text modules (config.json with the
tower, projection and preprocessing; model.safetensors with the tower, projection and marker
weights). `load_image_text_model(path)` loads both sides in one call: `encode_text(texts)` is
the sentence-transformers model itself, `encode_image(paths or PIL images)` runs the image path
into the same Transformer, Pooling, Dense and Normalize modules.

Usage: python -m mtd.export RUN_OR_STUDENT_DIR OUT_DIR [--head NAME | --dim K | --all] [--overwrite]

--head picks a head by name, --dim by its size: a head of K dims, else a Matryoshka prefix of K
dims trained in some stage (the head's first K outputs, exported as a Dense of K rows, so the
folder computes exactly the renormalized prefix). --all writes every head and every trained
prefix, each to OUT_DIR/NAME (fc1, fc256, fc1-256 for fc1's first 256 dims, ...; not fc1@256,
which eval.py would read as a prefix of OUT_DIR/fc1). A Matryoshka export also works with
`SentenceTransformer(path, truncate_dim=K)` for any K.

OUT_DIR must be new, or a sentence-transformers folder to replace (with --overwrite); the export
never writes through a symbolic link or into the run it exports.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mtd.errors import cli_main
from mtd.hf import resolve_model
from mtd.io import atomic_write_json, load_safetensors, read_json, reading_weights
from mtd.models.student import STUDENT_FILE, Student, StudentError, load_student

IMAGE_DIR = "image"
# What SOURCE must be, for messages.
SOURCE_HELP = ("SOURCE is a finished run's folder (OUTPUT_DIR/NAME, runs/NAME by default, holding "
               f"config.yaml, student/, final/ and checkpoints/) or its student/ folder ({STUDENT_FILE}, "
               "heads.safetensors, encoder/).")


class ExportError(StudentError):
    """An export that has nothing to export, or that would destroy something to write its folder."""

logger = logging.getLogger(__name__)


def to_sentence_transformer(student: Student, tokenizer, head: str, max_length: int,
                            dim: int | None = None):
    """A SentenceTransformer computing exactly `student`'s normalized `head` vectors, or with `dim`
    the normalized first `dim` of them (a Matryoshka prefix)."""
    from sentence_transformers import SentenceTransformer, models

    if head not in student.heads:
        raise StudentError(f"No head {head!r}; the student has {list(student.heads)}.")
    linear = student.heads[head]
    if dim is not None and not 0 < dim <= linear.out_features:
        raise StudentError(f"A prefix of {dim} dims of head {head!r} ({linear.out_features} dims) does "
                           f"not exist; choose 1 to {linear.out_features}.")
    rows = slice(0, dim)
    with tempfile.TemporaryDirectory() as tmp:
        student.encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        transformer = models.Transformer(tmp, max_seq_length=max_length)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    dense = models.Dense(
        linear.in_features, dim or linear.out_features, bias=True, activation_function=nn.Identity(),
        init_weight=linear.weight[rows].detach().cpu().clone(),
        init_bias=linear.bias[rows].detach().cpu().clone(),
    )
    return SentenceTransformer(
        modules=[transformer, pooling, dense, models.Normalize()],
        device="cpu",
        similarity_fn_name="cosine",
    )


def export_student(student: Student, tokenizer, out: str | Path, head: str, max_length: int,
                   overwrite: bool = False, dim: int | None = None) -> Path:
    """Write the sentence-transformers folder atomically (a temp folder renamed into place).

    `out` may be new or, with `overwrite`, an existing sentence-transformers folder; anything else
    is refused before the student is touched (see check_out).
    """
    out = Path(out)
    check_out(out, overwrite)
    model = to_sentence_transformer(student, tokenizer, head, max_length, dim)

    def write(tmp: Path) -> None:
        model.save(str(tmp))
        if student.image is not None:
            save_image_side(student, tmp / IMAGE_DIR, head)

    save_folder(out, write)
    logger.info("Exported head %s (%d dims) to %s", head, dim or student.head_dims[head], out)
    return out


def save_folder(out: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary folder beside `out`, which then replaces `out` atomically
    (_replace); a failure leaves `out` as it was. The caller checks `out` first (check_out)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is meant to be shared
        write(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder whose replacement would lose something: a symbolic link (the
    folder it points to would go), a file or non-model folder, or a model without `overwrite`."""
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link (to {os.readlink(out)}); refusing to replace "
                          "what it points to. Give the real folder or another output folder.")
    if not out.exists():
        return
    if not (out / "modules.json").is_file():
        raise ExportError(f"{out} exists and is not a sentence-transformers folder; refusing to "
                          "replace it. Choose another output folder, or remove it yourself.")
    if not overwrite:
        raise ExportError(f"{out} already holds a sentence-transformers model; refusing to replace "
                          "it. Pass --overwrite to replace it, or choose another output folder.")


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an old `out` is moved aside first and deleted last, so a crash
    leaves one of the two complete folders, never neither."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    out.rename(old / out.name)
    try:
        new.rename(out)
    except BaseException:
        (old / out.name).rename(out)  # the old folder back where it was
        old.rmdir()
        raise
    shutil.rmtree(old)


def save_image_side(student: Student, folder: Path, head: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.image.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    atomic_write_json(folder / "config.json", student.image.config() | {"head": head})


class ImageTextModel:
    """A sentence-transformers export plus its image side: one vector space for texts and images."""

    def __init__(self, folder: str | Path, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        from mtd.models.projection import build_image_path
        from mtd.models.vision import ImagePreprocess

        folder = resolve_model(str(folder), "image-text model")
        config_path = folder / IMAGE_DIR / "config.json"
        if not config_path.is_file():
            raise StudentError(f"{folder} has no image side ({IMAGE_DIR}/config.json): it was exported "
                               "from a text-only student. Train an image stage (data: images) first.")
        with reading_weights(folder):
            self.text = SentenceTransformer(str(folder), device=device)
        config = read_json(config_path)
        self.image = build_image_path(config)
        self.image.load_state_dict(load_safetensors(folder / IMAGE_DIR / "model.safetensors"))
        self.image.to(self.text.device).eval()
        self.transform = ImagePreprocess.from_dict(config["preprocess"]).transform()

    def encode_text(self, texts: list[str], batch_size: int = 64, **kwargs):
        """(N, D) normalized float32, exactly SentenceTransformer(path).encode."""
        return self.text.encode(texts, batch_size=batch_size, convert_to_numpy=True, **kwargs)

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 32, progress: bool = False):
        """Paths or PIL images -> (N, D) normalized float32 vectors in the text vectors' space."""
        import numpy as np
        from tqdm.auto import tqdm

        from mtd.data.images import open_image

        out = []
        transformer = self.text[0].auto_model
        for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encode images"):
            batch = [im if hasattr(im, "convert") else open_image(im)
                     for im in images[start:start + batch_size]]
            pixels = torch.stack([self.transform(im.convert("RGB")) for im in batch]).to(self.text.device)
            embeds, mask = self.image(pixels, transformer.get_input_embeddings())
            features = {"token_embeddings": transformer(inputs_embeds=embeds, attention_mask=mask)
                        .last_hidden_state, "attention_mask": mask}
            for module in list(self.text)[1:]:  # Pooling, Dense, Normalize as exported
                features = module(features)
            out.append(features["sentence_embedding"].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.text.get_embedding_dimension()), "float32")


def load_image_text_model(folder: str | Path, device: str | None = None) -> ImageTextModel:
    return ImageTextModel(folder, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("source", type=Path, help="a run folder (runs/NAME) or its student/ folder")
    parser.add_argument("out", type=Path, help="where to write the sentence-transformers folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--head", default=None, help="head to export by name (default: the first)")
    which.add_argument("--dim", type=int, default=None,
                       help="head to export by size: a head of DIM dims, else a trained Matryoshka prefix")
    which.add_argument("--all", action="store_true",
                       help="every head and trained prefix, each to OUT/NAME")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT when it already holds a sentence-transformers model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return cli_main("export", lambda: _export(args.source, args.out, args.head, args.overwrite,
                                              args.dim, args.all))


def choose_exports(meta: dict, head: str | None, dim: int | None, every: bool,
                   source: Path) -> list[tuple[str, str, int | None]]:
    """(folder name, head, prefix dims or None) of each export asked for, from student.json's
    heads and Matryoshka prefixes; an unknown head or dim names what there is."""
    heads: dict[str, int] = meta["heads"]
    prefixes = {h: list(d) for h, d in meta.get("matryoshka", {}).items()}
    every_export = [(h, h, None) for h in heads]
    every_export += [(f"{h}-{d}", h, d) for h, ds in prefixes.items() for d in ds]
    if every:
        return every_export
    if dim is not None:
        found = [e for e in every_export if (e[2] or heads[e[1]]) == dim]
        if not found:
            sizes = sorted({e[2] or heads[e[1]] for e in every_export})
            raise ExportError(f"No head or Matryoshka prefix of {dim} dims in {source}; it has {sizes} "
                              f"({', '.join(f'{n}: {d or heads[h]}' for n, h, d in every_export)}). "
                              "Choose one of those with --dim, or a head by name with --head.")
        return found[:1]
    head = head or next(iter(heads))
    if head not in heads:
        raise ExportError(f"No head {head!r} in {source}; its heads are {list(heads)}. "
                          "Choose one with --head.")
    return [(head, head, None)]


def _export(source: Path, out: Path, head: str | None, overwrite: bool, dim: int | None = None,
            every: bool = False) -> None:
    """Every check that needs no weights comes first: a bad SOURCE, head or OUT fails in a moment."""
    folder = student_folder(source)
    exports = choose_exports(read_json(folder / STUDENT_FILE), head, dim, every, source)
    check_outside_run(out, folder)
    outs = [out / name for name, _, _ in exports] if every else [out]
    for path in outs:
        check_out(path, overwrite)
    student, tokenizer, max_length = load_student(folder)
    with torch.no_grad():
        for path, (_, name, prefix) in zip(outs, exports, strict=True):
            export_student(student, tokenizer, path, name, max_length, overwrite, prefix)


def student_folder(source: Path) -> Path:
    """The mtd student folder of a run folder or of a student folder; else why not, and what is."""
    if not source.exists():
        raise ExportError(f"{source} does not exist. {SOURCE_HELP}")
    for folder in (source / "student", source):
        if (folder / STUDENT_FILE).is_file():
            return folder
    if (source / "modules.json").is_file():
        why = "it is a sentence-transformers folder (an export already), not a run"
    elif (source / "checkpoints").is_dir():
        why = "the run has not finished (no student/ yet): finish it with train.py CONFIG --resume"
    else:
        why = f"it holds neither student/ nor {STUDENT_FILE}"
    raise ExportError(f"{source} is not an mtd run or student folder: {why}. {SOURCE_HELP}")


def check_outside_run(out: Path, student: Path) -> None:
    """OUT may sit inside the run (runs/NAME/fc256) but must not be or hold the run, nor be or sit
    inside the student or checkpoints being exported: writing there would destroy the run."""
    where = out.resolve()
    student = student.resolve()
    run = student.parent if student.name == "student" else None
    for kept in [*([run, run / "checkpoints"] if run else []), student]:
        if kept.is_relative_to(where):
            relation = "is" if kept == where else "contains"
        elif kept != run and where.is_relative_to(kept):
            relation = "is inside"
        else:
            continue
        example = (run or student.parent) / "export"
        raise ExportError(f"{out} {relation} {kept}, part of the run being exported; refusing to "
                          f"write there. Choose another folder, e.g. {example}.")


if __name__ == "__main__":
    sys.exit(main())
