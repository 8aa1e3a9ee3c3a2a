"""A corpus's token ids, computed once: batches only pad them.

All rows' ids live in one flat int32 array with row offsets (4 bytes a token, 8 a row), so
millions of texts cost what their tokens do, not a Python list per text, and DataLoader workers
share them with the main process. `pad(rows)` gives exactly what calling the tokenizer on those
rows' texts with `padding=True, truncation=True, max_length=...` gives (input_ids and
attention_mask, padded on the tokenizer's side with its pad token).
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch
from tqdm.auto import tqdm

from mtd.errors import MtdError

TOKENIZE_BATCH = 10_000  # texts per tokenizer call: fast tokenizers parallelize within a call


class TokenizerError(MtdError, ValueError):
    """A tokenizer that cannot pad batches."""


class TokenizedTexts:
    """Row i's token ids are ids[offsets[i]:offsets[i + 1]]."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, pad_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
        self.ids = np.asarray(ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        self.pad_id, self.padding_side = pad_id, padding_side

    @classmethod
    def build(cls, tokenizer, texts: list[str], max_length: int, *, desc: str = "tokenize",
              progress: bool = True) -> TokenizedTexts:
        """Token ids of every text, cut at max_length tokens as the tokenizer cuts them."""
        if tokenizer.pad_token_id is None:
            raise TokenizerError(
                f"The student's tokenizer ({type(tokenizer).__name__}) has no pad token, so batches "
                "of texts of different lengths cannot be padded. Use a tokenizer with one (set "
                "pad_token in its tokenizer_config.json, e.g. to its eos or unk token).")
        chunks, lengths = [], []
        with tqdm(total=len(texts), desc=desc, disable=not progress, unit="texts") as bar:
            for start in range(0, len(texts), TOKENIZE_BATCH):
                rows = tokenizer(texts[start:start + TOKENIZE_BATCH], truncation=True,
                                 max_length=max_length, padding=False, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
                sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
                chunks.append(np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(sizes.sum())))
                lengths.append(sizes)
                bar.update(len(rows))
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        if texts:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        ids = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
        return cls(ids, offsets, int(tokenizer.pad_token_id), tokenizer.padding_side)

    def __len__(self) -> int:
        return len(self.lengths)

    def pad(self, rows) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}: (B, T) int64, T the longest of these rows."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        columns = np.arange(width)
        # Where each row's tokens sit: the first `length` columns, or the last ones (left padding).
        lead = width - lengths if self.padding_side == "left" else np.zeros_like(lengths)
        real = (columns >= lead[:, None]) & (columns < (lead + lengths)[:, None])
        source = self.offsets[rows][:, None] + columns - lead[:, None]
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        input_ids[real] = self.ids[source[real]]
        return {"input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy(real.astype(np.int64))}
