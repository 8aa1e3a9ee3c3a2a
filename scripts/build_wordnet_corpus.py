#!/usr/bin/env python3
"""Build a small plain-text corpus from the WordNet 3.0 glosses.

Reads the WordNet database files ``data.noun``, ``data.verb``, ``data.adj``
and ``data.adv``, takes the gloss of every synset (the text after ``| ``),
splits it into the definition (the text before the first ``; "``) and the
quoted usage examples, and writes one text per line to
``data/wordnet/texts.txt``:

* definitions and examples both, whitespace-normalised and stripped;
* empty texts dropped, duplicates dropped (first occurrence kept, reading the
  files in the order noun, verb, adj, adv);
* shuffled deterministically with ``random.Random(0)``;
* truncated (whole lines only) to at most ``--max-bytes`` of UTF-8.

The output is written atomically (temporary file + ``os.replace``), and the
script is deterministic: the same input gives a byte-identical output.

Obtaining the input (Debian / Ubuntu, package ``wordnet-base``)::

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python scripts/build_wordnet_corpus.py --wordnet-dir /tmp/wn/usr/share/wordnet

or ``apt-get install wordnet-base`` and run the script with the default
``--wordnet-dir /usr/share/wordnet``.

WordNet is distributed under the WordNet 3.0 licence ("WordNet 3.0 Copyright
2006 by Princeton University.  All rights reserved."); the licence text must
accompany the corpus (see ``data/wordnet/LICENSE``).

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

LOG = logging.getLogger("build_wordnet_corpus")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_OUTPUT = REPO_ROOT / "data" / "wordnet" / "texts.txt"
DEFAULT_MAX_BYTES = 3_500_000
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SEED = 0

# Boundary between the definition and the first example: `; "`.  A few glosses
# omit the space (`painful;"few ...`), so any whitespace is accepted.
_DEF_EXAMPLE_SPLIT = re.compile(r';\s*"')
# Boundaries between examples: `"; "` normally; splitting on either side of the
# semicolon also copes with the handful of glosses with a missing quote
# (`"drop a hint"; drop names"`, `"bondage to fear:; "he sought ...`) and
# the few that separate examples with a comma (`"...", "..."`).
_EXAMPLE_SPLIT = re.compile(r'"\s*;\s*|;\s*"|"\s*,\s*"')
# Attributed quotations: `"quoted text"- Author Name`.
_ATTRIBUTION = re.compile(r'^(.*)"\s*-+\s*[^"]+$')


def normalise(text: str) -> str:
    """Collapse whitespace runs to one space and strip the ends."""
    return " ".join(text.split())


def clean_example(piece: str) -> str:
    """Turn one raw example fragment into clean text (may return '')."""
    piece = piece.strip()
    if piece.startswith('"'):
        piece = piece[1:]
    match = _ATTRIBUTION.match(piece)
    if match:
        piece = match.group(1)
    piece = piece.strip().strip(";").strip().strip('"')
    return normalise(piece)


def split_gloss(gloss: str) -> list[str]:
    """Split a gloss into [definition, example, example, ...] (raw, uncleaned)."""
    match = _DEF_EXAMPLE_SPLIT.search(gloss)
    if match is None:
        definition, rest = gloss, ""
    else:
        definition, rest = gloss[: match.start()], gloss[match.end() - 1 :]
    texts = [normalise(definition.strip().rstrip(";"))]
    if rest:
        texts.extend(clean_example(piece) for piece in _EXAMPLE_SPLIT.split(rest))
    return texts


def iter_glosses(path: Path) -> Iterator[str]:
    """Yield the gloss of every synset line of one WordNet data.* file."""
    skipped_header = 0
    without_gloss = 0
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):  # licence header at the top of the file
                skipped_header += 1
                continue
            line = line.rstrip("\n")
            if not line.strip():
                continue
            _, sep, gloss = line.partition("| ")
            if not sep:
                without_gloss += 1
                continue
            yield gloss
    LOG.info(
        "%s: skipped %d header lines, %d synset lines without gloss",
        path.name,
        skipped_header,
        without_gloss,
    )


def collect_texts(wordnet_dir: Path) -> list[str]:
    """All unique non-empty definitions and examples, in first-seen order."""
    seen = set()
    texts: list[str] = []
    for name in DATA_FILES:
        path = wordnet_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"WordNet data file not found: {path}")
        n_glosses = 0
        n_before = len(texts)
        for gloss in iter_glosses(path):
            n_glosses += 1
            for text in split_gloss(gloss):
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
        LOG.info(
            "%s: %d glosses, %d new unique texts", name, n_glosses, len(texts) - n_before
        )
    return texts


def truncate_to_bytes(lines: Iterable[str], max_bytes: int) -> list[str]:
    """Keep leading whole lines while the newline-terminated total fits."""
    kept: list[str] = []
    total = 0
    for line in lines:
        size = len(line.encode("utf-8")) + 1
        if total + size > max_bytes:
            break
        kept.append(line)
        total += size
    return kept


def write_atomic(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for line in lines:
                handle.write(line + "\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wordnet-dir",
        type=Path,
        default=DEFAULT_WORDNET_DIR,
        help="directory holding data.noun/verb/adj/adv (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="output text file, one text per line (default: data/wordnet/texts.txt)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="maximum UTF-8 size of the output in bytes (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.max_bytes <= 0:
        raise SystemExit("--max-bytes must be positive")

    texts = collect_texts(args.wordnet_dir)
    random.Random(SEED).shuffle(texts)
    kept = truncate_to_bytes(texts, args.max_bytes)
    write_atomic(args.output, kept)

    size = args.output.stat().st_size
    LOG.info(
        "wrote %s: %d lines (of %d unique texts), %d bytes",
        args.output,
        len(kept),
        len(texts),
        size,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
