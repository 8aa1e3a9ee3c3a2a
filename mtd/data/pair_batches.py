"""Batches of labeled pairs for contrastive fine-tuning: every column's token ids computed once,
the anchors' multi-teacher targets (when the stage also distills) read from the target cache."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtd.data.corpus import TargetDataset
from mtd.data.pairs import Pairs
from mtd.data.tokens import TokenizedTexts


class PairDataset(torch.utils.data.Dataset):
    """Row i: pair i. collate(rows) -> ({"anchor", "positive"[, "negative"]: {input_ids,
    attention_mask} (B, T), "groups": (B,)}, {"teacher": (B, D_target)} or {} without teachers)."""

    def __init__(self, pairs: Pairs, tokenizer, max_length: int,
                 teacher_arrays: Sequence[np.ndarray] = (), weights: Sequence[float] = (),
                 progress: bool = True):
        def tokens(texts: list[str], column: str) -> TokenizedTexts:
            return TokenizedTexts.build(tokenizer, texts, max_length, desc=f"tokenize {column}",
                                        progress=progress)

        self.anchors = TargetDataset(pairs.anchor, teacher_arrays, weights,
                                     tokens=tokens(pairs.anchor, "anchors"))
        self.columns = {"positive": tokens(pairs.positive, "positives")}
        if pairs.negative is not None:
            self.columns["negative"] = tokens(pairs.negative, "hard negatives")
        self.groups = torch.from_numpy(np.asarray(pairs.group, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
        inputs = {"anchor": self.anchors.tokens.pad(rows), "groups": self.groups[rows]}
        inputs |= {column: t.pad(rows) for column, t in self.columns.items()}
        targets = {"teacher": self.anchors.collate(rows)[1]} if self.anchors.arrays else {}
        return inputs, targets
