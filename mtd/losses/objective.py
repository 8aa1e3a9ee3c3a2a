"""The Jasper training objective of one stage: loss terms per head, weighted, as a dict.

Every term is returned under its own name ("fc1/cos", "fc256/sim", ...) so logs see each one;
a Matryoshka prefix of a head adds its own sim and resim ("fc1@256/sim": the first 256 dims of
fc1, renormalized, against fc1's target);
"loss" is the weighted total (Jasper: 10 cos + 200 sim + 20 resim), summed over heads, or averaged
over heads in image stages (the paper's stage 4).

Contrastive terms (DisCo): "ckd" (the student picks its own target among the batch's and a queue's;
the caller owns the queues and pushes each batch after its loss, see queue_batch), "kl" (the
in-batch similarity distributions), and in pair stages "pair" (anchor picks its positive among
the batch's positives and hard negatives, given as PairOutputs).

Targets come as a dict by source: "teacher" (the multi-teacher target, (B, D_target)) and, in image
stages, "self:HEAD" (the student's own HEAD vectors of the captions, computed by its frozen text
side). A "self:HEAD" source not in the dict is the student's own output of HEAD for the same input
(self-distillation of smaller heads in text stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtd.config import StageConfig
from mtd.losses.terms import (
    contrastive_distillation_loss,
    cosine_loss,
    info_nce_loss,
    pair_info_nce_loss,
    relative_similarity_loss,
    similarity_kl_loss,
    similarity_loss,
)
from mtd.models.student import LOGIT_SCALE

DEFAULT_WEIGHTS = {"cos": 10.0, "sim": 200.0, "resim": 20.0, "nce": 1.0, "ckd": 1.0, "kl": 1.0, "pair": 1.0}


def _prefix(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The first `dim` columns (a Matryoshka prefix; the terms renormalize it), or `x` itself."""
    return x if dim is None else x[:, :dim]


@dataclass(frozen=True)
class PairOutputs:
    """A pair stage's other columns: {head: (B, D)} of the positives and of the hard negatives
    (None without), and the rows' groups (B,) (rows of a group are not each other's negatives)."""

    positive: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None
    groups: torch.Tensor


@dataclass(frozen=True)
class _Extras:
    generator: torch.Generator | None = None
    queues: dict[str, torch.Tensor] | None = None  # target source -> (Q, D) earlier targets
    pairs: PairOutputs | None = None
    outputs: dict[str, torch.Tensor] | None = None  # the student's, for learned temperatures


@dataclass(frozen=True)
class Objective:
    heads: dict[str, tuple[str, ...]]  # head -> loss terms, e.g. {"fc1": ("cos", "sim", "resim")}
    targets: dict[str, str]  # head -> "teacher" or "self:HEAD" (self-distillation)
    weights: dict[str, float]
    matryoshka: dict[str, tuple[int, ...]] = field(default_factory=dict)  # head -> prefix dims
    margin: float = 0.015
    resim_chunk_size: int = 1024
    resim_samples: int | None = None
    temperature: float = 0.05  # nce, ckd (unless learned), kl, pair
    average_heads: bool = False  # image stages: the heads' totals are averaged, not summed
    cos_reduction: str = "sum"  # cos over the batch: sum (the paper's formula) or mean

    @classmethod
    def from_stage(cls, stage: StageConfig) -> Objective:
        weights = DEFAULT_WEIGHTS | stage.weights
        return cls(
            heads={h: tuple(t) for h, t in stage.heads.items()},
            targets=dict(stage.targets),
            weights=weights,
            matryoshka={h: tuple(d) for h, d in stage.matryoshka.items()},
            margin=stage.margin,
            resim_chunk_size=stage.resim_chunk_size,
            resim_samples=stage.resim_samples,
            temperature=stage.temperature,
            average_heads=stage.data == "images",
            cos_reduction=stage.cos_reduction,
        )

    @property
    def heads_used(self) -> set[str]:
        """Heads whose outputs the objective reads: trained ones and self-distillation sources."""
        sources = {t.removeprefix("self:") for t in self.targets.values() if t.startswith("self:")}
        return set(self.heads) | sources

    @property
    def queue_sources(self) -> set[str]:
        """Target sources ("teacher", "self:HEAD") whose earlier batches ckd uses as negatives."""
        return {self.targets.get(h, "teacher") for h, names in self.heads.items() if "ckd" in names}

    def queue_batch(self, outputs: dict[str, torch.Tensor],
                    targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{source: (B, D)}: what this batch adds to each queue (its targets of that source)."""
        heads = {self.targets.get(h, "teacher"): h for h in self.heads}
        return {source: self.target_for(heads[source], outputs, targets) for source in self.queue_sources}

    def parts(self) -> list[tuple[str, str, int | None, str]]:
        """(term name, head, prefix dims or None for the whole head, loss term) of every term."""
        parts = [(f"{head}/{name}", head, None, name) for head, names in self.heads.items() for name in names]
        parts += [(f"{head}@{dim}/{name}", head, dim, name)
                  for head, dims in self.matryoshka.items() for dim in dims for name in ("sim", "resim")]
        return parts

    def target_for(self, head: str, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
        source = self.targets.get(head, "teacher")
        if source in targets:
            return targets[source]
        return outputs[source.removeprefix("self:")].detach()  # the student's own vectors teach

    def __call__(
        self,
        outputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor] | torch.Tensor,
        generator: torch.Generator | None = None,
        queues: dict[str, torch.Tensor] | None = None,
        pairs: PairOutputs | None = None,
    ) -> dict[str, torch.Tensor]:
        """outputs: {head: (B, D_head)} (and learned logit scales, see LOGIT_SCALE); targets:
        {source: (B, D)} or the teacher target (B, D_target); queues: {source: (Q, D)} for ckd;
        pairs: a pair stage's positives and negatives -> {term name: scalar}."""
        if isinstance(targets, torch.Tensor):
            targets = {"teacher": targets}
        extras = _Extras(generator, queues, pairs, outputs)
        terms: dict[str, torch.Tensor] = {}
        device = next(iter(outputs.values())).device
        total = torch.zeros((), dtype=torch.float32, device=device)
        # Float32 even under mixed precision: the margin (0.015) is a few bf16 steps wide.
        with torch.autocast(device_type=device.type, enabled=False):
            for key, head, dim, name in self.parts():
                s = _prefix(outputs[head].float(), dim)
                t = s if name == "pair" else self.target_for(head, outputs, targets).float()  # pair: labels
                terms[key] = value = self._term(name, head, s, t, extras)
                total = total + self.weights[name] * value
            for head in self.heads:  # learned ckd temperatures, for the log
                if LOGIT_SCALE + head in outputs:
                    terms[f"{head}/temperature"] = 1 / outputs[LOGIT_SCALE + head].detach().float()
        terms["loss"] = total / len(self.heads) if self.average_heads else total
        return terms

    def gradient_shares(self, outputs: dict[str, torch.Tensor],
                        targets: dict[str, torch.Tensor] | torch.Tensor,
                        queues: dict[str, torch.Tensor] | None = None,
                        pairs: PairOutputs | None = None) -> dict[str, float]:
        """{"fc1/cos": share, ...}: each weighted term's part of the gradient the student's vectors
        receive, as norms of d(weight * term)/d(vectors) over their sum (shares add up to 1).

        The gradient below the heads is linear in this one, so a term with a share near 0 barely
        trains the model however its value moves. Measured on detached copies: no effect on training.
        """
        if isinstance(targets, torch.Tensor):
            targets = {"teacher": targets}
        norms: dict[str, float] = {}
        with torch.enable_grad(), torch.autocast(next(iter(outputs.values())).device.type, enabled=False):
            vectors = {h: v.detach().float().requires_grad_() for h, v in outputs.items()}
            extras = _Extras(None, queues, pairs, vectors)
            for key, head, dim, name in self.parts():
                t = vectors[head] if name == "pair" else (
                    self.target_for(head, vectors, targets).detach().float())
                value = self.weights[name] * self._term(name, head, _prefix(vectors[head], dim), t, extras)
                (grad,) = torch.autograd.grad(value, vectors[head])
                norms[key] = float(grad.norm())
        total = sum(norms.values()) or 1.0
        return {k: v / total for k, v in norms.items()}

    def _term(self, name: str, head: str, s: torch.Tensor, t: torch.Tensor, extras: _Extras) -> torch.Tensor:
        generator = extras.generator
        if name == "ckd":
            queue = (extras.queues or {}).get(self.targets.get(head, "teacher"))
            scale = (extras.outputs or {}).get(LOGIT_SCALE + head)
            temperature = self.temperature if scale is None else 1 / scale.float()
            return contrastive_distillation_loss(s, t, queue, temperature)
        if name == "kl":
            return similarity_kl_loss(s, t, self.temperature)
        if name == "pair":
            p = extras.pairs
            if p is None:
                raise ValueError("the pair term needs a pair stage's positives (pairs=PairOutputs)")
            negative = None if p.negative is None else p.negative[head].float()
            return pair_info_nce_loss(s, p.positive[head].float(), negative, p.groups, self.temperature)
        if name == "cos":
            return cosine_loss(s, t, self.cos_reduction)
        if name == "sim":
            return similarity_loss(s, t)
        if name == "resim":
            return relative_similarity_loss(s, t, margin=self.margin, chunk_size=self.resim_chunk_size,
                                            num_samples=self.resim_samples, generator=generator)
        if name == "nce":
            return info_nce_loss(s, t, self.temperature)
        raise ValueError(f"Unknown loss term {name!r}; known: {', '.join(DEFAULT_WEIGHTS)}.")
