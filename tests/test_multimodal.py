"""The image path: projection pool, stage 4 (Jasper), image data, export and loading, eval.py.

The end-to-end tests run configs/tiny-multimodal.yaml: tiny random text teachers, a tiny random
timm ViT, synthetic images of coloured shapes whose captions say what is drawn.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mtd.config import load_config
from mtd.data import images
from mtd.export import load_image_text_model
from mtd.losses.objective import Objective
from mtd.models.projection import ImagePath, ProjectionPool
from mtd.models.student import Student, encode, load_student, set_train_mode, set_trainable
from mtd.models.vision import build_tower
from mtd.training import pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY_MM = ROOT / "configs" / "tiny-multimodal.yaml"
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


# ---------------------------------------------------------------------------------------------
# Projection pool


def test_pool_projection_is_jaspers_adaptive_average_over_tokens_and_features():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 12)  # (B, N, Dv)
    out = ProjectionPool(12, 5, tokens=4, mode="pool")(x)  # (B, K, H)
    assert out.shape == (2, 4, 5)
    # AdaptiveAvgPool2d's bins: rows [floor(i*N/K), ceil((i+1)*N/K)), same for columns.
    ref = torch.empty(2, 4, 5)
    for i in range(4):
        r0, r1 = (i * 10) // 4, -(-((i + 1) * 10) // 4)
        for j in range(5):
            c0, c1 = (j * 12) // 5, -(-((j + 1) * 12) // 5)
            ref[:, i, j] = x[:, r0:r1, c0:c1].mean(dim=(1, 2))
    torch.testing.assert_close(out, ref)
    assert not list(ProjectionPool(12, 5, 4, "pool").parameters())  # parameter-free, as the paper


def test_linear_projection_pools_tokens_then_maps_features():
    torch.manual_seed(0)
    proj = ProjectionPool(6, 3, tokens=2, mode="linear")
    x = torch.randn(1, 4, 6)
    ref = proj.linear(torch.stack([x[0, :2].mean(0), x[0, 2:].mean(0)]))[None]
    torch.testing.assert_close(proj(x), ref)


# ---------------------------------------------------------------------------------------------
# A tiny multimodal student built in the test


def tiny_student(tiny_assets: Path, projection: str = "linear") -> tuple[Student, object]:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64), add_pooling_layer=False)
    tower = build_tower("timm", "vit_tiny_patch16_224", model_config=TINY_VIT)
    image = ImagePath(tower, 32, tokens=4, projection=projection,
                      begin_id=tokenizer.cls_token_id, end_id=tokenizer.sep_token_id)
    return Student(encoder, {"fc1": 24, "fc8": 8}, image), tokenizer


def test_image_sequence_is_framed_by_the_encoders_own_begin_and_end_tokens(tiny_assets):
    student, tokenizer = tiny_student(tiny_assets)
    words = student.encoder.get_input_embeddings()
    embeds, mask = student.image(torch.randn(3, 3, 32, 32), words)
    assert embeds.shape == (3, 4 + 4, 32) and mask.shape == (3, 8) and bool(mask.all())
    torch.testing.assert_close(embeds[:, 0], words.weight[tokenizer.cls_token_id].expand(3, -1))
    torch.testing.assert_close(embeds[:, -1], words.weight[tokenizer.sep_token_id].expand(3, -1))
    torch.testing.assert_close(embeds[:, 1], student.image.markers[0].expand(3, -1))
    torch.testing.assert_close(embeds[:, -2], student.image.markers[1].expand(3, -1))


@pytest.mark.parametrize("mode, trained", [
    ("vision", {"image.tower.", "image.projection.", "image.markers"}),
    ("vision:projection,markers", {"image.projection.", "image.markers"}),
    ("vision:tower", {"image.tower."}),
])
def test_stage4_gradients_reach_exactly_the_vision_parts_it_trains(tiny_assets, mode, trained):
    student, _ = tiny_student(tiny_assets)
    names = set(set_trainable(student, mode, heads=["fc1", "fc8"]))
    assert names and all(n.startswith(tuple(trained)) for n in names)
    set_train_mode(student)
    objective = Objective(heads={"fc1": ("cos", "sim", "resim"), "fc8": ("sim", "resim", "nce")},
                          targets={"fc1": "self:fc1", "fc8": "self:fc8"}, weights={
                              "cos": 10.0, "sim": 200.0, "resim": 20.0, "nce": 1.0}, average_heads=True)
    outputs = student(pixel_values=torch.randn(6, 3, 32, 32))
    targets = {"self:fc1": torch.randn(6, 24), "self:fc8": torch.randn(6, 8)}
    objective(outputs, targets)["loss"].backward()
    got = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == names  # every trained parameter learns, and nothing else gets a gradient
    assert not student.encoder.training and not student.heads.training  # frozen text side: eval
    assert student.image.tower.training == ("tower" in mode or mode == "vision")


def test_frozen_cnn_tower_keeps_its_batchnorm_statistics(tiny_assets):
    student, _ = tiny_student(tiny_assets)
    student.image.tower = build_tower("timm", "efficientnet_lite0", model_config={})
    set_trainable(student, "vision:projection,markers", heads=[])
    set_train_mode(student)
    before = {k: v.clone() for k, v in student.image.tower.state_dict().items() if "running" in k}
    student.image.tower(torch.randn(2, 3, 64, 64))
    after = {k: v for k, v in student.image.tower.state_dict().items() if "running" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Image-caption data


def write_set(folder: Path, n: int, broken: set[int] = frozenset()) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        path = folder / "images" / f"{i}.png"
        if i in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        else:
            Image.new("RGB", (16 + i, 20), (10 * i, 0, 0)).save(path)
        lines.append(json.dumps({"image": f"images/{i}.png", "captions": [f"cap {i} a", f"cap {i} b"]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def test_broken_images_are_skipped_counted_and_logged_with_their_path(tmp_path, caplog):
    data = images.read_jsonl_sets([write_set(tmp_path, 5, broken={1, 3})])
    with caplog.at_level("WARNING"):
        kept = images.keep_decodable(data)
    assert len(kept.images) == 3 and kept.captions == ["cap 0 a", "cap 0 b", "cap 2 a", "cap 2 b",
                                                      "cap 4 a", "cap 4 b"]
    assert kept.owner.tolist() == [0, 0, 1, 1, 2, 2]
    assert "1.png" in caplog.text and "3.png" in caplog.text and "Skipped 2 of 5" in caplog.text


def test_a_set_with_no_decodable_image_stops_naming_the_files(tmp_path):
    data = images.read_jsonl_sets([write_set(tmp_path, 2, broken={0, 1})])
    with pytest.raises(images.ImageDataError, match=r"0\.png"):
        images.keep_decodable(data)


def test_image_targets_mean_of_normalized_captions_or_a_reproducible_draw(tmp_path):
    data = images.keep_decodable(images.read_jsonl_sets([write_set(tmp_path, 3)]))
    target = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    transform = lambda im: torch.zeros(3, 2, 2)  # noqa: E731
    mean = images.ImageCaptionDataset(data, {"teacher": target}, transform, "mean")
    _, targets = mean.collate([mean[(0, 1)]])
    t = target[2:4] / np.linalg.norm(target[2:4], axis=1, keepdims=True)
    want = t.mean(0) / np.linalg.norm(t.mean(0))
    np.testing.assert_allclose(targets["teacher"][0].numpy(), want, rtol=1e-5)
    sample = images.ImageCaptionDataset(data, {"teacher": target}, transform, "sample", seed=3)
    draws = [sample[(step, 1)][1] for step in range(40)]
    assert set(draws) == {2, 3}  # only image 1's captions, both of them over the steps
    assert draws == [sample[(step, 1)][1] for step in range(40)]  # a pure function of (step, image)


# ---------------------------------------------------------------------------------------------
# The tiny multimodal run, end to end


@pytest.fixture(scope="module")
def mm_run(tiny_assets, tmp_path_factory):
    """configs/tiny-multimodal.yaml on the session's tiny assets: stages 1-3, then stage 4."""
    tmp = tmp_path_factory.mktemp("mm")
    q = json.dumps
    overrides = [
        f"synthetic_assets={q(str(tiny_assets))}", f"output_dir={q(str(tmp / 'runs'))}",
        f"cache_dir={q(str(tmp / 'cache'))}",
        f"teachers.0.path={q(str(tiny_assets / 'teacher_a'))}",
        f"teachers.1.path={q(str(tiny_assets / 'teacher_b'))}",
        f"data.corpus=[{q(str(tiny_assets / 'corpus.txt'))}]",
        f"student.path={q(str(tiny_assets / 'tokenizer'))}",
        f"images.train=[{q(str(tiny_assets / 'images' / 'train.jsonl'))}]",
        f"images.eval={q(str(tiny_assets / 'images' / 'test.jsonl'))}",
    ]
    cfg = load_config(TINY_MM, overrides)
    return pipeline.run(cfg), cfg


def test_stage4_alignment_loss_goes_down_and_images_find_their_captions(mm_run):
    run_dir, _ = mm_run
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    stage4 = [r for r in rows if r["stage_name"] == "stage4" and "loss" in r]
    assert {"fc1/cos", "fc1/sim", "fc1/resim", "fc16/cos", "fc16/sim", "fc16/resim"} <= set(stage4[0])
    assert stage4[-1]["loss"] < 0.6 * stage4[0]["loss"]
    results = json.loads((run_dir / "results.json").read_text())
    recall = next(r for r in results if r.get("task") == "image-text")
    assert recall["images"] == 60 and recall["i2t_R@5"] > 40 and recall["t2i_R@5"] > 40  # chance ~8


def test_stage4_leaves_the_text_side_bit_identical(mm_run):
    run_dir, cfg = mm_run
    before = load_file(str(run_dir / "checkpoints" / "2-stage3-end" / "model.safetensors"))
    after = load_file(str(run_dir / "checkpoints" / "3-stage4-end" / "model.safetensors"))
    text = [k for k in before if not k.startswith("image.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("image."))


def test_saved_and_exported_image_vectors_match_the_trained_student(mm_run, tiny_assets):
    run_dir, _ = mm_run
    student, tokenizer, max_length = load_student(run_dir / "student")
    student.eval()
    paths = sorted((tiny_assets / "images" / "images").iterdir())[:5]
    pixels = torch.stack([student.image.tower.preprocess.transform()(images.open_image(p)) for p in paths])
    with torch.no_grad():
        mine = torch.nn.functional.normalize(student(pixel_values=pixels)["fc1"], dim=-1).numpy()
    model = load_image_text_model(run_dir / "final", device="cpu")
    np.testing.assert_allclose(model.encode_image(paths), mine, atol=1e-5)
    np.testing.assert_allclose(model.encode_image([Image.open(p) for p in paths]), mine, atol=1e-5)
    texts = ["a red circle", "a blue square"]
    np.testing.assert_allclose(model.encode_text(texts), encode(student, tokenizer, texts, "fc1", max_length),
                               atol=1e-5)


def test_export_text_side_is_a_plain_sentence_transformer(mm_run):
    from sentence_transformers import SentenceTransformer

    run_dir, _ = mm_run
    model = SentenceTransformer(str(run_dir / "final"), device="cpu")
    assert model.encode(["a red circle"]).shape == (1, 80)


def test_eval_py_scores_image_text_on_the_export(mm_run, tiny_assets, tmp_path):
    run_dir, _ = mm_run
    data = tmp_path / "data" / "shapes"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text((tiny_assets / "images" / "test.jsonl").read_text())
    (data / "images").symlink_to(tiny_assets / "images" / "images")
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"student={run_dir}", "--data",
                           str(tmp_path / "data"), "--tasks", "image-text", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert rows and rows[0]["task"] == "image-text" and rows[0]["i2t_R@5"] > 40


def test_stage4_alone_on_top_of_an_existing_run(mm_run, tmp_path):
    """init: run takes a finished run's text side (heads included) and aligns a new tower to it."""
    run_dir, cfg = mm_run
    q = json.dumps
    alone = load_config(TINY_MM, [
        f"output_dir={q(str(tmp_path))}", "name=alone", f"cache_dir={q(cfg.cache_dir)}",
        f"synthetic_assets={q(cfg.synthetic_assets)}", "student.init=run", f"student.path={q(str(run_dir))}",
        f"images.train={q(cfg.images.train)}", f"images.eval={q(cfg.images.eval)}",
        "stages=[{name: align, data: images, train: vision, heads: {fc1: [cos, sim, resim]}, "
        "targets: {fc1: 'self:fc1'}, lr: 3.0e-3, steps: 10, batch_size: 32}]",
        "teachers=[]", "data.corpus=[]",
    ])
    out = pipeline.run(alone)
    base, _, _ = load_student(run_dir / "student")
    new, _, _ = load_student(out / "student")
    for k, v in base.state_dict().items():
        if not k.startswith("image."):
            assert torch.equal(v, new.state_dict()[k]), k


def test_any_sentence_transformers_model_can_be_the_frozen_text_side(tiny_assets):
    from sentence_transformers import SentenceTransformer

    from mtd.models.student import StudentError, student_from_sentence_transformer

    student, tokenizer = student_from_sentence_transformer(tiny_assets / "teacher_a")  # mean pooling
    texts = ["kalo mire sati", "vozepo dafi gu he", "ka"]
    ours = encode(student, tokenizer, texts, "fc1", max_length=32)
    theirs = SentenceTransformer(str(tiny_assets / "teacher_a"), device="cpu").encode(texts)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    with pytest.raises(StudentError, match="mean Pooling"):
        student_from_sentence_transformer(tiny_assets / "teacher_b")  # CLS pooling: not this student


def test_torchvision_timm_and_open_clip_import_beside_the_cpu_torch():
    """mtd.compat lets torchvision's Python part import where its compiled ops cannot load; the
    patch is idempotent and a no-op where the ops exist."""
    code = ("import mtd, torchvision, timm, open_clip; from transformers import BertModel; "
            "from mtd.compat import patch_torchvision; assert patch_torchvision() is False; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_frozen_towers_precomputed_tokens_give_the_same_vectors_as_pixels(tiny_assets):
    student, _ = tiny_student(tiny_assets)
    student.eval()
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        direct = student(pixel_values=pixels)
        cached = student(vision_tokens=student.image.tower(pixels))
    for head in direct:
        torch.testing.assert_close(direct[head], cached[head])


def test_hub_image_caption_sets_load_like_jsonl(tmp_path, offline_datasets):
    """A local folder laid out like a hub repo (parquet with an image and a captions column)."""
    rows = {"img": [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)],
            "caps": [["a", "b"], ["c"], ["d", "e"]]}
    ds = offline_datasets
    features = ds.Features({"img": ds.Image(), "caps": ds.Sequence(ds.Value("string"))})
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    offline_datasets.Dataset.from_dict(rows, features=features).to_parquet(str(repo / "train-00000.parquet"))
    data = images.keep_decodable(images.read_hub_set(str(tmp_path / "repo"), "train", "img", "caps"))
    assert data.captions == ["a", "b", "c", "d", "e"] and data.owner.tolist() == [0, 0, 1, 2, 2]
    assert data.load(data.images[1]).getpixel((0, 0)) == (40, 0, 0)
    with pytest.raises(images.ImageDataError, match="image_column"):
        images.read_hub_set(str(tmp_path / "repo"), "train", "picture", "caps")


def test_stage4_resumed_mid_stage_equals_uninterrupted(mm_run, tmp_path):
    """Caption vectors (self targets) are rebuilt from the restored student, captions drawn per step
    replay, so stopping and resuming inside stage 4 changes nothing."""
    run_dir, cfg = mm_run
    q = json.dumps

    def config(name: str, *extra: str):
        return load_config(TINY_MM, [
            f"output_dir={q(str(tmp_path))}", f"name={name}", f"cache_dir={q(cfg.cache_dir)}",
            f"synthetic_assets={q(cfg.synthetic_assets)}", "student.init=run",
            f"student.path={q(str(run_dir))}", f"images.train={q(cfg.images.train)}", "images.eval=null",
            "stages=[{name: align, data: images, train: vision, captions: sample, heads: {fc1: [cos, sim, "
            "resim], fc16: [sim, resim]}, targets: {fc1: 'self:fc1', fc16: 'self:fc16'}, lr: 3.0e-3, "
            "steps: 12, batch_size: 32}]", "teachers=[]", "data.corpus=[]", "train.save_every=4", *extra])

    whole = pipeline.run(config("whole"))
    assert pipeline.run(config("parts", "train.max_steps_per_job=6")) is not None
    parts = pipeline.run(config("parts", "train.max_steps_per_job=6"), resume=True)
    a, _, _ = load_student(whole / "student")
    b, _, _ = load_student(parts / "student")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=1e-6, msg=k)
