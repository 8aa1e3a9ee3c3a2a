"""A faster model from a slower one: keep some of a teacher's layers and distill them back.

    python -m mtd.layers TEACHER --keep 0,5,11 [--config configs/default.yaml] [--name NAME]
                         [key=value ...]
    accelerate launch -m mtd.layers ...        (the same, on many GPUs)

Seed 001's option 2: the student is TEACHER itself with only the `--keep` encoder layers (in that
order, 0-based), and TEACHER alone is the teacher; the recipe (corpus, heads, stages, eval) is
--config's, `configs/default.yaml` by default, so the student learns its teacher's vectors with
the same cos + sim + resim stages as any mtd run. `--keep N` (one number) keeps N layers spread
evenly from the first to the last (the last layer is the one mean pooling was trained on). The
run lands in OUTPUT_DIR/NAME (default NAME: TEACHER's folder name plus `-layers-` and the kept
indices) with its sentence-transformers export in final/; key=value overrides go on top.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from mtd.config import ConfigError, load_config
from mtd.errors import cli_main

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def spread(count: int, layers: int) -> list[int]:
    """`count` layer indices of `layers`, evenly from the first to the last ([layers-1] for 1)."""
    if not 1 <= count <= layers:
        raise ConfigError(f"--keep {count}: the teacher has {layers} layers; keep 1 to {layers}.")
    if count == 1:
        return [layers - 1]
    return [round(i * (layers - 1) / (count - 1)) for i in range(count)]


def teacher_layers(path: str) -> int:
    """The number of encoder layers of a sentence-transformers or transformers folder."""
    from mtd.hf import resolve_model, transformer_subfolder
    from mtd.io import read_json

    config = transformer_subfolder(resolve_model(path, "teacher")) / "config.json"
    n = read_json(config).get("num_hidden_layers") if config.is_file() else None
    if isinstance(n, int):
        return n
    raise ConfigError(f"{path}: no config.json with num_hidden_layers; give a transformers or "
                      "sentence-transformers folder.")


def parse_keep(keep: str, path: str) -> list[int]:
    if not re.fullmatch(r"\d+(,\d+)*", keep.replace(" ", "")):
        raise ConfigError(f"--keep {keep!r}: give layer indices like 0,5,11, or one number of layers.")
    values = [int(v) for v in keep.replace(" ", "").split(",")]
    layers = teacher_layers(path)
    if len(values) == 1:
        return spread(values[0], layers)
    bad = [v for v in values if v >= layers]
    if bad or len(set(values)) != len(values):
        raise ConfigError(f"--keep {keep}: the teacher has layers 0..{layers - 1}; give distinct "
                          f"indices among them{f' ({bad} are not)' if bad else ''}.")
    return values


def layer_config(teacher: str, keep: list[int], base: Path, name: str | None, overrides: list[str]):
    """--config with TEACHER as the only teacher and as the student, cut to `keep`. A teacher of
    --config with the same path keeps its settings (name, max_length, batch size: its target cache
    is reused); another gets the student's max_length, so both read the same tokens."""
    recipe = load_config(base, overrides)
    where = Path(teacher).expanduser().resolve()
    same = [t for t in recipe.teachers if Path(t.path).expanduser().resolve() == where]
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(teacher.rstrip("/")).name) or "teacher"
    q = json.dumps
    settings = ({"name": same[0].name, "max_length": same[0].max_length, "batch_size": same[0].batch_size}
                if same else {"name": tag, "max_length": recipe.student.max_length})
    entry = ", ".join(f"{k}: {q(v)}" for k, v in settings.items() if v is not None)
    return load_config(base, [
        f"teachers=[{{{entry}, path: {q(teacher)}}}]",
        "student.init=teacher", f"student.path={q(teacher)}", f"student.layers={q(keep)}",
        f"name={q(name or tag + '-layers-' + '-'.join(map(str, keep)))}",
        *overrides,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("teacher", help="sentence-transformers folder (or hub id) to cut and distill")
    parser.add_argument("--keep", required=True,
                        help="layer indices to keep, e.g. 0,5,11; or one number N: N layers spread evenly")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="the recipe: corpus, heads, stages, eval (default: configs/default.yaml)")
    parser.add_argument("--name", default=None, help="run name (default: TEACHER-layers-INDICES)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides on top, e.g. stages.2.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> int:
        cfg = layer_config(args.teacher, parse_keep(args.keep, args.teacher), args.config, args.name,
                           args.overrides)
        logging.getLogger(__name__).info("Student: %s with layers %s of it; run %s", args.teacher,
                                         cfg.student.layers, cfg.run_dir)
        from mtd.training.pipeline import run

        run(cfg, resume=args.resume)
        return 0

    return cli_main("layers", body)


if __name__ == "__main__":
    sys.exit(main())
