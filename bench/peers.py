"""Peers: is mtd's student better than what users can already get?

Everything trains on the same texts (the student run's corpus and max_texts, read through mtd's
own corpus loader), from the same student (its teacher cut to the run's layers, MiniLM [0, 3, 5])
and for the same optimizer steps and batch size as the mtd run it is compared with. Teacher vectors
come from mtd's target cache, so no teacher encodes the corpus again. Models:

    TEACHER, A+B        the teachers and their combination (the mtd target), as eval.py names them
    st-mse(T)           sentence-transformers' distillation recipe (seed 001; its layer-reduction
                        example): SentenceTransformerTrainer, losses.MSELoss, lr 1e-4, 10% warmup,
                        against teacher T's cached vectors through a Dense 384->D on the student;
                        T is mpnet (768-d) and the multi-teacher target (1152-d)
    model2vec(mpnet)    model2vec's static distillation of mpnet at 256 dims (see distill_model2vec)
    pca256(A+B)         PCA of the combination to 256 dims, fitted on the training texts' targets
    mtd/RUN:HEAD        each --student run: its exported head (final/) and its other heads

Table 1 (eval.py's suite): STS-B and SICK-R test Spearman, CISI nDCG@10, sentences/s at batch 64
with --threads torch threads (the suite's speed task: each model in a fresh process), retention
and speed relative to --reference (mpnet). Table 2: training throughput of mtd's trainer beside
SentenceTransformerTrainer on the same student (encoder + a linear head to the 1152-d target, all
weights trained), batch and target: after an untimed 2-step warm-up of each, --throughput-steps
steps each, interleaved (A B C, C B A, ...) --repeats times, medians of whole `train` calls
(optimizer and loader set-up and mtd's stage-end checkpoint included, model building not).
mtd's trainer is timed twice: with the run's loss terms and with cos only (the trainer's own cost).

    python bench/peers.py [--student runs/default ...] [--steps N] [--max-texts N] [--out FILE]
                          [--smoke]

--smoke runs it all at toy scale in a few minutes: a small mtd run trained here, 300 texts,
a few steps, shortened STS and CISI sets; its results go under runs/peers-smoke/, not to the
results files. Trained peers, the model2vec model and the PCA are kept under --work and reused
when their inputs are the same. Results: --out (JSON) and the "Peers" section of --docs.

--throughput-only measures table 2 alone, on a chosen device, precision and batch (both trainers
on the same ones, checked on the trained models), for CONFIG's student, last text stage and corpus
(its first --max-texts texts), with random targets of the teachers' sizes in place of the cached
ones (speed does not depend on their values, and no teacher encodes the corpus):

    python bench/peers.py --throughput-only [--config CONFIG] [--device cuda] [--precision bf16]
                          [--batch 256] [--throughput-steps 50] [--repeats 2] [--out FILE]

It needs no evaluation data, faiss, pytrec_eval or model2vec; results go to --out (default
bench/results/peers_throughput.json), with the ratio of mtd's steps/s (the stage's loss terms) to
SentenceTransformerTrainer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's mtd, also in the speed task's child processes
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import cached_property, partial  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

import mtd  # noqa: E402, F401  (patches torchvision before transformers imports it)
from mtd.config import RunConfig, load_config  # noqa: E402
from mtd.data.corpus import Corpus, multi_teacher_target  # noqa: E402
from mtd.errors import MtdError, cli_main  # noqa: E402
from mtd.evaluation.specs import (  # noqa: E402
    Encoder,
    ProjectedEncoder,
    SentenceTransformerEncoder,
    load_encoder,
    parse_models,
)
from mtd.io import atomic_write_json, atomic_write_text, hash_folder, hash_texts, read_json  # noqa: E402

logger = logging.getLogger("peers")

DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
ST_LR, ST_WARMUP = 1e-4, 0.1  # the layer-reduction example's learning rate and warmup share
PEER_DIMS = 256  # model2vec and PCA output size (the student's fc256 head has the same)
# --smoke: 270 training texts (PCA to 256 dims needs at least 256), 30 dev texts
SMOKE = {"max_texts": 300, "steps": 4, "batch": 16, "sts_pairs": 50, "queries": 3, "judged": 5, "docs": 10,
         "speed_texts": 32, "latency_samples": 8, "m2v_tokens": 800, "throughput_steps": 3, "repeats": 1}


class PeersError(MtdError, ValueError):
    """A student run or setting this benchmark cannot use."""


# ---------------------------------------------------------------------------------------------
# What everything trains on


@dataclass
class Setup:
    """The compared run's texts, cached teacher targets, steps and batch size."""

    cfg: RunConfig
    corpus: Corpus
    arrays: list[np.ndarray]  # per teacher: (train + dev rows, D_k) float16, from mtd's target cache
    steps: int
    batch: int

    @property
    def texts(self) -> list[str]:
        return self.corpus.train

    @property
    def last_stage(self):
        return [s for s in self.cfg.stages if s.data == "text"][-1]

    def teacher_rows(self, name: str) -> np.ndarray:
        k = [t.name for t in self.cfg.teachers].index(name)
        return np.asarray(self.arrays[k][: len(self.texts)], dtype=np.float32)

    def target_rows(self) -> np.ndarray:
        """The multi-teacher target of the training texts, exactly as mtd's trainer builds it."""
        parts = [a[: len(self.texts)] for a in self.arrays]
        return multi_teacher_target(parts, [t.weight for t in self.cfg.teachers]).numpy()

    def key(self, *extra) -> str:
        """Identifies what a peer learned from: texts, targets, steps, batch, student, seed."""
        s = self.cfg.student
        src = [hash_texts(self.texts), [t.name for t in self.cfg.teachers], self.steps, self.batch,
               s.path, s.layers, s.max_length, self.cfg.train.seed, *extra]
        return hashlib.sha256(json.dumps(src, default=str).encode()).hexdigest()[:12]


def total_steps(cfg: RunConfig, n_train: int) -> tuple[int, int]:
    """(optimizer steps, batch size) of the run's text stages; the batch of its longest stage."""
    from mtd.training.trainer import stage_steps

    text = [s for s in cfg.stages if s.data == "text"]
    if not text:
        raise PeersError("The student run has no text stages; peers are compared on text training.")
    steps = [stage_steps(s, n_train, cfg.train.grad_accum) for s in text]
    longest = text[steps.index(max(steps))]
    if len({s.batch_size for s in text}) > 1:
        logger.warning("Stages use batch sizes %s; peers use %d (the longest stage's).",
                       [s.batch_size for s in text], longest.batch_size)
    return sum(steps), longest.batch_size * cfg.train.grad_accum


def prepare(cfg: RunConfig, steps: int | None) -> Setup:
    from mtd.targets.cache import cached_targets
    from mtd.training.pipeline import load_corpus

    corpus = load_corpus(cfg)
    arrays = cached_targets(cfg.teachers, corpus.texts, cfg.cache_dir)
    run_steps, batch = total_steps(cfg, len(corpus.train))
    logger.info("Peers train on %d texts for %d steps of batch %d (the mtd run: %d steps).",
                len(corpus.train), steps or run_steps, batch, run_steps)
    return Setup(cfg, corpus, arrays, steps or run_steps, batch)


def run_config(run: Path, max_texts: int | None) -> RunConfig:
    saved = run / "config.yaml"
    if not saved.is_file():
        raise PeersError(f"--student {run}: no config.yaml, so not an mtd run. Train one first "
                         "(python train.py configs/default.yaml) or pass its folder (runs/NAME).")
    overrides = [f"data.max_texts={max_texts}"] if max_texts else []
    cfg = load_config(saved, overrides)
    if max_texts and max_texts != load_config(saved).data.max_texts:
        logger.warning("--max-texts %d: the peers see other texts than %s was trained on.", max_texts, run)
    return cfg


def smoke_run(work: Path, max_texts: int | None) -> Path:
    """A small mtd run of configs/default.yaml (real teachers, few texts and steps), trained once."""
    from mtd.training.pipeline import run
    from mtd.training.trainer import latest_checkpoint

    n, texts = SMOKE["steps"], max_texts or SMOKE["max_texts"]
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"name=mtd-{texts}", f"output_dir={work}", f"data.max_texts={texts}", "data.dev_size=30",
        "train.log_every=1", "train.eval_every=0", "eval.sts_dir=null", "eval.teachers=false",
        *[f"stages.{i}.{k}" for i in range(3) for k in (f"steps={n}", f"batch_size={SMOKE['batch']}")]])
    if not (cfg.run_dir / "final" / "modules.json").is_file():
        run(cfg, resume=latest_checkpoint(cfg.run_dir) is not None)
    return cfg.run_dir


# ---------------------------------------------------------------------------------------------
# sentence-transformers' recipe


def st_student(cfg: RunConfig, out_dim: int):
    """The recipe's student: the teacher folder as sentence-transformers loads it, only the run's
    layers kept (cut with mtd's own helper, so it is the mtd student's encoder), and a Dense to the
    target size with identity activation (a linear head like mtd's fc1; Dense defaults to tanh)."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    from mtd.hf import resolve_model
    from mtd.models.student import keep_layers

    folder = resolve_model(cfg.student.path, "student.path")
    # float32 weights whatever the folder stores, as mtd's student (transformers 5 would keep a
    # float16 file's dtype, and train half-precision master weights)
    base = SentenceTransformer(str(folder), device="cpu").float()
    keep_layers(base.transformers_model, cfg.student.layers)
    base[0].max_seq_length = cfg.student.max_length
    dense = models.Dense(base.get_embedding_dimension(), out_dim, activation_function=torch.nn.Identity())
    return SentenceTransformer(modules=[*base, dense])


def st_trainer(cfg: RunConfig, texts: list[str], targets: np.ndarray, steps: int, batch: int, out: Path,
               precision: str = "no", use_cpu: bool = False):
    """SentenceTransformerTrainer with losses.MSELoss on (text, target vector) rows; `precision`
    as train.mixed_precision names it (no, bf16, fp16); on a GPU if there is one, unless `use_cpu`."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers import set_seed

    set_seed(cfg.train.seed)  # the Dense head's init
    model = st_student(cfg, targets.shape[1])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=ST_LR,
        warmup_steps=ST_WARMUP, seed=cfg.train.seed, dataloader_drop_last=True, save_strategy="no",
        logging_steps=max(1, steps // 20), report_to="none", bf16=precision == "bf16",
        fp16=precision == "fp16", use_cpu=use_cpu)
    data = Dataset.from_dict({"sentence": texts, "label": targets.astype(np.float32)})
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=losses.MSELoss(model))


def train_st_peer(setup: Setup, name: str, targets: np.ndarray, work: Path) -> tuple[Path, dict]:
    """Train (or reuse) the recipe's student against `targets`; returns its folder and stats."""
    folder = work / f"st-mse-{name}-{setup.key('st', name, ST_LR, ST_WARMUP)}"
    if (folder / "modules.json").is_file() and (folder / "peer.json").is_file():
        logger.info("st-mse(%s): reusing %s", name, folder)
        return folder, read_json(folder / "peer.json")
    logger.info("st-mse(%s): training %d steps of batch %d against %d-d targets.", name, setup.steps,
                setup.batch, targets.shape[1])
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        trainer = st_trainer(setup.cfg, setup.texts, targets, setup.steps, setup.batch, Path(tmp) / "trainer")
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        stats = {"steps": trainer.state.global_step, "batch": setup.batch, "seconds": seconds,
                 "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                 "target_dim": int(targets.shape[1])}
        trainer.model.save(str(Path(tmp) / "model"))
        atomic_write_json(Path(tmp) / "model" / "peer.json", stats)
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt (no peer.json)
        os.replace(Path(tmp) / "model", folder)
    return folder, stats


# ---------------------------------------------------------------------------------------------
# model2vec


def _model2vec_inference():
    """model2vec.distill.inference (forward passes, PCA, SIF weights), loaded from its file.

    `import model2vec.distill` requires the `distill` extra, whose skeletoken needs
    transformers < 5.4 (this project pins 5.23); inference.py itself needs only torch and
    transformers, so it is loaded without the package's __init__.
    """
    import model2vec

    path = Path(model2vec.__file__).parent / "distill" / "inference.py"
    spec = importlib.util.spec_from_file_location("model2vec_distill_inference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def distill_model2vec(teacher: Path, dims: int, out: Path, vocabulary: tuple[list[str], int] | None = None
                      ) -> Path:
    """model2vec's `distill_from_model` without a custom vocabulary, on model2vec's own functions:
    every token of the teacher's vocabulary (less special and [unusedN] tokens, as its default
    token_remove_pattern) between the tokenizer's begin and end tokens through the teacher, mean
    pooled, PCA to `dims`, Zipf/SIF weights (coefficient 1e-4), float16, normalized output.
    Unlike model2vec it keeps the teacher's tokenizer as is (no skeletoken): removed tokens get
    zero vectors. `vocabulary` (texts, n) keeps only the n most frequent tokens of the texts (--smoke:
    the whole vocabulary takes minutes)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        from model2vec import StaticModel
        from model2vec.quantization import DType, quantize_embeddings
    except ImportError:
        raise PeersError("The model2vec peer needs model2vec: .venv/bin/pip install model2vec==0.10.0 "
                         "(an optional bench dependency, see requirements.txt).") from None
    if (out / "config.json").is_file():
        logger.info("model2vec: reusing %s", out)
        return out
    inference = _model2vec_inference()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    vocab = sorted(tokenizer.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tokenizer.all_special_ids)
    kept = [i for tok, i in vocab if i not in special and not re.fullmatch(r"\[unused\d+\]", tok)]
    if vocabulary is not None:
        texts, n = vocabulary
        counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
        top = {i for i, _ in counts.most_common(n)}
        kept = [i for i in kept if i in top]
    begin = [x for x in (tokenizer.cls_token_id or tokenizer.bos_token_id,) if x is not None]
    end = [x for x in (tokenizer.sep_token_id or tokenizer.eos_token_id,) if x is not None]
    logger.info("model2vec: %d tokens of %s through the teacher (minutes on a CPU).", len(kept), teacher)
    model = AutoModel.from_pretrained(str(teacher))
    with torch.inference_mode():
        emb = inference.create_embeddings(model, [[*begin, i, *end] for i in kept], "cpu",
                                          tokenizer.pad_token_id or 0, inference.PoolingMode.MEAN)
    emb = inference.apply_pca(emb, dims) * inference.compute_weights(len(kept), 1e-4)[:, None]
    vectors = np.zeros((len(vocab), emb.shape[1]), dtype=np.float16)
    vectors[kept] = quantize_embeddings(emb, DType.Float16)
    config = {"model_type": "model2vec", "architectures": ["StaticModel"], "tokenizer_name": teacher.name,
              "apply_pca": dims, "sif_coefficient": 1e-4, "hidden_dim": vectors.shape[1],
              "seq_length": 1000000, "normalize": True, "pooling": "mean"}
    static = StaticModel(vectors=vectors, tokenizer=tokenizer.backend_tokenizer, config=config,
                         normalize=True, base_model_name=teacher.name)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        static.save_pretrained(Path(tmp) / "model")
        os.replace(Path(tmp) / "model", out)
    return out


@dataclass
class StaticEncoder:
    """A model2vec StaticModel folder behind the suite's Encoder interface (single process)."""

    name: str
    folder: Path
    _model: object = field(default=None, repr=False)

    @cached_property
    def fingerprint(self) -> str:
        return hash_folder(self.folder)

    def encode(self, texts: list[str], role: str = "document", batch_size: int = 64) -> np.ndarray:
        if self._model is None:
            from model2vec import StaticModel

            self._model = StaticModel.from_pretrained(self.folder)
        vecs = self._model.encode(texts, batch_size=batch_size, use_multiprocessing=False)
        return vecs.astype(np.float32) / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


def _load_projected(specs: tuple[str, ...], inner: str, name: str, path: Path) -> ProjectedEncoder:
    """The PCA model rebuilt in the speed task's process (module level: it is pickled)."""
    return ProjectedEncoder.load(name, load_encoder(specs, inner), path)


# ---------------------------------------------------------------------------------------------
# The models of table 1


@dataclass
class Lineup:
    """Models to score, how a fresh process rebuilds each (for speed), and what each one is."""

    models: dict[str, Encoder] = field(default_factory=dict)
    loaders: dict[str, Callable[[], Encoder]] = field(default_factory=dict)
    about: dict[str, str] = field(default_factory=dict)
    training: dict[str, dict] = field(default_factory=dict)

    def add(self, label: str, model: Encoder, loader: Callable[[], Encoder], about: str) -> None:
        self.models[label], self.loaders[label], self.about[label] = model, loader, about


def student_specs(run: Path) -> list[tuple[str, str, str]]:
    """(label, spec, about) of a run's exported head and of each other head."""
    heads = read_json(run / "student" / "student.json")["heads"]
    exported = load_config(run / "config.yaml").export_head or next(iter(heads))
    out = [(f"mtd/{run.name}:{exported}", str(run),
            f"mtd run {_rel(run)}, head {exported} ({heads[exported]}-d, final/)")]
    out += [(f"mtd/{run.name}:{h}", f"{run}:{h}", f"mtd run {_rel(run)}, head {h} ({d}-d)")
            for h, d in heads.items() if h != exported]
    return out


def lineup(setup: Setup, students: list[Path], work: Path, smoke: bool) -> Lineup:
    cfg = setup.cfg
    names = [t.name for t in cfg.teachers]
    combo = "+".join(names)
    specs = [f"{t.name}={t.path}" for t in cfg.teachers] + [combo]
    for run in students:
        specs += [f"{label}={spec}" for label, spec, _ in student_specs(run)]
    specs = tuple(specs)
    parsed = parse_models(list(specs))
    line = Lineup()
    for t in cfg.teachers:
        line.add(t.name, parsed[t.name], partial(load_encoder, specs, t.name), f"teacher {t.path}")
    line.add(combo, parsed[combo], partial(load_encoder, specs, combo),
             "the teachers' combination: each normalized, concatenated, normalized (the mtd target)")

    pca_label = f"pca{PEER_DIMS}({combo})"
    pca = ProjectedEncoder.pca(pca_label, parsed[combo], setup.target_rows(), PEER_DIMS)
    pca_path = work / f"pca-{hashlib.sha256(pca.fingerprint.encode()).hexdigest()[:12]}.npz"
    pca.save(pca_path)
    line.add(pca_label, pca, partial(_load_projected, specs, combo, pca_label, pca_path),
             f"PCA of {combo} to {PEER_DIMS} dims, fitted on the {len(setup.texts)} training texts' targets")

    mpnet = next((t for t in cfg.teachers if "mpnet" in t.name), cfg.teachers[-1])
    folder = resolve(mpnet.path)
    m2v_label = f"model2vec({mpnet.name})@{PEER_DIMS}"
    vocabulary = (setup.texts, SMOKE["m2v_tokens"]) if smoke else None
    out = work / f"model2vec-{hash_folder(folder)[:12]}-{PEER_DIMS}-{setup.key() if smoke else 'all'}"
    m2v = distill_model2vec(folder, PEER_DIMS, out, vocabulary)
    line.add(m2v_label, StaticEncoder(m2v_label, m2v), partial(StaticEncoder, m2v_label, m2v),
             f"model2vec static distillation of {mpnet.name}, {PEER_DIMS}-d")

    for name, targets, what in [(mpnet.name, setup.teacher_rows(mpnet.name), f"{mpnet.name}'s vectors"),
                                (combo, setup.target_rows(), "the multi-teacher target")]:
        label = f"st-mse({name})"
        peer, stats = train_st_peer(setup, name, targets, work)
        line.add(label, SentenceTransformerEncoder(label, peer),
                 partial(SentenceTransformerEncoder, label, peer),
                 f"sentence-transformers recipe: MSELoss to {what}, Dense 384->{targets.shape[1]}, "
                 f"{stats['steps']} steps of batch {stats['batch']}")
        line.training[label] = stats | {"folder": str(peer)}

    for run in students:
        for label, _, about in student_specs(run):
            line.add(label, parsed[label], partial(load_encoder, specs, label), about)
    return line


def resolve(path: str) -> Path:
    from mtd.hf import resolve_model

    return resolve_model(path, "a teacher of the run")


# ---------------------------------------------------------------------------------------------
# Table 2: training throughput


class Timed(NamedTuple):
    """One timed `train` call and where it ran, read off the trained model and its Accelerator."""

    seconds: float
    device: str  # the trained parameters' device type (cpu, cuda)
    precision: str  # the Accelerator's mixed precision (no, bf16, fp16)


def _finished(t0: float) -> float:
    """Seconds since t0, once the GPU (if one is in use) has finished its queued work."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_mtd(setup: Setup, terms: list[str], steps: int, run_dir: Path) -> Timed:
    """mtd's train_stages for `steps` steps of one stage training everything, head fc1 on `terms`
    (the run's last text stage's loss weights), no dev set, no mid-stage checkpoint, in the
    config's train.mixed_precision."""
    from accelerate.utils import set_seed

    from mtd.data.corpus import Corpus
    from mtd.training.pipeline import build_student, corpus_stage_data
    from mtd.training.trainer import make_accelerator, train_stages

    cfg = setup.cfg
    head = next(iter(cfg.student.heads))
    stage = dataclasses.replace(setup.last_stage, name="throughput", train="all", heads={head: terms},
                                steps=steps, epochs=None, batch_size=setup.batch)
    tcfg = dataclasses.replace(cfg.train, log_every=steps, eval_every=0, save_every=steps + 1,
                               max_steps_per_job=None, report_to=None, grad_accum=1)
    set_seed(cfg.train.seed)
    student, tokenizer = build_student(cfg, sum(a.shape[1] for a in setup.arrays))
    data = corpus_stage_data(Corpus(setup.texts, []), setup.arrays, [t.weight for t in cfg.teachers],
                           tokenizer, cfg.student.max_length, progress=False)
    accelerator = make_accelerator(tcfg, run_dir)
    t0 = time.perf_counter()
    stage_data = lambda _index: ((lambda _student: data), len(data.train))  # noqa: E731
    train_stages(accelerator, student, [stage], tcfg, run_dir, stage_data, None, {})
    seconds = _finished(t0)
    return Timed(seconds, next(student.parameters()).device.type, str(accelerator.mixed_precision))


def time_st(setup: Setup, steps: int, out: Path) -> Timed:
    """SentenceTransformerTrainer.train for `steps` steps, MSELoss to the target, in the config's
    train.mixed_precision, on the device mtd's Accelerator takes (the CPU under ACCELERATE_USE_CPU)."""
    from accelerate.utils import parse_flag_from_env

    trainer = st_trainer(setup.cfg, setup.texts, setup.target_rows(), steps, setup.batch, out,
                         precision=setup.cfg.train.mixed_precision,
                         use_cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    t0 = time.perf_counter()
    trainer.train()
    seconds = _finished(t0)
    device = next(trainer.model.parameters()).device.type
    return Timed(seconds, device, str(trainer.accelerator.mixed_precision))


ST_ROW = "sentence-transformers (MSELoss)"


def throughput(setup: Setup, steps: int, repeats: int, work: Path) -> list[dict]:
    """Rows of table 2: mtd with the stage's loss terms, mtd with cos only, the recipe's trainer.
    Every run must train on one device in one precision: a trainer that ran elsewhere stops it."""
    terms = setup.last_stage.heads.get(next(iter(setup.cfg.student.heads)), ["cos", "sim", "resim"])
    variants = {
        f"mtd ({'+'.join(terms)})": partial(time_mtd, setup, list(terms)),
        "mtd (cos)": partial(time_mtd, setup, ["cos"]),
        ST_ROW: partial(time_st, setup),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    ran_on: dict[str, set[tuple[str, str]]] = {name: set() for name in variants}
    for r in range(-1, repeats):  # r = -1: a 2-step warm-up of each (lazy imports, allocator), not kept
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # A B C, C B A, ...
        for name in order:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                timed = variants[name](2 if r < 0 else steps, Path(tmp))
            ran_on[name].add((timed.device, timed.precision))
            if r >= 0:
                seconds[name].append(timed.seconds)
                logger.info("throughput %s, repeat %d: %d steps in %.1f s on %s (%s)", name, r + 1, steps,
                            timed.seconds, timed.device, timed.precision)
    places = set().union(*ran_on.values())
    if len(places) != 1:
        raise PeersError(f"The trainers ran on different devices or precisions ({ran_on}), so their "
                         "speeds do not compare. Run with one visible device (--device) and one "
                         "train.mixed_precision (--precision) for both.")
    device, precision = places.pop()
    st = statistics.median(seconds[ST_ROW])
    rows = []
    for name, secs in seconds.items():
        med = statistics.median(secs)
        rows.append({"trainer": name, "steps": steps, "batch": setup.batch, "device": device,
                     "precision": precision, "seconds": secs, "steps_per_s": steps / med,
                     "texts_per_s": steps * setup.batch / med, "ratio_to_st": st / med})
    return rows


def throughput_table(rows: list[dict]) -> str:
    lines = ["| trainer | steps x batch | median s | steps/s | texts/s | x sentence-transformers |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        median = statistics.median(r["seconds"])
        lines.append(f"| {r['trainer']} | {r['steps']} x {r['batch']} | {median:.1f} "
                     f"| {r['steps_per_s']:.2f} | {r['texts_per_s']:.1f} | {r['ratio_to_st']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Smoke data, output


def smoke_data(src: Path, dst: Path) -> Path:
    """The first STS pairs of each STS-B / SICK-R test file, the first CISI queries with a few of
    their relevant documents, and a few other documents: the same layouts, small enough for --smoke."""
    for path in sorted((src / "sts").glob("*/test.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()[: SMOKE["sts_pairs"]]
        atomic_write_text(dst / "sts" / path.parent.name / "test.jsonl", "\n".join(lines) + "\n")
    cisi, out = src / "retrieval" / "cisi", dst / "retrieval" / "cisi"
    queries = (cisi / "queries.jsonl").read_text(encoding="utf-8").splitlines()[: SMOKE["queries"]]
    ids = {json.loads(q)["_id"] for q in queries}
    head, *qrels = (cisi / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    judged = {i: [q for q in qrels if q.split("\t")[0] == i][: SMOKE["judged"]] for i in sorted(ids)}
    qrels = [q for i in sorted(ids) for q in judged[i]]
    docs = {q.split("\t")[1] for q in qrels}
    corpus = [d for i, d in enumerate((cisi / "corpus.jsonl").read_text(encoding="utf-8").splitlines())
              if json.loads(d)["_id"] in docs or i < SMOKE["docs"]]
    atomic_write_text(out / "queries.jsonl", "\n".join(queries) + "\n")
    atomic_write_text(out / "qrels" / "test.tsv", "\n".join([head, *qrels]) + "\n")
    atomic_write_text(out / "corpus.jsonl", "\n".join(corpus) + "\n")
    return dst


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with its Markdown section `## heading` (up to the next `## ` heading) set to `body`;
    the section is appended when missing, and a new file gets a `# Results` title."""
    section = f"## {heading}\n\n{body.strip()}\n"
    if not text.strip():
        return f"# Results\n\n{section}"
    match = re.search(rf"^## {re.escape(heading)}[ \t]*$", text, flags=re.M)
    if match is None:
        return text.rstrip("\n") + "\n\n" + section
    rest = re.search(r"^## ", text[match.end():], flags=re.M)
    tail = text[match.end() + rest.start():] if rest else ""
    return text[: match.start()] + section + ("\n" + tail if tail else "")


def add_result_args(parser, name: str) -> None:
    """--data, --cache-dir, --out (bench/results/NAME.json) and --docs (docs/results.md): the
    arguments of a bench script that scores models with eval.py's code and writes a docs section."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{name}.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")


def write_section(docs: Path, heading: str, body: str) -> None:
    """Rewrite the `## heading` section of the Markdown file `docs` (replace_section), atomically."""
    old = docs.read_text(encoding="utf-8") if docs.is_file() else ""
    atomic_write_text(docs, replace_section(old, heading, body))
    logger.info("Wrote the %s section of %s", heading, docs)


def docs_body(args, setup: Setup, quality: str, legend: str, speed: str) -> str:
    command = " ".join(["python bench/peers.py", *(f"--student {_rel(s)}" for s in args.student)])
    s = setup.cfg.student
    return f"""`bench/peers.py`, measured {datetime.date.today()} on {os.cpu_count()} CPU cores,
{args.threads} torch threads. To rerun: `python train.py configs/default.yaml` (the student run),
then `{command}` from the project root (`--smoke` checks the script at toy scale in minutes;
every number, with its settings, goes to `{_rel(args.out)}`). All trained peers learn from the mtd
run's {len(setup.texts)} training texts and its teachers' cached vectors, for its {setup.steps}
optimizer steps of batch {setup.batch}, from the same student (`{s.path}` layers {s.layers}).
Main metric per test set (Spearman x100 of cosine; nDCG@10 x100), sentences/s at batch 64 on
{args.speed_texts} WordNet texts, each model in a fresh process; retention and speed x relative
to {args.reference}:

{quality}

{legend}

Training throughput on the same student (encoder + linear head to the
{sum(a.shape[1] for a in setup.arrays)}-d target, every weight trained), batch and texts; whole
`train` calls after a warm-up, medians of interleaved repeats:

{speed}
"""


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", action="append", type=Path, default=None, metavar="RUN",
                   help="mtd run folder(s) to compare; the first sets texts, steps and batch "
                        "(default: runs/default; --smoke trains its own)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each trained peer "
                   "(default: the mtd run's total)")
    p.add_argument("--max-texts", type=int, default=None,
                   help="training texts (default: the run's data.max_texts)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/peers.json)")
    p.add_argument("--docs", type=Path, default=None,
                   help="Markdown file whose 'Peers' section is rewritten (default: docs/results.md)")
    p.add_argument("--work", type=Path, default=None,
                   help="trained peers, model2vec model, PCA (default: runs/peers)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation data root (eval.py --data)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="eval.py's vector cache")
    p.add_argument("--reference", default="mpnet", help="label that retention and speed x compare with")
    p.add_argument("--threads", type=int, default=2, help="torch threads for speed and throughput")
    p.add_argument("--speed-texts", type=int, default=1000)
    p.add_argument("--throughput-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="everything at toy scale, in minutes")
    only = p.add_argument_group("--throughput-only: table 2 alone (see above)")
    only.add_argument("--throughput-only", action="store_true",
                      help="time the trainers only; results to --out (default: "
                           "bench/results/peers_throughput.json), nothing else written")
    only.add_argument("--config", type=Path, default=None,
                      help="config whose student, last text stage and corpus are timed "
                           "(default: the --student run's config.yaml, else configs/default.yaml)")
    only.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="where both trainers run (default: cuda when there is one)")
    only.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None,
                      help="train.mixed_precision of both (default: bf16 on cuda, no on cpu)")
    only.add_argument("--batch", type=int, default=None,
                      help="batch size of both (default: the config's longest text stage's)")
    args = p.parse_args(argv)
    smoke = args.smoke
    given = [f"--{k}" for k in ("config", "device", "precision", "batch") if getattr(args, k) is not None]
    if given and not args.throughput_only:
        p.error(f"{', '.join(given)}: options of --throughput-only; add it, or leave them out.")
    if args.throughput_only:
        if smoke:
            p.error("--smoke and --throughput-only do not go together: for a quick --throughput-only, "
                    "pass --device cpu --max-texts 48 --batch 8 --throughput-steps 2 --repeats 1.")
        if (args.batch is not None and args.batch < 1) or args.throughput_steps < 1 or args.repeats < 1:
            p.error("--batch, --throughput-steps and --repeats must be at least 1.")
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.precision = args.precision or ("bf16" if args.device == "cuda" else "no")
        args.out = args.out or ROOT / "bench" / "results" / "peers_throughput.json"
        return args
    args.work = args.work or ROOT / "runs" / ("peers-smoke" if smoke else "peers")
    args.out = args.out or (args.work / "peers.json" if smoke else ROOT / "bench" / "results" / "peers.json")
    args.docs = args.docs or (None if smoke else ROOT / "docs" / "results.md")
    if smoke:
        args.speed_texts = min(args.speed_texts, SMOKE["speed_texts"])
        args.throughput_steps = min(args.throughput_steps, SMOKE["throughput_steps"])
        args.repeats = SMOKE["repeats"]
    return args


def body(args: argparse.Namespace) -> int:
    import torch

    from mtd.evaluation.suite import evaluate_all, retention_table, speed_rows

    torch.set_num_threads(args.threads)
    for key in ("student", "out", "docs", "work", "data", "cache_dir"):  # as given, before the chdir
        value = getattr(args, key)
        setattr(args, key, [p.resolve() for p in value] if isinstance(value, list) else
                value and value.resolve())
    os.chdir(ROOT)  # configs name models, corpora and caches relative to the project root
    args.work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.student = [smoke_run(args.work, args.max_texts)]
        args.data = smoke_data(args.data, args.work / "data")
    args.student = args.student or [ROOT / "runs" / "default"]
    setup = prepare(run_config(args.student[0], args.max_texts), args.steps)
    line = lineup(setup, args.student, args.work, args.smoke)

    rows = evaluate_all(line.models, data=args.data, tasks=("sts", "retrieval"), split="test", batch_size=64,
                        index="flat", cache_dir=args.cache_dir, speed=None)
    rows += speed_rows(line.loaders, args.speed_texts, 64, threads=args.threads,
                       latency_samples=SMOKE["latency_samples"] if args.smoke else 64)
    speed = throughput(setup, args.throughput_steps, args.repeats, args.work)

    quality = retention_table(rows, args.reference)
    legend = "\n".join(f"- `{label}`: {about}" for label, about in line.about.items())
    speed_md = throughput_table(speed)
    print(f"{quality}\n\n{legend}\n\n{speed_md}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["student"] = [str(s) for s in args.student]
    atomic_write_json(args.out, {
        "date": str(datetime.date.today()), "cpu_cores": os.cpu_count(), "settings": settings,
        "texts": len(setup.texts), "steps": setup.steps, "batch": setup.batch,
        "models": line.about, "fingerprints": {k: m.fingerprint for k, m in line.models.items()},
        "training": line.training, "results": rows, "throughput": speed,
        "tables": {"quality": quality, "throughput": speed_md}})
    logger.info("Wrote %s", args.out)
    if args.docs is not None:
        write_section(args.docs, "Peers", docs_body(args, setup, quality, legend, speed_md))
    return 0


def random_setup(cfg: RunConfig, batch: int | None, steps: int) -> Setup:
    """The config's corpus, student and stages, with random targets of its teachers' sizes (drawn
    with train.seed) in place of the cached ones; `batch`, else its longest text stage's."""
    from mtd.targets.teachers import embedding_dim, load_teacher, teacher_folder
    from mtd.training.pipeline import load_corpus

    corpus = load_corpus(cfg)
    dims = [embedding_dim(load_teacher(t, teacher_folder(t), device="cpu")) for t in cfg.teachers]
    rng = np.random.default_rng(cfg.train.seed)
    arrays = [rng.standard_normal((len(corpus.texts), d), dtype=np.float32).astype(np.float16) for d in dims]
    return Setup(cfg, corpus, arrays, steps, batch or total_steps(cfg, len(corpus.train))[1])


def _versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def throughput_only(args: argparse.Namespace) -> int:
    """Table 2 alone on args.device in args.precision; writes args.out."""
    import platform

    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PeersError("--device cuda: no CUDA device is visible here. Run it on a GPU machine, or "
                         "pass --device cpu.")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # both trainers' Accelerators read it
    config = args.config or (args.student[0] / "config.yaml" if args.student else DEFAULT_CONFIG)
    config, out = config.resolve(), args.out.resolve()
    if not config.is_file():
        raise PeersError(f"{config}: no such config. Pass --config FILE (e.g. configs/default.yaml) "
                         "or --student RUN (a trained mtd run's folder).")
    os.chdir(ROOT)  # configs name models and corpora relative to the project root
    overrides = [f"train.mixed_precision={args.precision}", "data.dev_size=0",
                 *([f"data.max_texts={args.max_texts}"] if args.max_texts else [])]
    setup = random_setup(load_config(config, overrides), args.batch, args.throughput_steps)
    logger.info("Timing on %s (%s): %d texts, batch %d, %d steps x %d repeats.", args.device,
                args.precision, len(setup.texts), setup.batch, args.throughput_steps, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = throughput(setup, args.throughput_steps, args.repeats, work)
    where = (rows[0]["device"], rows[0]["precision"])
    if where != (args.device, args.precision):
        raise PeersError(f"Asked for {args.device} in {args.precision}, but the trainers ran on {where[0]} "
                         f"in {where[1]}. Unset ACCELERATE_USE_CPU or CUDA_VISIBLE_DEVICES if the "
                         "environment sets them, or ask for what this machine has (--device, --precision).")
    table = throughput_table(rows)
    ratio = {r["trainer"]: r["ratio_to_st"] for r in rows if r["trainer"] != ST_ROW}
    print(f"{table}\n\nsteps/s of mtd over SentenceTransformerTrainer's: "
          + ", ".join(f"{name} {x:.2f}" for name, x in ratio.items()))
    atomic_write_json(out, {
        "date": str(datetime.date.today()), "device": args.device, "precision": args.precision,
        "machine": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
        "threads": args.threads, "config": _rel(config),
        "student": {k: getattr(setup.cfg.student, k) for k in ("path", "layers", "max_length")},
        "texts": len(setup.texts), "batch": setup.batch, "steps": args.throughput_steps,
        "repeats": args.repeats, "targets": "random, of the teachers' sizes",
        "versions": _versions("torch", "transformers", "sentence-transformers", "accelerate", "datasets",
                              "pyarrow"),
        "rows": rows, "ratio_mtd_to_st": rows[0]["ratio_to_st"], "ratio_to_st": ratio, "table": table})
    logger.info("Wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli_main("peers", lambda: throughput_only(args) if args.throughput_only else body(args))


if __name__ == "__main__":
    sys.exit(main())
