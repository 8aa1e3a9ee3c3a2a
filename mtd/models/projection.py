"""The bridge from a vision tower into the text encoder (Jasper section 2.1, stage 4).

A tower's tokens (B, N, Dv) are pooled to K tokens of the text encoder's hidden size H and spliced
into its input sequence as [CLS] [IMG] v_1 ... v_K [/IMG] [SEP], where [IMG] and [/IMG] are two
trainable marker embeddings and [CLS]/[SEP] are the encoder's own (frozen) word embeddings. The
text encoder, its mean pooling and the same FC heads then turn the sequence into the image's
vector, so images and texts share one encoder, one set of heads and one vector space.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from mtd.models.vision import VisionTower

PROJECTIONS = ("pool", "linear")


class ProjectionPool(nn.Module):
    """(B, N, Dv) vision tokens -> (B, K, H) text-encoder input embeddings.

    pool:   Jasper's parameter-free AdaptiveAvgPool2d over (tokens, features) -> (K, H): each output
            is the mean of a rectangle of the token x feature grid (729 x 1152 -> 300 x H there).
    linear: average-pool the tokens to K, then a trained Linear(Dv, H) maps the features; a
            learned map can pick the features the text encoder can read, where averaging
            neighbouring channels of a CNN or ViT mixes unrelated ones.
    """

    def __init__(self, in_dim: int, out_dim: int, tokens: int, mode: str = "linear"):
        super().__init__()
        if mode not in PROJECTIONS:
            raise ValueError(f"projection {mode!r}: use one of {PROJECTIONS}.")
        self.in_dim, self.out_dim, self.tokens, self.mode = in_dim, out_dim, tokens, mode
        self.linear = nn.Linear(in_dim, out_dim) if mode == "linear" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            return F.adaptive_avg_pool2d(tokens.unsqueeze(1), (self.tokens, self.out_dim)).squeeze(1)
        pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.tokens).transpose(1, 2)  # (B, K, Dv)
        return self.linear(pooled)


class ImagePath(nn.Module):
    """Tower -> projection pool -> marker-framed input embeddings for the text encoder.

    `forward` returns (inputs_embeds (B, K + 4, H), attention_mask (B, K + 4)); the sequence starts
    and ends with the text encoder's own begin/end token embeddings (`begin_id`, `end_id`, e.g.
    BERT's [CLS] and [SEP]) so the encoder sees the framing it was trained with.
    """

    def __init__(self, tower: VisionTower, hidden: int, tokens: int, projection: str,
                 begin_id: int | None, end_id: int | None):
        super().__init__()
        self.tower = tower
        self.projection = ProjectionPool(tower.width, hidden, tokens, projection)
        self.markers = nn.Parameter(torch.randn(2, hidden) * 0.02)  # [IMG], [/IMG]; BERT's init std
        self.begin_id, self.end_id = begin_id, end_id

    def parts(self) -> dict[str, nn.Module | nn.Parameter]:
        """The separately trainable parts, by the names stage configs use (vision:PART,...)."""
        return {"tower": self.tower, "projection": self.projection, "markers": self.markers}

    def forward(self, pixel_values: torch.Tensor | None, word_embeddings: nn.Embedding,
                tokens: torch.Tensor | None = None):
        """(B, 3, H_img, W_img) pixels, or the tower's (B, N, Dv) tokens computed beforehand (a frozen
        tower), -> ((B, T, H), (B, T)) with T = K + 2 markers + begin/end tokens."""
        projected = self.projection(self.tower(pixel_values) if tokens is None else tokens)  # (B, K, H)
        b = projected.shape[0]
        start, stop = (m.expand(b, 1, -1).to(projected.dtype) for m in self.markers.split(1))
        pieces = [start, projected, stop]
        ids = [i for i in (self.begin_id, self.end_id) if i is not None]
        if ids:
            special = word_embeddings(torch.tensor(ids, device=projected.device)).to(projected.dtype)
            if self.begin_id is not None:
                pieces.insert(0, special[0].expand(b, 1, -1))
            if self.end_id is not None:
                pieces.append(special[-1].expand(b, 1, -1))
        embeds = torch.cat(pieces, dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def config(self) -> dict:
        """What `build_image_path` needs to rebuild this path around random weights."""
        return {"tower": self.tower.spec(), "hidden": self.projection.out_dim,
                "tokens": self.projection.tokens, "projection": self.projection.mode,
                "begin_id": self.begin_id, "end_id": self.end_id,
                "preprocess": dataclasses.asdict(self.tower.preprocess)}


def special_ids(tokenizer) -> tuple[int | None, int | None]:
    """The ids a text sequence begins and ends with: [CLS]/[SEP] (BERT) or <s>/</s> (RoBERTa, MPNet)."""
    begin = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return begin, end


def build_image_path(config: dict) -> ImagePath:
    """An ImagePath from `ImagePath.config()` with random weights (load a state dict after)."""
    from mtd.models.vision import build_tower

    tower = build_tower(**config["tower"])
    return ImagePath(tower, config["hidden"], config["tokens"], config["projection"],
                     config["begin_id"], config["end_id"])
