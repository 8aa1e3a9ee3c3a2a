"""Vision towers: pixels -> image tokens, one registry entry per library (timm, open_clip, transformers).

The student's image path (Jasper, stage 4) feeds image TOKENS, not a pooled vector, into the
student, so every tower returns (B, N, Dv) and drops whatever sits after the token stage
(classifier, pooling head, output projection): those parameters would get no gradient.

Token convention, the same for every kind: N = h * w patch (or feature-map) positions in row-major
order. Prefix tokens (CLS, distillation, registers) are dropped, as LLaVA does (select_feature
"patch"): the patch tokens already carry the global context after self-attention, the SigLIP
towers Jasper uses have no CLS token at all, and a uniform grid lets the caller pool tokens
spatially (AdaptiveAvgPool2d over (h, w)) whatever the tower.

Each tower carries its own preprocessing (`ImagePreprocess`) and a `spec()` from which
`build_tower(**spec)` rebuilds the same architecture with random weights, so a saved state_dict
can be loaded back without the original checkpoint. Trainable weights are always float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtd.errors import MtdError
from mtd.hf import resolve_model
from mtd.io import load_safetensors, reading_weights

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pretraining statistics (open_clip constants)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP maps pixels to [-1, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class VisionTowerError(MtdError, ValueError):
    """A vision tower that cannot be built or loaded as asked."""


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _to_rgb(image):
    """A module-level function (not a lambda) so the transform pickles into DataLoader workers."""
    return image.convert("RGB")


@dataclass(frozen=True)
class ImagePreprocess:
    """A tower's own preprocessing; `dataclasses.asdict` gives its JSON form."""

    size: tuple[int, int]  # (H, W) fed to the tower
    resize: int  # shorter side resized to this before the center crop ("shortest" mode)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # a torchvision InterpolationMode value
    # "shortest": resize the shorter side to `resize`, center-crop `size` (timm, CLIP);
    # "squash": resize straight to `size`, aspect ratio ignored (SigLIP's image processor).
    resize_mode: str = "shortest"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocess:
        """Inverse of asdict after a JSON round trip (lists back to tuples)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VisionTowerError(f"Unknown preprocess key(s) {sorted(unknown)}; known: {sorted(known)}.")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def transform(self) -> Callable:
        """RGB (or any mode) PIL image -> (3, H, W) float32, normalized."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        if self.resize_mode == "squash":
            resize = [T.Resize(self.size, interpolation=mode)]
        elif self.resize_mode == "shortest":
            resize = [T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.size)]
        else:
            raise VisionTowerError(f"resize_mode={self.resize_mode!r}; known: 'shortest', 'squash'.")
        return T.Compose([_to_rgb, *resize, T.ToTensor(), T.Normalize(self.mean, self.std)])


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---------------------------------------------------------------------------------------------
# The tower and its registry


class VisionTower(nn.Module):
    """(B, 3, H, W) pixels -> (B, N, Dv) tokens. Subclasses set `self.model` and `_tokens`."""

    def __init__(self, kind: str, name: str, model: nn.Module, width: int, preprocess: ImagePreprocess,
                 model_config: dict[str, Any] | None, trust_remote_code: bool = False):
        super().__init__()
        self.kind = kind
        self.name = name
        self.model = model
        self.width = width
        self.preprocess = preprocess
        self._model_config = model_config
        self._trust_remote_code = trust_remote_code

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, Dv), N = h * w patch positions, row-major."""
        return self._tokens(pixel_values)

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serializable kwargs: `build_tower(**spec)` rebuilds this architecture, random weights."""
        return {
            "kind": self.kind,
            "name": self.name,
            "pretrained": None,
            "model_config": self._model_config,
            "trust_remote_code": self._trust_remote_code,
            "preprocess": asdict(self.preprocess),
        }


TOWERS: dict[str, Callable[..., VisionTower]] = {}


def register_tower(kind: str) -> Callable:
    def add(builder: Callable[..., VisionTower]) -> Callable[..., VisionTower]:
        TOWERS[kind] = builder
        return builder

    return add


def build_tower(kind: str, name: str, pretrained: str | None = None, model_config: dict | None = None,
                trust_remote_code: bool = False, preprocess: dict | None = None) -> VisionTower:
    """The `kind` tower `name`; `preprocess` (asdict of an ImagePreprocess) overrides its own.

    pretrained: None for random weights, a local weights file, or the library's own source
    (a timm/open_clip tag); see each builder. The tower's weights are float32 whatever was stored.
    """
    if kind not in TOWERS:
        known = ", ".join(sorted(TOWERS))
        raise VisionTowerError(f"Unknown vision tower kind {kind!r}; known kinds: {known}.")
    tower = TOWERS[kind](name, pretrained=pretrained, model_config=model_config,
                         trust_remote_code=trust_remote_code)
    if preprocess is not None:
        tower.preprocess = ImagePreprocess.from_dict(preprocess)
    return tower.float()


# ---------------------------------------------------------------------------------------------
# Weights from a local file


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or a torch file read with weights_only=True (never a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise VisionTowerError(f"Weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles: say so, not a traceback
        raise VisionTowerError(f"{path}: not a plain tensor checkpoint ({exc}). Use .safetensors.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The `prefix` sub-module's weights when the file holds a whole model (e.g. CLIP's visual.)."""
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], dropped: set[str], source: str) -> None:
    """Strict load, except keys of the parts the tower dropped (classifier, pooling head).

    So a whole-model checkpoint and a tower-only state dict both load, and nothing else slips by.
    """
    state = {k: v for k, v in state.items() if k not in dropped}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise VisionTowerError(
            f"{source} does not fit the tower: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {bad_shape[:5]}."
        )
    module.load_state_dict(state, strict=True)


def _keys(module: nn.Module) -> set[str]:
    return set(module.state_dict())


# ---------------------------------------------------------------------------------------------
# timm


def prune_timm_head(model: nn.Module) -> None:
    """Drop what follows forward_features: classifier, global pool, ViT's attention pool and fc_norm.

    fc_norm (ViTs pooled by 'avg') normalizes the pooled vector only, so tokens never reach it.
    """
    model.reset_classifier(0, "")
    if isinstance(getattr(model, "fc_norm", None), nn.Module):
        model.fc_norm = nn.Identity()


def timm_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """forward_features as (B, N, D): feature maps flattened, prefix tokens dropped."""
    x = model.forward_features(pixel_values)
    if x.ndim == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC":  # Swin-style trunks
            return x.flatten(1, 2)  # (B, h, w, C) -> (B, h*w, C)
        return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
    return x[:, getattr(model, "num_prefix_tokens", 0):]  # (B, P + N, D) -> (B, N, D)


class TimmTower(VisionTower):
    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return timm_tokens(self.model, pixel_values)


def timm_preprocess(model: nn.Module, model_config: dict[str, Any]) -> ImagePreprocess:
    """timm's data config; an img_size in model_config wins (timm keeps the pretrained size there)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    size = _pair(model_config["img_size"]) if "img_size" in model_config else _pair(cfg["input_size"][1:])
    return ImagePreprocess(
        size=size,
        resize=int(min(size) / cfg.get("crop_pct", 1.0)),  # timm's scale_size = floor(size / crop_pct)
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


@register_tower("timm")
def build_timm(name: str, pretrained: str | None = None, model_config: dict | None = None,
               trust_remote_code: bool = False) -> VisionTower:
    """Any timm model. pretrained: None (random), a local weights file, or "timm" (timm's hub weights).

    model_config: extra kwargs for timm.create_model (e.g. img_size, embed_dim, depth for tiny ViTs).
    """
    import timm

    model_config = dict(model_config or {})
    model = timm.create_model(name, pretrained=pretrained == "timm", **model_config)
    full_keys = _keys(model)
    prune_timm_head(model)
    if pretrained not in (None, "timm"):
        load_weights(model, read_weights(pretrained), full_keys - _keys(model), str(pretrained))
    return TimmTower("timm", name, model, model.num_features, timm_preprocess(model, model_config),
                     model_config)


# ---------------------------------------------------------------------------------------------
# open_clip


def prune_open_clip_visual(visual: nn.Module) -> None:
    """Keep the token path of an open_clip visual tower; drop its projection and pooling head."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, TimmModel):  # SigLIP & co: tokens come from the timm trunk
        prune_timm_head(visual.trunk)
        visual.head = nn.Sequential()  # the projection after pooling
    elif isinstance(visual, VisionTransformer):
        visual.output_tokens = True
        visual.proj = None  # projects the pooled vector only; forward skips it when None
        if visual.final_ln_after_pool and visual.attn_pool is None:
            visual.ln_post = nn.Identity()  # then it normalizes the pooled vector only
    else:
        raise VisionTowerError(
            f"open_clip visual tower {type(visual).__name__} has no token output here; "
            "supported: VisionTransformer (ViT-*) and TimmModel (SigLIP and other timm trunks)."
        )


class OpenClipTower(VisionTower):
    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "trunk"):
            return timm_tokens(self.model.trunk, pixel_values)
        _, tokens = self.model(pixel_values)  # output_tokens=True: (pooled, (B, N, D) patch tokens)
        return tokens


def _open_clip_width(visual: nn.Module) -> int:
    return visual.trunk.num_features if hasattr(visual, "trunk") else visual.transformer.width


def _open_clip_preprocess(visual: nn.Module, preprocess_cfg: dict[str, Any] | None) -> ImagePreprocess:
    """From open_clip's preprocess_cfg (size, mean, std, interpolation, resize_mode)."""
    from open_clip.model import get_model_preprocess_cfg

    cfg = dict(preprocess_cfg or get_model_preprocess_cfg(visual) or {})
    size = _pair(cfg.get("size", visual.image_size))
    return ImagePreprocess(
        size=size,
        resize=min(size),  # open_clip crops nothing beyond the resize (crop_pct 1)
        mean=tuple(cfg.get("mean", OPENAI_MEAN)),
        std=tuple(cfg.get("std", OPENAI_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode="squash" if cfg.get("resize_mode") == "squash" else "shortest",
    )


def _visual_config(name: str, visual: nn.Module) -> dict[str, Any] | None:
    """The vision part of a named open_clip model's config, for spec(); None if not a built-in name."""
    import open_clip
    from open_clip.transformer import QuickGELU

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return None
    return {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": cfg["vision_cfg"],
        # a pretrained tag (e.g. openai) may switch QuickGELU on; read it off the built tower
        "quick_gelu": any(isinstance(m, QuickGELU) for m in visual.modules()),
        "preprocess_cfg": dict(visual.preprocess_cfg),
    }


@register_tower("open_clip")
def build_open_clip(name: str, pretrained: str | None = None, model_config: dict | None = None,
                    trust_remote_code: bool = False) -> VisionTower:
    """An open_clip model's visual tower.

    Without model_config: open_clip.create_model(name, pretrained) (a tag or a local checkpoint),
    keeping only .visual. With model_config (open_clip's model config format: embed_dim,
    vision_cfg, quick_gelu, optional preprocess_cfg): only the vision tower is built, random or
    from a local weights file (whole-CLIP files are cut down to their visual.* keys).
    """
    import open_clip
    from open_clip.model import _build_vision_tower

    if model_config is None:
        visual = open_clip.create_model(name, pretrained=pretrained, precision="fp32", device="cpu").visual
        preprocess = _open_clip_preprocess(visual, None)
        model_config = _visual_config(name, visual)
        pretrained = None  # loaded by open_clip
    else:
        model_config = dict(model_config)
        visual = _build_vision_tower(model_config["embed_dim"], model_config["vision_cfg"],
                                     quick_gelu=model_config.get("quick_gelu", False))
        preprocess = _open_clip_preprocess(visual, model_config.get("preprocess_cfg"))
    full_keys = _keys(visual)
    prune_open_clip_visual(visual)
    if pretrained is not None:
        state = _strip_prefix(read_weights(pretrained), "visual.")
        load_weights(visual, state, full_keys - _keys(visual), str(pretrained))
    return OpenClipTower("open_clip", name, visual, _open_clip_width(visual), preprocess, model_config)


# ---------------------------------------------------------------------------------------------
# transformers


def _hf_family(model_type: str) -> str:
    for family in ("siglip", "clip"):
        if model_type in (family, f"{family}_vision_model"):
            return family
    raise VisionTowerError(
        f"transformers vision tower model_type {model_type!r} is not supported; known: "
        "siglip, siglip_vision_model, clip, clip_vision_model."
    )


def _hf_default_preprocess(family: str, image_size: int) -> ImagePreprocess:
    """Without a preprocessor_config.json: what SigLIP's / CLIP's image processors do by default."""
    size = _pair(image_size)
    if family == "siglip":
        return ImagePreprocess(size, min(size), SIGLIP_MEAN, SIGLIP_STD, "bicubic", "squash")
    return ImagePreprocess(size, min(size), OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest")


def _hf_preprocess(folder: Path, family: str, image_size: int) -> ImagePreprocess:
    """From the folder's preprocessor_config.json if there is one."""
    from mtd.io import read_json

    default = _hf_default_preprocess(family, image_size)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return default
    cfg = read_json(path)
    size_cfg = cfg.get("size") or {}
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if crop:  # CLIP: shortest edge to size, then a center crop
        size = (crop["height"], crop["width"]) if isinstance(crop, dict) else _pair(crop)
        resize = size_cfg.get("shortest_edge", min(size)) if isinstance(size_cfg, dict) else size_cfg
        mode = "shortest"
    else:  # SigLIP: straight to (height, width)
        size = (size_cfg["height"], size_cfg["width"]) if "height" in size_cfg else default.size
        resize, mode = min(size), "squash"
    return ImagePreprocess(
        size=_pair(size),
        resize=int(resize),
        mean=tuple(cfg.get("image_mean", default.mean)),
        std=tuple(cfg.get("image_std", default.std)),
        interpolation=_PIL_RESAMPLE.get(cfg.get("resample"), default.interpolation),
        resize_mode=mode,
    )


def prune_hf_vision(model: nn.Module, family: str) -> None:
    """CLIP's post_layernorm normalizes the pooled CLS only; last_hidden_state comes before it."""
    if family == "clip":
        model.post_layernorm = nn.Identity()


class TransformersTower(VisionTower):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = _hf_family(self._model_config["model_type"])

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixel_values).last_hidden_state  # (B, P + N, D)
        return hidden[:, 1:] if self.family == "clip" else hidden  # CLIP's first token is CLS


def _hf_config_dict(config) -> dict[str, Any]:
    d = config.to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        d.pop(key, None)  # a rebuild is float32 and owes nothing to where the weights came from
    return d


@register_tower("transformers")
def build_transformers(name: str, pretrained: str | None = None, model_config: dict | None = None,
                       trust_remote_code: bool = False) -> VisionTower:
    """SiglipVisionModel / CLIPVisionModel. Weights from `name` (folder or hub id) unless
    model_config (a config dict with model_type) is given: then random, or from the local
    weights file `pretrained`. SigLIP's attention-pooling head is not built (vision_use_head=False).
    """
    from transformers import (
        AutoConfig,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    classes = {"siglip": (SiglipVisionConfig, SiglipVisionModel), "clip": (CLIPVisionConfig, CLIPVisionModel)}
    if model_config is None:
        if pretrained is not None:
            logger.warning("transformers tower %s: weights come from the folder; pretrained=%r is ignored.",
                           name, pretrained)
        folder = resolve_model(name, "student.vision.name")
        auto = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        family = _hf_family(auto.model_type)
        config_cls, model_cls = classes[family]
        # from_pretrained of the vision config also reads a whole CLIP/SigLIP config's vision part
        config = config_cls.from_pretrained(folder)
        if family == "siglip":
            config.vision_use_head = False
        with reading_weights(folder):
            model = model_cls.from_pretrained(folder, config=config, use_safetensors=True,
                                              trust_remote_code=trust_remote_code)
        preprocess = _hf_preprocess(folder, family, config.image_size)
    else:
        family = _hf_family(model_config.get("model_type", ""))
        config_cls, model_cls = classes[family]
        kwargs = {k: v for k, v in model_config.items() if k != "model_type"}
        if family == "siglip":
            kwargs["vision_use_head"] = False
        config = config_cls(**kwargs)
        model = model_cls(config)
        preprocess = _hf_default_preprocess(family, config.image_size)
    full_keys = _keys(model)
    prune_hf_vision(model, family)
    if model_config is not None and pretrained is not None:
        state = _strip_prefix(read_weights(pretrained), "vision_model.")
        load_weights(model, state, full_keys - _keys(model), str(pretrained))
    return TransformersTower("transformers", name, model, config.hidden_size, preprocess,
                             _hf_config_dict(config), trust_remote_code)
