"""Export a student as a sentence-transformers folder: Transformer, Pooling(mean), Dense, Normalize.

`SentenceTransformer(path)` then loads it with no mtd code, so MTEB and any ST tooling work
unchanged. One head is exported per folder (choose it with `head`); the Dense has no activation,
exactly the student's linear head.

A student with an image path also gets `image/` beside the text modules (config.json with the
tower, projection and preprocessing; model.safetensors with the tower, projection and marker
weights). `load_image_text_model(path)` loads both sides in one call: `encode_text(texts)` is
the sentence-transformers model itself, `encode_image(paths or PIL images)` runs the image path
into the same Transformer, Pooling, Dense and Normalize modules.

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

from mtd.hf import resolve_model
from mtd.io import atomic_write_json, read_json
from mtd.models.student import Student, StudentError, load_student

IMAGE_DIR = "image"

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
    if student.image is not None:
        save_image_side(student, tmp / IMAGE_DIR, head)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("Exported head %s (%d dims) to %s", head, student.head_dims[head], out)
    return out


def save_image_side(student: Student, folder: Path, head: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.image.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    atomic_write_json(folder / "config.json", student.image.config() | {"head": head})


class ImageTextModel:
    """A sentence-transformers export plus its image side: one vector space for texts and images."""

    def __init__(self, folder: str | Path, device: str | None = None):
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        from mtd.models.projection import build_image_path
        from mtd.models.vision import ImagePreprocess

        folder = resolve_model(str(folder), "image-text model")
        config_path = folder / IMAGE_DIR / "config.json"
        if not config_path.is_file():
            raise StudentError(f"{folder} has no image side ({IMAGE_DIR}/config.json): it was exported "
                               "from a text-only student. Train an image stage (data: images) first.")
        self.text = SentenceTransformer(str(folder), device=device)
        config = read_json(config_path)
        self.image = build_image_path(config)
        self.image.load_state_dict(load_file(str(folder / IMAGE_DIR / "model.safetensors")))
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
