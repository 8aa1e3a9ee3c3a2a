"""Export a student as a sentence-transformers folder: Transformer, Pooling(mean), Dense, Normalize.

`SentenceTransformer(path)` then loads it with no mtd code, so MTEB and any ST tooling work
unchanged. One head is exported per folder (choose it with `head`); the Dense has no activation,
exactly the student's linear head.

Usage: python -m mtd.export RUN_OR_STUDENT_DIR OUT_DIR [--head NAME]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from mtd.student import Student, StudentError, load_student

logger = logging.getLogger(__name__)


def to_sentence_transformer(student: Student, tokenizer, head: str, max_length: int):
    """A SentenceTransformer computing exactly `student`'s normalized `head` vectors."""
    from sentence_transformers import SentenceTransformer, models

    if head not in student.heads:
        raise StudentError(f"No head {head!r}; the student has {list(student.heads)}.")
    linear = student.heads[head]
    with tempfile.TemporaryDirectory() as tmp:
        student.encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        transformer = models.Transformer(tmp, max_seq_length=max_length)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    dense = models.Dense(
        linear.in_features, linear.out_features, bias=True, activation_function=nn.Identity(),
        init_weight=linear.weight.detach().cpu().clone(), init_bias=linear.bias.detach().cpu().clone(),
    )
    return SentenceTransformer(
        modules=[transformer, pooling, dense, models.Normalize()],
        device="cpu",
        similarity_fn_name="cosine",
    )


def export_student(student: Student, tokenizer, out: str | Path, head: str, max_length: int) -> Path:
    """Write the sentence-transformers folder atomically (a temp folder renamed into place)."""
    out = Path(out)
    if out.exists() and not (out / "modules.json").is_file():
        raise StudentError(f"{out} exists and is not a sentence-transformers folder; refusing to "
                           "replace it. Choose another output folder, or remove it yourself.")
    model = to_sentence_transformer(student, tokenizer, head, max_length)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("Exported head %s (%d dims) to %s", head, student.head_dims[head], out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("source", help="a run folder (runs/NAME) or its student/ folder")
    parser.add_argument("out", help="where to write the sentence-transformers folder")
    parser.add_argument("--head", default=None, help="head to export (default: the first)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    source = Path(args.source)
    folder = source / "student" if (source / "student").is_dir() else source
    student, tokenizer, max_length = load_student(folder)
    head = args.head or next(iter(student.heads))
    with torch.no_grad():
        export_student(student, tokenizer, args.out, head, max_length)


if __name__ == "__main__":
    main()
