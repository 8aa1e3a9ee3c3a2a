"""Vision towers: contract tests per registry entry (tiny random models), loading, preprocessing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mtd.errors import MtdError
from mtd.models.vision import TOWERS, ImagePreprocess, VisionTowerError, build_tower

ROOT = Path(__file__).resolve().parents[1]
COCO = Path("/work/shared/data/image_text/coco_mini")

TINY_HF = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8)
# name -> (kind, name, model_config, input (H, W), tokens N)
TINY = {
    "timm-vit": ("timm", "vit_tiny_patch16_224",
                 dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), (32, 32), 16),
    # a real CNN architecture at a small input: feature map (B, 1280, 2, 2) -> 4 tokens
    "timm-cnn": ("timm", "efficientnet_lite0", {}, (64, 64), 4),
    "open_clip-vit": ("open_clip", "tiny-ViT",
                      dict(embed_dim=16, vision_cfg=dict(width=32, layers=1, head_width=16, patch_size=8,
                                                         image_size=32)), (32, 32), 16),
    # SigLIP layout (timm trunk, attention-pool 'map', no projection) on the smallest timm ViT;
    # open_clip's TimmModel does not pass image_size on to timm, so it runs at 224.
    "open_clip-siglip": ("open_clip", "tiny-SigLIP",
                         dict(embed_dim=16,
                              vision_cfg=dict(image_size=224, timm_model_name="vit_tiny_patch16_224",
                                              timm_pool="map", timm_proj="none"),
                              preprocess_cfg=dict(mean=[0.5] * 3, std=[0.5] * 3, resize_mode="squash")),
                         (224, 224), 196),
    "hf-siglip": ("transformers", "tiny-siglip", dict(model_type="siglip_vision_model", **TINY_HF),
                  (32, 32), 16),
    "hf-clip": ("transformers", "tiny-clip", dict(model_type="clip_vision_model", **TINY_HF),
                (32, 32), 16),
}


def _build(case: str):
    kind, name, model_config, size, n = TINY[case]
    torch.manual_seed(0)
    return build_tower(kind, name, model_config=model_config), size, n


@pytest.mark.parametrize("case", list(TINY))
def test_tokens_shape_and_finite(case):
    tower, (h, w), n = _build(case)
    tokens = tower(torch.randn(2, 3, h, w))
    assert tokens.shape == (2, n, tower.width)
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


@pytest.mark.parametrize("case", list(TINY))
def test_gradients_reach_every_trainable_parameter(case):
    tower, (h, w), _ = _build(case)
    tower(torch.randn(2, 3, h, w)).sum().backward()
    params = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
    assert params
    dead = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient from the tokens: {dead}"


@pytest.mark.parametrize("case", list(TINY))
def test_spec_rebuilds_the_same_tower(case):
    tower, (h, w), _ = _build(case)
    spec = json.loads(json.dumps(tower.spec()))  # must survive JSON
    assert spec["pretrained"] is None
    torch.manual_seed(1)  # other random weights, so only load_state_dict can make them agree
    rebuilt = build_tower(**spec)
    rebuilt.load_state_dict(tower.state_dict(), strict=True)
    assert rebuilt.preprocess == tower.preprocess and rebuilt.width == tower.width
    x = torch.randn(2, 3, h, w)
    tower.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(tower(x), rebuilt(x))


@pytest.mark.parametrize("case", list(TINY))
def test_preprocess_gives_the_tower_size(case):
    tower, _, _ = _build(case)
    pre = tower.preprocess
    assert json.loads(json.dumps(tower.spec()))["preprocess"]["size"] == list(pre.size)
    image = Image.new("RGBA", (53, 29), (200, 30, 90, 255))  # odd size, not RGB
    pixels = pre.transform()(image)
    assert pixels.shape == (3, *pre.size) and pixels.dtype == torch.float32
    expected = (200 / 255 - pre.mean[0]) / pre.std[0]  # a flat image: every pixel normalized alike
    assert torch.allclose(pixels[0], torch.full(pre.size, expected), atol=1e-3)


def test_timm_img_size_and_data_config():
    tower, _, _ = _build("timm-vit")
    assert tower.preprocess == ImagePreprocess((32, 32), 35, (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest")
    cnn, _, _ = _build("timm-cnn")  # timm's data config: 224 / crop_pct 0.875 -> 256
    assert cnn.preprocess.size == (224, 224) and cnn.preprocess.resize == 256
    assert cnn.preprocess.mean == (0.485, 0.456, 0.406)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(VisionTowerError) as err:
        build_tower("keras", "resnet50")
    assert isinstance(err.value, MtdError)
    for kind in ("open_clip", "timm", "transformers"):
        assert kind in str(err.value) and kind in TOWERS


@pytest.mark.parametrize("case", ["timm-cnn", "open_clip-vit", "hf-clip"])
def test_float16_file_loads_as_float32(case, tmp_path):
    tower, (h, w), _ = _build(case)
    tower.eval()
    half = {k: v.half() for k, v in tower.model.state_dict().items()}
    save_file(half, str(tmp_path / "w.safetensors"))
    kind, name, model_config, _, _ = TINY[case]
    loaded = build_tower(kind, name, pretrained=str(tmp_path / "w.safetensors"), model_config=model_config)
    assert {p.dtype for p in loaded.state_dict().values() if p.is_floating_point()} == {torch.float32}
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, half[k].to(v.dtype)), k  # the file's values, not the random init


def test_transformers_folder_float16_and_preprocessor_config(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_HF)).half().save_pretrained(tmp_path)
    processor = {"crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
                 "size": {"shortest_edge": 40},
                 "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    tower = build_tower("transformers", str(tmp_path))
    assert {p.dtype for p in tower.parameters()} == {torch.float32}
    assert tower.preprocess == ImagePreprocess((32, 32), 40, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear")
    # the folder is not needed to rebuild: spec carries the config and the preprocessing
    rebuilt = build_tower(**json.loads(json.dumps(tower.spec())))
    rebuilt.load_state_dict(tower.state_dict())
    assert rebuilt.preprocess == tower.preprocess
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower.eval()(x), rebuilt.eval()(x))


def test_whole_model_checkpoint_loads_and_a_wrong_one_is_refused(tmp_path):
    import timm

    kind, name, model_config, (h, w), _ = TINY["timm-vit"]
    full = timm.create_model(name, **model_config)  # with its classifier: dropped on load
    torch.save(full.state_dict(), tmp_path / "full.pth")
    tower = build_tower(kind, name, pretrained=str(tmp_path / "full.pth"), model_config=model_config)
    with torch.no_grad():
        assert torch.allclose(tower.eval()(torch.ones(1, 3, h, w)),
                              full.eval().forward_features(torch.ones(1, 3, h, w))[:, 1:])
    with pytest.raises(VisionTowerError, match="missing"):
        deeper = {**model_config, "depth": 2}
        build_tower(kind, name, pretrained=str(tmp_path / "full.pth"), model_config=deeper)
    torch.save({"model": full, "note": object()}, tmp_path / "pickle.pth")  # arbitrary pickle
    with pytest.raises(VisionTowerError, match="safetensors"):
        build_tower(kind, name, pretrained=str(tmp_path / "pickle.pth"), model_config=model_config)


def _install_teachers():
    path = ROOT / "scripts" / "install_teachers.py"
    spec = importlib.util.spec_from_file_location("install_teachers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_efficientnet_lite0_real_weights(tmp_path):
    import timm
    from safetensors.torch import load_file
    from timm.data import ImageNetInfo

    install = _install_teachers().install_efficientnet_lite0
    install(tmp_path)
    weights = tmp_path / "efficientnet_lite0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    install(tmp_path)  # idempotent: a finished file is left alone
    assert weights.stat().st_mtime_ns == stamp

    tower = build_tower("timm", "efficientnet_lite0", pretrained=str(weights)).eval()
    assert tower.preprocess.size == (224, 224)
    with torch.no_grad():
        assert tower(torch.randn(2, 3, 224, 224)).shape == (2, 49, 1280)

    photo = COCO / "images" / "000000538113.jpg"  # "A man hitting a baseball with a baseball bat."
    if not photo.is_file():
        pytest.skip(f"{photo} missing")
    full = timm.create_model("efficientnet_lite0")
    full.load_state_dict(load_file(str(weights)), strict=True)
    with torch.no_grad():
        logits = full.eval()(tower.preprocess.transform()(Image.open(photo))[None])
    top3 = [ImageNetInfo().index_to_description(i) for i in logits[0].topk(3).indices.tolist()]
    assert any("ballplayer" in t for t in top3), top3
