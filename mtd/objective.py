"""The Jasper training objective of one stage: loss terms per head, weighted, as a dict.

Every term is returned under its own name ("fc1/cos", "fc256/sim", ...) so logs see each one;
"loss" is the weighted total (Jasper: 10 cos + 200 sim + 20 resim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtd.config import StageConfig
from mtd.losses import cosine_loss, relative_similarity_loss, similarity_loss


@dataclass(frozen=True)
class Objective:
    heads: dict[str, tuple[str, ...]]  # head -> loss terms, e.g. {"fc1": ("cos", "sim", "resim")}
    targets: dict[str, str]  # head -> "teacher" or "self:HEAD" (self-distillation)
    weights: dict[str, float]
    margin: float = 0.015
    resim_chunk_size: int = 1024
    resim_samples: int | None = None

    @classmethod
    def from_stage(cls, stage: StageConfig) -> Objective:
        weights = {"cos": 10.0, "sim": 200.0, "resim": 20.0} | stage.weights
        return cls(
            heads={h: tuple(t) for h, t in stage.heads.items()},
            targets=dict(stage.targets),
            weights=weights,
            margin=stage.margin,
            resim_chunk_size=stage.resim_chunk_size,
            resim_samples=stage.resim_samples,
        )

    @property
    def heads_used(self) -> set[str]:
        """Heads whose outputs the objective reads: trained ones and self-distillation sources."""
        sources = {t.removeprefix("self:") for t in self.targets.values() if t.startswith("self:")}
        return set(self.heads) | sources

    def target_for(self, head: str, outputs: dict[str, torch.Tensor], teacher: torch.Tensor):
        source = self.targets.get(head, "teacher")
        if source == "teacher":
            return teacher
        return outputs[source.removeprefix("self:")].detach()  # the student's own vectors teach

    def __call__(
        self,
        outputs: dict[str, torch.Tensor],
        teacher: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """outputs: {head: (B, D_head)}; teacher: (B, D_target) -> {term name: scalar}."""
        terms: dict[str, torch.Tensor] = {}
        total = teacher.new_zeros((), dtype=torch.float32)
        # Float32 even under mixed precision: the margin (0.015) is a few bf16 steps wide.
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            for head, names in self.heads.items():
                s, t = outputs[head].float(), self.target_for(head, outputs, teacher).float()
                for name in names:
                    terms[f"{head}/{name}"] = value = self._term(name, s, t, generator)
                    total = total + self.weights[name] * value
        terms["loss"] = total
        return terms

    def _term(self, name: str, s: torch.Tensor, t: torch.Tensor, generator) -> torch.Tensor:
        if name == "cos":
            return cosine_loss(s, t)
        if name == "sim":
            return similarity_loss(s, t)
        if name == "resim":
            return relative_similarity_loss(s, t, margin=self.margin, chunk_size=self.resim_chunk_size,
                                            num_samples=self.resim_samples, generator=generator)
        raise ValueError(f"Unknown loss term {name!r}; known: cos, sim, resim.")
