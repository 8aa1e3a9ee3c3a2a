"""End-to-end training on the tiny assets: outputs, learning, resume, failures, variants, DDP."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from gradprobe import launch_two_processes
from safetensors.torch import load_file

import mtd.losses.objective
from mtd.config import ConfigError, dump_config, load_config
from mtd.data.tokens import TokenizedTexts
from mtd.models.student import encode, load_student, pooled_features
from mtd.training import pipeline, trainer
from mtd.training.trainer import NonFiniteLossError, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# 10 optimizer steps per stage, a log row, dev evaluation and checkpoint every 5.
FAST = ("stages.0.steps=10", "stages.1.steps=10", "stages.2.steps=10",
        "train.log_every=5", "train.eval_every=5", "train.save_every=5")
TERMS = ("fc1/cos", "fc1/sim", "fc1/resim", "loss", "lr")
STAGE3_TERMS = ("fc16/sim", "fc16/resim")


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def train_rows(rows: list[dict], stage: int | None = None) -> list[dict]:
    return [r for r in rows if "loss" in r and (stage is None or r["stage"] == stage)]


def dev_rows(rows: list[dict], stage: int | None = None) -> list[dict]:
    return [r for r in rows if "dev/loss" in r and (stage is None or r["stage"] == stage)]


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    student, _, _ = load_student(run_dir / "student")
    return student.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def assert_same_function(run_a: Path, run_b: Path, atol: float):
    """Both students give the same vectors (every head) for the corpus's first texts.

    Weights of differently batched or distributed runs can differ where the gradient is zero
    analytically but rounding noise in practice (e.g. attention key biases), which AdamW's
    normalized first steps blow up to lr-sized moves; the function computed does not see them."""
    texts = (Path(load_config(run_a / "config.yaml").data.corpus[0]).read_text().splitlines())[:200]
    (sa, tok, n), (sb, _, _) = load_student(run_a / "student"), load_student(run_b / "student")
    for head in sa.heads:
        np.testing.assert_allclose(encode(sa, tok, texts, head, n), encode(sb, tok, texts, head, n),
                                   rtol=0, atol=atol, err_msg=head)
    for k, v in sa.heads.state_dict().items():
        torch.testing.assert_close(v, sb.heads.state_dict()[k], rtol=0, atol=atol, msg=k)


def assert_same_rows(a: list[dict], b: list[dict], rel: float = 0.0):
    assert [(r["stage"], r["step"], sorted(r)) for r in a] == [(r["stage"], r["step"], sorted(r)) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if isinstance(v, float):
                where = (ra["stage"], ra["step"], k)
                assert rb[k] == pytest.approx(v, rel=rel, abs=1e-12 if rel else 0), where
            else:
                assert rb[k] == v


def run_in_jobs(cfg_with_budget, cfg_no_budget) -> int:
    """A budgeted first job, then resumed jobs under the same budget, then one without it."""
    pipeline.run(cfg_with_budget)
    jobs = 1
    while not (cfg_no_budget.run_dir / "student").is_dir() and jobs < 20:
        pipeline.run(cfg_with_budget, resume=True)
        jobs += 1
    return jobs


# ---------------------------------------------------------------------------------------------
# A whole run


def test_tiny_run_writes_everything_and_learns(config):
    cfg = config()  # configs/tiny.yaml as is: 3 stages of 40, 40 and 200 steps
    run_dir = pipeline.run(cfg)
    assert run_dir == cfg.run_dir

    saved = load_config(run_dir / "config.yaml")
    assert dump_config(saved) == dump_config(cfg)

    rows = read_log(run_dir)
    keys = [(r["stage"], r["step"], "dev/loss" in r) for r in rows]
    assert len(keys) == len(set(keys)), "a log row was written twice"
    for stage in range(3):
        steps = cfg.stages[stage].steps
        train = train_rows(rows, stage)
        assert [r["step"] for r in train] == list(range(5, steps + 1, 5))
        assert [r["step"] for r in dev_rows(rows, stage)] == list(range(20, steps + 1, 20))
        expected = set(TERMS) | (set(STAGE3_TERMS) if stage == 2 else set())
        for r in train:
            assert set(r) - {"stage", "stage_name", "step"} == expected, r
            assert r["stage_name"] == cfg.stages[stage].name
            assert all(math.isfinite(r[k]) for k in expected)
        for r in dev_rows(rows, stage):
            terms = expected - {"lr", "loss"}
            assert set(r) - {"stage", "stage_name", "step"} == (
                {f"dev/{t}" for t in terms | {"loss"}} | {f"dev/share/{t}" for t in terms})
            assert sum(r[f"dev/share/{t}"] for t in terms) == pytest.approx(1.0)
        assert train[0]["lr"] > 0 and train[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0

    # Learning: stage 1's loss falls, and stage 3 ends far below where stage 1 ended on dev texts.
    s1 = train_rows(rows, 0)
    assert s1[-1]["loss"] < 0.5 * s1[0]["loss"]
    assert dev_rows(rows, 2)[-1]["dev/loss"] < 0.5 * dev_rows(rows, 0)[-1]["dev/loss"]
    assert dev_rows(rows, 2)[-1]["dev/fc1/cos"] < dev_rows(rows, 0)[-1]["dev/fc1/cos"]

    ckpts = run_dir / "checkpoints"
    for name in ("0-stage1-end", "1-stage2-end", "2-stage3-end"):
        assert (ckpts / name / "model.safetensors").is_file() and (ckpts / name / "state.json").is_file()
    # Mid-stage checkpoints: only the newest keep_checkpoints (2) survive.
    mids = sorted(d.name for d in ckpts.iterdir() if "-end" not in d.name)
    last = cfg.stages[2].steps
    assert mids == [f"2-stage3-step{last - 40:07d}", f"2-stage3-step{last - 20:07d}"]
    # The student/ folder is the last stage's end state.
    end = load_file(str(ckpts / "2-stage3-end" / "model.safetensors"))
    assert_same_weights(student_weights(run_dir), end)
    # ... and different from the end of stage 1 (stage 3 trains everything).
    stage1 = load_file(str(ckpts / "0-stage1-end" / "model.safetensors"))
    emb = "encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(stage1[emb], end[emb])

    assert (run_dir / "final" / "modules.json").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert {r["set"] for r in results} == {"agreement with teacher_a", "agreement with teacher_b"}
    # An untrained student agrees ~25 / ~20; the 200 steps of configs/tiny.yaml reach ~80 / ~34.
    # teacher_b (1-layer, [CLS]) is much harder to learn than teacher_a, and the teachers agree
    # only ~17 with each other, so no student of their concatenation gets far on both.
    agreement = {r["set"]: r["spearman"] for r in results}
    assert agreement["agreement with teacher_a"] > 60 and agreement["agreement with teacher_b"] > 30


def test_equal_configs_give_equal_runs(config):
    # Two runs in one process: the student init must not depend on what ran before.
    a = pipeline.run(config("name=a", *FAST))
    torch.randn(100)  # disturb the global RNG between the runs
    b = pipeline.run(config("name=b", *FAST))
    assert_same_weights(student_weights(a), student_weights(b))
    assert_same_rows(train_rows(read_log(a)), train_rows(read_log(b)))


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize(
    "budget, dropout",
    [
        (15, 0.0),  # stops mid stage 2 (at its step 5, on a mid-stage checkpoint)
        (10, 0.0),  # stops exactly at the end of stage 1
        (15, 0.1),  # dropout: the RNG state must come back with the checkpoint
        (20, 0.1),  # stops exactly at the end of stage 2, with dropout
    ],
)
def test_resume_equals_uninterrupted(config, budget, dropout):
    extra = (*FAST, f"student.model_config.hidden_dropout_prob={dropout}")
    a = pipeline.run(config("name=a", *extra))
    cfg_b = config("name=b", *extra, f"train.max_steps_per_job={budget}")
    b = pipeline.run(cfg_b)
    assert not (b / "student").exists() and not (b / "final").exists()
    found = latest_checkpoint(b)
    assert found is not None
    stage, rem = divmod(budget, 10)
    assert (found[1].stage, found[1].step, found[1].done) == ((stage, rem, False) if rem else
                                                              (stage - 1, 10, True))
    pipeline.run(config("name=b", *extra), resume=True)
    assert_same_weights(student_weights(a), student_weights(b))
    rows_a, rows_b = read_log(a), read_log(b)
    assert_same_rows(train_rows(rows_a), train_rows(rows_b))
    assert_same_rows(dev_rows(rows_a), dev_rows(rows_b))
    assert len(rows_a) == len(rows_b)


def test_length_grouped_run_resumes_equal_with_workers(config, caplog):
    """train.group_by_length: the batches differ from random ones, stay a function of the step
    (a resumed run, here with DataLoader workers, equals an uninterrupted one), and the stage start
    says how much padding grouping saves."""
    # Per-step encoder in stage 1 too (its frozen features would have no padding to group).
    grouped = (*FAST, "train.group_by_length=true", "train.frozen_features=false")
    with caplog.at_level(logging.INFO, logger="mtd.training.trainer"):
        a = pipeline.run(config("name=a", *grouped))
    shares = [re.search(r"Stage stage1: padding is ([\d.]+)% of the tokens in random batches and "
                        r"([\d.]+)% in length-grouped ones \(train.group_by_length=true\)", m)
              for m in caplog.messages]
    (random_share, grouped_share), = [tuple(map(float, m.groups())) for m in shares if m]
    assert grouped_share < random_share / 2
    b = pipeline.run(config("name=b", *grouped, "train.max_steps_per_job=15", "train.num_workers=2"))
    assert latest_checkpoint(b)[1].stage == 1
    pipeline.run(config("name=b", *grouped, "train.num_workers=2"), resume=True)
    assert_same_weights(student_weights(a), student_weights(b))
    assert_same_rows(read_log(a), read_log(b))
    plain = pipeline.run(config("name=plain", *FAST, "train.frozen_features=false"))
    assert train_rows(read_log(plain))[0]["loss"] != train_rows(read_log(a))[0]["loss"]


def test_many_short_jobs_with_unaligned_budget(config):
    """Jobs of 7 steps (not a multiple of log_every): weights match, and every log row is the
    mean of exactly the steps it covers (checked against a run logging every step)."""
    per_step = pipeline.run(config("name=ref", *FAST, "train.log_every=1"))
    cfg = config("name=jobs", *FAST)
    jobs = run_in_jobs(config("name=jobs", *FAST, "train.max_steps_per_job=7"), cfg)
    assert jobs == 5  # 30 steps in jobs of 7
    assert_same_weights(student_weights(per_step), student_weights(cfg.run_dir))

    ref = {(r["stage"], r["step"]): r for r in train_rows(read_log(per_step))}
    rows = train_rows(read_log(cfg.run_dir))
    keys = [(r["stage"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) and keys == sorted(keys)
    for stage in range(3):
        steps = [r["step"] for r in rows if r["stage"] == stage]
        assert {5, 10} <= set(steps)
        prev = 0
        for r in (r for r in rows if r["stage"] == stage):
            covered = [ref[(stage, s)] for s in range(prev + 1, r["step"] + 1)]
            for k in r:
                if k in ("stage", "stage_name", "step"):
                    continue
                expected = covered[-1][k] if k == "lr" else sum(c[k] for c in covered) / len(covered)
                assert r[k] == pytest.approx(expected, rel=1e-9), (stage, r["step"], k)
            prev = r["step"]


def test_rerun_without_resume_refuses(config):
    cfg = config(*FAST, "train.max_steps_per_job=5")
    pipeline.run(cfg)
    before = (cfg.run_dir / "log.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        pipeline.run(cfg)
    assert (cfg.run_dir / "log.jsonl").read_text() == before
    assert latest_checkpoint(cfg.run_dir)[1].step == 5


def test_resume_without_checkpoints_starts_fresh_and_a_finished_run_stays(config):
    cfg = config(*FAST)
    pipeline.run(cfg, resume=True)
    assert (cfg.run_dir / "student").is_dir()
    log, weights = (cfg.run_dir / "log.jsonl").read_text(), student_weights(cfg.run_dir)
    pipeline.run(cfg, resume=True)  # every stage done: nothing is trained or logged again
    assert (cfg.run_dir / "log.jsonl").read_text() == log
    assert_same_weights(weights, student_weights(cfg.run_dir))


# ---------------------------------------------------------------------------------------------
# Failures


@pytest.mark.parametrize(
    "bad_call, stage_name, step, last, last_row",
    [
        (8, "stage1", 8, "0-stage1-step0000005", (0, 5)),  # mid stage 1: the step-5 checkpoint
        (13, "stage2", 3, "0-stage1-end", (0, 10)),  # early in stage 2: the end of stage 1
    ],
)
def test_non_finite_loss_stops_with_last_good_checkpoint(config, monkeypatch, bad_call, stage_name,
                                                         step, last, last_row):
    real = mtd.losses.objective.similarity_loss
    calls = {"n": 0}

    def flaky_similarity_loss(s, t):
        value = real(s, t)
        # Training steps only: dev evaluation runs under no_grad, and its gradient shares take
        # detached leaf copies (no grad_fn).
        if torch.is_grad_enabled() and s.grad_fn is not None:
            calls["n"] += 1  # stages 1 and 2 compute one sim term per step
            if calls["n"] == bad_call:
                return value * float("nan")
        return value

    monkeypatch.setattr(mtd.losses.objective, "similarity_loss", flaky_similarity_loss)
    cfg = config("name=nan", *FAST)
    with pytest.raises(NonFiniteLossError) as e:
        pipeline.run(cfg)
    msg = str(e.value)
    assert f"stage {stage_name!r}" in msg and f"at step {step}:" in msg
    assert str(cfg.run_dir / "checkpoints" / last) in msg and "--resume" in msg
    found = latest_checkpoint(cfg.run_dir)
    assert found is not None and found[0].name == last
    assert (found[0] / "model.safetensors").is_file()
    assert not (cfg.run_dir / "student").exists()
    # Nothing after the failing step was logged.
    assert max((r["stage"], r["step"]) for r in read_log(cfg.run_dir)) == last_row

    # The kept checkpoint loads: resuming from it finishes the same run as an uninterrupted one.
    monkeypatch.setattr(mtd.losses.objective, "similarity_loss", real)
    pipeline.run(cfg, resume=True)
    ref = pipeline.run(config("name=ref", *FAST))
    assert_same_weights(student_weights(ref), student_weights(cfg.run_dir))
    assert_same_rows(train_rows(read_log(ref)), train_rows(read_log(cfg.run_dir)))


def test_non_finite_loss_between_log_rows_stops_before_the_next_checkpoint(config, monkeypatch):
    """Loss values are read only where something is written: with rows every 20 steps and
    checkpoints every 5, a NaN at step 8 is found at the step-10 checkpoint, which is not saved."""
    real = mtd.losses.objective.similarity_loss
    calls = {"n": 0}

    def flaky_similarity_loss(s, t):
        calls["n"] += s.grad_fn is not None
        return real(s, t) * (float("nan") if calls["n"] == 8 and s.grad_fn is not None else 1.0)

    monkeypatch.setattr(mtd.losses.objective, "similarity_loss", flaky_similarity_loss)
    cfg = config("name=nan", "stages.0.steps=20", "train.log_every=20", "train.eval_every=0",
                 "train.save_every=5")
    with pytest.raises(NonFiniteLossError, match="'stage1' at step 8:.*0-stage1-step0000005"):
        pipeline.run(cfg)
    assert latest_checkpoint(cfg.run_dir)[0].name == "0-stage1-step0000005"
    assert not (cfg.run_dir / "log.jsonl").exists()  # no row was due before the failure


# ---------------------------------------------------------------------------------------------
# Variants


def test_grad_accum_matches_full_batch_for_a_per_row_loss(config):
    """cos is a sum over rows, so 2 accumulated half batches (loss / 2) give half the full batch's
    gradient; AdamW is scale invariant, so the weights must match the full-batch run."""
    cos_only = [f"stages.{i}.heads={{fc1: [cos]}}" for i in range(3)] + ["train.max_grad_norm=null"]
    full = pipeline.run(config("name=full", *FAST, *cos_only))
    half = (*FAST, *cos_only, "train.grad_accum=2", *(f"stages.{i}.batch_size=16" for i in range(3)))
    accum = pipeline.run(config("name=accum", *half))
    assert_same_function(full, accum, atol=1e-5)
    rows_full, rows_accum = read_log(full), read_log(accum)
    assert [(r["stage"], r["step"]) for r in rows_accum] == [(r["stage"], r["step"]) for r in rows_full]
    for rf, ra in zip(rows_full, rows_accum, strict=True):
        # Logged terms are per batch (here 16 rows), averaged over the accumulated batches.
        key = "fc1/cos" if "loss" in rf else "dev/fc1/cos"
        assert 2 * ra[key] == pytest.approx(rf[key], rel=1e-4)
        if "lr" in rf:
            assert ra["lr"] == pytest.approx(rf["lr"], rel=1e-9)


def test_grad_accum_all_terms_runs_and_logs(config):
    half = (*FAST, "train.grad_accum=2", *(f"stages.{i}.batch_size=16" for i in range(3)))
    run_dir = pipeline.run(config(*half))
    rows = read_log(run_dir)
    for stage in range(3):
        train = train_rows(rows, stage)
        assert [r["step"] for r in train] == [5, 10]
        expected = set(TERMS) | (set(STAGE3_TERMS) if stage == 2 else set())
        assert all(set(r) - {"stage", "stage_name", "step"} == expected for r in train)
        assert all(math.isfinite(r[k]) for r in train for k in expected)
    s1 = train_rows(rows, 0)
    assert s1[-1]["loss"] < s1[0]["loss"]
    assert (run_dir / "final" / "modules.json").is_file()


def test_self_distillation_target(config):
    """Stage 3 trains fc16 alone on the student's own fc1 vectors (frozen): its loss must fall."""
    # 100 steps: fc16 (16-d) fits a real 80-d fc1 of text content only slowly (per-batch loss is
    # noisy around its trend; at 40 steps the last row sat at ~0.67 of the first).
    sd = ("stages.2.train=heads", "stages.2.heads={fc16: [sim, resim]}", "stages.2.lr=1e-2",
          "stages.2.steps=100", "train.eval_every=20")
    run_dir = pipeline.run(config("name=self", *FAST, *sd, "stages.2.targets={fc16: 'self:fc1'}"))
    rows = read_log(run_dir)
    train = train_rows(rows, 2)
    assert all(set(r) - {"stage", "stage_name", "step"} == {*STAGE3_TERMS, "loss", "lr"} for r in train)
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    dev = dev_rows(rows, 2)
    assert dev[-1]["dev/loss"] < dev[0]["dev/loss"]
    # fc1, the source, is not trained by its own distillation target.
    ckpts = run_dir / "checkpoints"
    before = load_file(str(ckpts / "1-stage2-end" / "model.safetensors"))
    after = load_file(str(ckpts / "2-stage3-end" / "model.safetensors"))
    assert torch.equal(before["heads.fc1.weight"], after["heads.fc1.weight"])
    assert not torch.equal(before["heads.fc16.weight"], after["heads.fc16.weight"])
    # The same stage against the teacher gives other fc16 numbers: the target really changed.
    teacher = pipeline.run(config("name=teacher", *FAST, *sd))
    assert train_rows(read_log(teacher), 2)[0]["fc16/sim"] != train[0]["fc16/sim"]


def test_resim_sampled_mode(config):
    exact = pipeline.run(config("name=exact", *FAST))
    run_dir = pipeline.run(config("name=sampled", *FAST, "stages.0.resim_samples=5000"))
    rows = train_rows(read_log(run_dir), 0)
    ref = train_rows(read_log(exact), 0)
    assert [r["step"] for r in rows] == [5, 10]
    for r, e in zip(rows, ref, strict=True):
        assert math.isfinite(r["fc1/resim"]) and r["fc1/resim"] > 0
        assert r["fc1/resim"] != e["fc1/resim"]  # sampled, not the exact value ...
        assert r["fc1/resim"] == pytest.approx(e["fc1/resim"], rel=0.5)  # ... but an estimate of it
    assert (run_dir / "student").is_dir()
    # Sampling is seeded per step: a second run gives the same numbers.
    again = pipeline.run(config("name=sampled2", *FAST, "stages.0.resim_samples=5000"))
    assert_same_rows(train_rows(read_log(run_dir)), train_rows(read_log(again)))


SHORT = ("stages.0.steps=4", "stages.1.steps=4", "stages.2.steps=4", "train.log_every=2",
         "train.eval_every=0", "train.save_every=2")


def _compiled_run_matches_plain(config, name: str):
    plain = pipeline.run(config("name=plain", *SHORT))
    compiled = pipeline.run(config(f"name={name}", *SHORT, "train.compile=true"))
    for folder in ("0-stage1-end", "2-stage3-step0000002", "2-stage3-end"):
        a, b = (load_file(str(r / "checkpoints" / folder / "model.safetensors")) for r in (plain, compiled))
        assert_same_weights(a, b, atol=1e-5)  # the same names (no "_orig_mod."), the same training
    assert_same_weights(student_weights(plain), student_weights(compiled), atol=1e-5)
    assert (compiled / "final" / "modules.json").is_file()
    assert_same_rows(train_rows(read_log(plain)), train_rows(read_log(compiled)), rel=1e-4)


def test_compiled_encoder_keeps_its_weight_names(config, monkeypatch):
    """train.compile through dynamo's eager backend (seconds; the default backend takes minutes on a
    CPU): checkpoints, student/ and final/ are those of an uncompiled run."""
    real, compiled = torch.nn.Module.compile, []

    def eager_compile(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return real(module, *args, **kwargs | {"backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    _compiled_run_matches_plain(config, "eager")
    assert compiled == ["BertModel"]


@pytest.mark.compile
def test_compiled_encoder_trains_like_the_plain_one(config):
    _compiled_run_matches_plain(config, "inductor")


# ---------------------------------------------------------------------------------------------
# Two processes


def _launch(yaml_path: Path, *args: str, use_cpu: bool = True, script: Path = ROOT / "train.py",
            backend: tuple[str, ...] = ("--multi_gpu",)) -> subprocess.CompletedProcess:
    """train.py in two CPU processes (see gradprobe.launch_two_processes)."""
    return launch_two_processes(script, str(yaml_path), *args, use_cpu=use_cpu, backend=backend)


@pytest.mark.multiprocess
def test_two_processes_match_one(config, tmp_path):
    base = config("name=one", *FAST)
    one = pipeline.run(base)

    cache2 = tmp_path / "cache2"  # a fresh cache: the two ranks build it together
    cfg2 = config("name=two", *FAST, f"cache_dir={json.dumps(str(cache2))}", "cache_chunk_size=500")
    yaml_path = tmp_path / "two.yaml"
    yaml_path.write_text(dump_config(cfg2))
    proc = _launch(yaml_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = cfg2.run_dir
    # Two ranks really ran: each saved its own RNG state in every mid-stage checkpoint.
    mids = [d for d in (two / "checkpoints").iterdir() if "-end" not in d.name]
    assert mids and all(sorted(p.name for p in d.glob("random_states_*")) ==
                        ["random_states_0.pkl", "random_states_1.pkl"] for d in mids)

    # One cache folder per teacher, complete, every chunk done once, equal to the 1-process cache.
    folders = sorted(d for d in cache2.iterdir() if d.is_dir())
    assert [d.name.split("-")[0] for d in folders] == ["teacher_a", "teacher_b"]
    shared = Path(base.cache_dir)
    for d in folders:
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["complete"] and manifest["chunk_size"] == 500
        assert sorted(p.name for p in (d / "chunks").iterdir()) == [f"{c:06d}" for c in range(6)]
        ref = np.load(shared / d.name / "vectors.npy")  # named by teacher and texts: the same corpus
        np.testing.assert_allclose(np.load(d / "vectors.npy").astype(np.float32), ref.astype(np.float32),
                                   atol=2e-3)

    rows_one, rows_two = read_log(one), read_log(two)
    keys = [(r["stage"], r["step"], "dev/loss" in r) for r in rows_two]
    assert len(keys) == len(set(keys)), "log rows written by more than one process"
    assert_same_rows(rows_one, rows_two, rel=1e-3)
    # Same function; weights to 1e-4, not 1e-5: now that every word's embedding row trains (the
    # old tokenizer sent all words to [UNK]), a rare element with a near-zero gradient gets its
    # reduction-order rounding scaled up by AdamW (see assert_same_function): one word-embedding
    # and one FFN element were ~3e-5 and ~8e-5 apart, all others < 5e-6.
    assert_same_function(one, two, atol=1e-4)  # outputs ~0.3: up to ~2e-5 apart
    assert_same_weights(student_weights(one), student_weights(two), atol=1e-4)
    assert (two / "final" / "modules.json").is_file() and (two / "results.json").is_file()
    shutil.rmtree(cache2)


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs --multi_gpu is a valid launch")
def test_misconfigured_cpu_launch_fails_clearly(config, tmp_path):
    """torchrun on CPU without ACCELERATE_USE_CPU: Accelerate would run each process as a lone
    main process (both writing the run); the trainer must refuse instead."""
    cfg = config("name=bad", *FAST)
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(dump_config(cfg))
    proc = _launch(yaml_path, use_cpu=False)
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU" in proc.stderr and "2 processes were launched" in proc.stderr
    assert not (cfg.run_dir / "log.jsonl").exists()


def test_resume_with_a_changed_config_is_refused(config):
    from mtd.config import ConfigError

    cfg = config(*FAST, "train.max_steps_per_job=7")
    pipeline.run(cfg)
    with pytest.raises(ConfigError, match="stages.0.lr"):
        pipeline.run(config(*FAST, "stages.0.lr=0.5"), resume=True)
    pipeline.run(config(*FAST), resume=True)  # the budget may change: this finishes the run


def test_fresh_start_drops_rows_of_an_attempt_that_never_checkpointed(config):
    cfg = config(*FAST)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "log.jsonl").write_text('{"stage": 0, "step": 999, "loss": 1.0}\n')
    pipeline.run(cfg)
    assert all(row["step"] != 999 for row in read_log(cfg.run_dir))


def test_heads_only_stage_trains_on_frozen_features_computed_once(config, monkeypatch):
    """Stage 1 (train: heads) runs the frozen encoder once over the texts, not at every step, and
    trains exactly as the per-step encoder did (up to rounding: padding differs per batch)."""
    encoded = []
    real = pipeline.pooled_features_of

    def counting(student, sizes, *args, **kwargs):
        encoded.append(len(sizes))
        return real(student, sizes, *args, **kwargs)

    monkeypatch.setattr(pipeline, "pooled_features_of", counting)
    monkeypatch.setattr(pipeline, "pooled_features", None)  # the texts' token ids are kept: no tokenizing
    a = pipeline.run(config("name=a", *FAST))
    cfg = config("name=a")
    assert encoded == [len(pipeline.load_corpus(cfg).train), cfg.data.dev_size]  # stage 1 only
    encoded.clear()
    b = pipeline.run(config("name=b", *FAST, "train.frozen_features=false"))
    assert encoded == []
    assert_same_rows(train_rows(read_log(a)), train_rows(read_log(b)), rel=1e-4)
    assert_same_rows(dev_rows(read_log(a)), dev_rows(read_log(b)), rel=1e-4)
    assert_same_function(a, b, atol=1e-4)


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 0), (2, 1)])
def test_frozen_features_from_kept_token_ids_are_those_of_the_texts(tiny_config, world, rank):
    """Each process's share of the frozen features, from the dataset's token ids (no tokenizer),
    equals pooled_features of its texts bit for bit: the same batches, padded the same way."""
    cfg = tiny_config()
    student, tokenizer = pipeline.build_student(cfg, 32 + 48)
    texts = pipeline.load_corpus(cfg).train[:151]
    tokens = TokenizedTexts.build(tokenizer, texts, cfg.student.max_length, progress=False)
    accelerator = SimpleNamespace(num_processes=world, process_index=rank, is_local_main_process=False,
                                  device="cpu", gather=lambda part: part)  # only this process's rows
    kept = pipeline.frozen_features(student, None, texts, cfg.student.max_length, accelerator, tokens)
    per = -(-len(texts) // world)
    mine = texts[rank * per:(rank + 1) * per]
    again = pooled_features(student, tokenizer, mine, cfg.student.max_length, progress=False)
    assert np.array_equal(kept[:len(mine)], again)
    assert np.array_equal(again, pipeline.frozen_features(student, tokenizer, texts, cfg.student.max_length,
                                                          accelerator)[:len(mine)])


# ---------------------------------------------------------------------------------------------
# FSDP and DeepSpeed

ACCUM = ("train.grad_accum=2", *(f"stages.{i}.batch_size=16" for i in range(3)))
BACKENDS = {
    # name: (script, accelerate config, ACCELERATE_USE_CPU, a file only that backend's mid-stage
    # checkpoints hold)
    "fsdp": (ROOT / "tests" / "fsdp_on_cpu.py", "fsdp.yaml", True, "pytorch_model_fsdp_0/__1_0.distcp"),
    "deepspeed-zero2": (ROOT / "train.py", "deepspeed-zero2.yaml", False,
                        "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "deepspeed-zero3": (ROOT / "train.py", "deepspeed-zero3.yaml", False,
                        "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
}
NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", [
    "fsdp",
    *(pytest.param(name, marks=pytest.mark.skipif(NO_DEEPSPEED, reason="deepspeed is not installed"))
      for name in ("deepspeed-zero2", "deepspeed-zero3")),
])
def test_sharded_backend_on_two_processes_trains_like_one(config, tmp_path, backend):
    """FSDP or DeepSpeed in 2 CPU processes, with configs/accelerate/'s launch config, stopped in
    stage 2 and resumed: the run trains like 1 process uninterrupted. Every stage freezes another
    part (heads, last:1, all) and accumulates 2 batches per optimizer step, so a backend that
    stepped every batch, missed a newly trainable part, or lost the optimizer's moments on resume
    would end elsewhere. FSDP runs through tests/fsdp_on_cpu.py (Accelerate selects FSDP only on
    GPUs); DeepSpeed on its CPU accelerator."""
    script, launch_config, use_cpu, shard_file = BACKENDS[backend]
    one = pipeline.run(config("name=one", *FAST, *ACCUM))
    cfg = config("name=two", *FAST, *ACCUM)
    yaml_path = tmp_path / "two.yaml"
    yaml_path.write_text(dump_config(cfg))
    launch = ("--config_file", str(ROOT / "configs" / "accelerate" / launch_config))
    proc = _launch(yaml_path, "train.max_steps_per_job=15", use_cpu=use_cpu, script=script, backend=launch)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    found = latest_checkpoint(cfg.run_dir)
    assert found is not None and (found[1].stage, found[1].step) == (1, 5)
    assert (found[0] / shard_file).is_file()  # the backend's own state: it really ran
    proc = _launch(yaml_path, "--resume", use_cpu=use_cpu, script=script, backend=launch)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_same_rows(read_log(one), read_log(cfg.run_dir), rel=1e-3)
    assert_same_function(one, cfg.run_dir, atol=1e-4)
    assert_same_weights(student_weights(one), student_weights(cfg.run_dir), atol=1e-4)


def _fake_accelerator(kind: DistributedType, **plugin) -> SimpleNamespace:
    """What _configure_backend, _deepspeed_batch and check_backend read of an Accelerator."""
    plugin = SimpleNamespace(**plugin)
    return SimpleNamespace(distributed_type=kind, is_fsdp2=getattr(plugin, "fsdp_version", 1) == 2,
                           num_processes=2, gradient_accumulation_steps=2,
                           state=SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=plugin))


def test_deepspeed_config_comes_from_the_run_config(config):
    tcfg = config("train.grad_accum=2", "train.max_grad_norm=null").train
    ds = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {}}
    acc = _fake_accelerator(DistributedType.DEEPSPEED, deepspeed_config=ds, zero_stage=3,
                            zero3_init_flag=False)
    trainer._configure_backend(acc, tcfg)
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # The batch keys per stage: its global batch over 2 processes, 2 batches per step.
    trainer._deepspeed_batch(acc, 32)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 64


@pytest.mark.parametrize("key, value, field", [
    ("gradient_accumulation_steps", 4, "train.grad_accum"),
    ("gradient_clipping", 1.0, "train.max_grad_norm"),
])
def test_deepspeed_config_that_contradicts_the_run_config_is_refused(config, key, value, field):
    tcfg = config("train.grad_accum=2", "train.max_grad_norm=0.5").train
    acc = _fake_accelerator(DistributedType.DEEPSPEED, deepspeed_config={key: value}, zero_stage=2)
    with pytest.raises(ConfigError, match=f"{key}={value}.*{field}.*auto"):
        trainer._configure_backend(acc, tcfg)


def test_zero3_init_flag_is_refused(config):
    acc = _fake_accelerator(DistributedType.DEEPSPEED, deepspeed_config={}, zero_stage=3,
                            zero3_init_flag=True)
    with pytest.raises(ConfigError, match="zero3_init_flag: false"):
        trainer._configure_backend(acc, config().train)


def test_fsdp_gets_use_orig_params_and_version_2_is_refused(config):
    acc = _fake_accelerator(DistributedType.FSDP, use_orig_params=False, fsdp_version=1)
    trainer._configure_backend(acc, config().train)
    assert acc.state.fsdp_plugin.use_orig_params is True
    acc = _fake_accelerator(DistributedType.FSDP, use_orig_params=True, fsdp_version=2)
    with pytest.raises(ConfigError, match="fsdp_version: 1"):
        trainer._configure_backend(acc, config().train)


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_image_stages_are_refused_under_sharded_backends(kind):
    stages = [SimpleNamespace(name="stage3", data="text"), SimpleNamespace(name="stage4", data="images")]
    with pytest.raises(ConfigError, match=r"stages\.1 \(stage4\) is an image stage"):
        trainer.check_backend(_fake_accelerator(kind), stages)
    trainer.check_backend(_fake_accelerator(DistributedType.MULTI_CPU), stages)
    trainer.check_backend(_fake_accelerator(kind), stages[:1])


def test_launch_accumulation_other_than_the_run_config_is_refused(config, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    with pytest.raises(ConfigError, match="train.grad_accum=2"):
        trainer.make_accelerator(config("train.grad_accum=2").train, tmp_path)

