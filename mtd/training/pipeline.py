"""A whole run: corpus -> teacher target caches -> student -> stages -> export -> report.

`run(cfg)` is what train.py calls; every step is a function of its own so notebooks can call
the pieces (e.g. `load_corpus` and `build_targets` to study a corpus's targets). Text stages train
on the corpus; image stages (Jasper stage 4) on image-caption pairs, each image's target coming
from its captions (teacher targets through the same cache, or the student's own text vectors).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from mtd.config import (
    RunConfig,
    check_batch_sizes,
    check_dims,
    check_layers,
    check_saved_config,
    dump_config,
    learns_teacher,
)
from mtd.data import images
from mtd.data.corpus import Corpus, FeatureDataset, TargetDataset, corpus_of, multi_teacher_target
from mtd.data.pair_batches import PairDataset
from mtd.data.pairs import (
    Pairs,
    combine,
    read_caption_pairs,
    read_hub_pairs,
    read_jsonl_pairs,
    read_sts_pairs,
)
from mtd.data.tokens import TokenizedTexts
from mtd.evaluation import report
from mtd.export import export_student
from mtd.hf import resolve_model
from mtd.io import atomic_write_text, check_writable_dir, hash_texts, load_safetensors, read_json
from mtd.models.projection import ImagePath, special_ids
from mtd.models.student import (
    STUDENT_FILE,
    Student,
    build_encoder,
    check_positions,
    encode,
    layer_list,
    load_student,
    pooled_features,
    pooled_features_of,
    resolve_head_dims,
    save_student,
    student_from_sentence_transformer,
    vision_parts,
)
from mtd.models.vision import build_tower
from mtd.synthetic import make_tiny_assets, make_tiny_image_assets
from mtd.targets import cache
from mtd.training.checkpoints import (
    Checkpoint,
    check_same_data,
    has_checkpoints,
    latest_checkpoint,
    resolve_resume,
)
from mtd.training.distributed import all_succeed, main_decides
from mtd.training.trainer import (
    CHECKPOINT_FIX,
    StageData,
    check_backend,
    check_run_dir,
    collate_features,
    collate_tokens,
    make_accelerator,
    runs_student_outside_steps,
    start_log,
    train_stages,
)

logger = logging.getLogger(__name__)

# A frozen tower's tokens, or a frozen encoder's pooled outputs, are kept in memory below this size.
MAX_FROZEN_BYTES = 4 << 30


def load_corpus(cfg: RunConfig) -> Corpus:
    return corpus_of(cfg.data)


def student_folder(cfg: RunConfig) -> str | None:
    """student.path as a local folder: weights checked where the init loads them from it (an mtd
    run's are checked by load_student; scratch reads only the tokenizer)."""
    s = cfg.student
    if s.path is None:
        return None
    return str(resolve_model(s.path, "student.path", weights=s.init not in ("scratch", "run")))


def source_student(cfg: RunConfig) -> Path:
    """init: run: the mtd student folder student.path names (a run's student/, or itself)."""
    folder = Path(student_folder(cfg))
    return folder / "student" if (folder / "student").is_dir() else folder


def trained_prefixes(cfg: RunConfig) -> dict[str, list[int]]:
    """The Matryoshka prefixes the student comes with: those its source run trained (init: run)."""
    if cfg.student.init != "run":
        return {}
    return read_json(source_student(cfg) / STUDENT_FILE).get("matryoshka", {})


def check_model_paths(cfg: RunConfig) -> None:
    """Every model the run will load exists (or downloads) and holds loadable weights, before the
    first teacher runs: a missing second teacher or student would otherwise stop the run late."""
    for i, teacher in enumerate(cfg.teachers):
        resolve_model(teacher.path, f"teachers.{i}.path (teacher {teacher.name})")
    student_folder(cfg)
    v = cfg.student.vision
    if v is not None and v.kind == "transformers" and not v.model_config:
        resolve_model(v.name, "student.vision.name")


def build_student(cfg: RunConfig, target_dim: int | None) -> tuple[Student, object]:
    """The configured student; with student.vision, an image path around a new tower. Refuses a
    max_length (or image length) beyond the encoder's positions before any training."""
    s = cfg.student
    path = student_folder(cfg)
    if s.init == "run":
        student, tokenizer, _ = load_student(source_student(cfg))
    elif s.init == "sentence-transformers":
        student, tokenizer = student_from_sentence_transformer(path)
    else:
        encoder, tokenizer = build_encoder(s.init, path, s.layers, s.model_config, s.trust_remote_code)
        student = Student(encoder, resolve_head_dims(s.heads, target_dim or 0))
    if s.vision is not None and student.image is None:
        v = s.vision
        # an empty model_config means "none": the tower's own (a folder, a pretrained tag)
        tower = build_tower(v.kind, v.name, v.pretrained, v.model_config or None, v.trust_remote_code)
        student.image = ImagePath(tower, student.encoder.config.hidden_size, v.tokens, v.projection,
                                  *special_ids(tokenizer))
    for stage in cfg.stages:
        if stage.learn_temperature:
            for head in (h for h, terms in stage.heads.items() if "ckd" in terms):
                student.add_logit_scale(head, stage.temperature)
    check_positions(student, s.max_length)
    return student, tokenizer


def _check_output_folders(run_dir: Path) -> None:
    """The run folder (and its checkpoints/ when there is one) must be writable: checked before
    any work, so a read-only output_dir does not fail a run only when it first saves."""
    check_writable_dir(run_dir, "output_dir=PATH")
    if (run_dir / "checkpoints").is_dir():
        check_writable_dir(run_dir / "checkpoints", "output_dir=PATH")


def _prepare_run(cfg: RunConfig, resume: bool) -> tuple[Accelerator, Checkpoint | None]:
    """The accelerator, and the verified checkpoint to resume from (None: start from the start).
    Decisions that read the run folder are the main process's, answered to all."""
    run_dir = cfg.run_dir
    check_run_dir(run_dir, resume)
    accelerator = make_accelerator(cfg.train, run_dir)
    check_backend(accelerator, cfg.stages)
    main_decides(lambda: _check_output_folders(run_dir))
    found = None
    if resume and has_checkpoints(run_dir):
        main_decides(lambda: check_saved_config(run_dir / "config.yaml", cfg))
        found = resolve_resume(run_dir)
    _make_assets(cfg, accelerator)
    if cfg.train.report_to:
        accelerator.init_trackers(cfg.name, config={"config": dump_config(cfg)})
    return accelerator, found


def _make_assets(cfg: RunConfig, accelerator: Accelerator) -> None:
    """The synthetic teachers, corpus and images of a tiny config, built by the main process."""
    if accelerator.is_main_process and cfg.synthetic_assets:
        make_tiny_assets(cfg.synthetic_assets)
        if any(s.data == "images" for s in cfg.stages):
            make_tiny_image_assets(Path(cfg.synthetic_assets) / "images")
    accelerator.wait_for_everyone()


def data_fingerprint(cfg: RunConfig, corpus: Corpus, pairs: images.ImageCaptions | None,
                     labeled: Pairs | None = None) -> dict:
    """What the run trains on: the corpus texts actually used (after shuffling, data.max_texts and
    the dev split) and the image-caption pairs. Every checkpoint records it, so a resume on
    changed data is refused (checkpoints.check_same_data)."""
    found = {}
    if corpus.texts:
        found["corpus"] = {"what": "corpus", "files": list(cfg.data.corpus), "unit": "texts",
                           "count": len(corpus.texts), "sha256": hash_texts(corpus.texts)}
    if pairs is not None:
        rows = [f"{pairs.images[i]}\t{c}" for i, c in zip(pairs.owner, pairs.captions, strict=True)]
        found["images"] = {"what": "image-caption data", "unit": "images",
                           "files": list(cfg.images.train) or [f"{cfg.images.hub} ({cfg.images.hub_split})"],
                           "count": len(pairs.images), "sha256": hash_texts(rows)}
    if labeled is not None:
        negatives = labeled.negative or [""] * len(labeled)
        rows = [f"{a}\t{p}\t{n}" for a, p, n in zip(labeled.anchor, labeled.positive, negatives, strict=True)]
        found["pairs"] = {"what": "labeled pairs", "unit": "pairs", "files": [labeled.name],
                          "count": len(labeled), "sha256": hash_texts(rows)}
    return found


def _start_run(cfg: RunConfig, found: Checkpoint | None) -> None:
    """Every check passed: record the config and start the log (a refused run changes nothing)."""
    start_log(cfg.run_dir, found)  # first: it refuses a damaged log before writing anything
    atomic_write_text(cfg.run_dir / "config.yaml", dump_config(cfg))


FILL_HINT = ("At scale, fill the target caches before training with `python -m mtd.cache CONFIG` "
             "(under `accelerate launch`, sharded over the processes): the run then starts at "
             "once, instead of holding every training process while teachers encode and the main "
             "process checks their vectors.")


def _teacher_arrays(cfg: RunConfig, texts: list[str], accelerator, verify: bool = False,
                    fill_hint: str = FILL_HINT) -> list[np.ndarray]:
    """Every teacher's targets for `texts`, from its cache (filled, sharded over the processes,
    when it is missing or unfinished)."""
    processes = cache.Processes(accelerator.process_index, accelerator.num_processes, main_decides,
                                all_succeed)
    return cache.cached_targets(
        cfg.teachers, texts, cfg.cache_dir, chunk_size=cfg.cache_chunk_size, processes=processes,
        device=str(accelerator.device), verify=verify, fill_hint=fill_hint,
    )


def load_pairs(cfg: RunConfig) -> Pairs:
    """The labeled pairs of `data: pairs` stages, from every source the pairs: section names."""
    p = cfg.pairs
    parts = []
    if p.jsonl:
        parts.append(read_jsonl_pairs(p.jsonl, p.anchor_column, p.positive_column,
                                      p.negative_column or "negative"))
    if p.sts:
        parts.append(read_sts_pairs(p.sts, p.sts_min_score))
    if p.captions:
        parts.append(read_caption_pairs(p.captions))
    if p.hub:
        parts.append(read_hub_pairs(p.hub, p.hub_split, p.anchor_column, p.positive_column,
                                    p.negative_column))
    pairs = combine(parts, p.max_pairs, cfg.data.seed)
    logger.info("Labeled pairs: %d (%s), %d groups%s.", len(pairs), pairs.name, len(np.unique(pairs.group)),
                ", with hard negatives" if pairs.negative is not None else "")
    return pairs


def pairs_need_teachers(cfg: RunConfig) -> bool:
    """Whether a pair stage also distills the anchors' teacher targets (a term besides pair)."""
    return any(s.data == "pairs" and learns_teacher(s, h) for s in cfg.stages for h in s.heads)


def pair_stage_data(cfg: RunConfig, pairs: Pairs, arrays: list[np.ndarray], tokenizer,
                    progress: bool) -> StageData:
    """A pair stage's batches (the same for every pair stage of a run: built once)."""
    dataset = PairDataset(pairs, tokenizer, cfg.student.max_length, arrays,
                          [t.weight for t in cfg.teachers], progress=progress)
    return StageData(dataset, None, PairDataset.collate)


def load_image_captions(cfg: RunConfig) -> images.ImageCaptions:
    """The training image-caption pairs, images that do not decode dropped (and logged)."""
    i = cfg.images
    if i.hub:
        data = images.read_hub_set(i.hub, i.hub_split, i.image_column, i.caption_column)
    else:
        data = images.read_jsonl_sets(i.train)
    if i.max_images is not None:
        keep = data.owner < i.max_images
        data = images.ImageCaptions(data.images[: i.max_images], [c for c, k in zip(
            data.captions, keep, strict=True) if k], data.owner[keep], data.load, data.name)
    return images.keep_decodable(data)


def captions_need_teachers(cfg: RunConfig) -> bool:
    """Whether an image stage learns teacher targets of the captions (not the student's own)."""
    return any(s.data == "images" and learns_teacher(s, h) for s in cfg.stages for h in s.heads)


def _caption_targets(cfg: RunConfig, pairs: images.ImageCaptions, accelerator) -> np.ndarray | None:
    """(N_captions, D_target) multi-teacher targets of the captions, if an image stage learns them:
    the captions go through the target cache like any corpus."""
    if not captions_need_teachers(cfg):
        return None
    arrays = _teacher_arrays(cfg, pairs.captions, accelerator)
    return multi_teacher_target(arrays, [t.weight for t in cfg.teachers]).numpy()


def image_stage_data(cfg: RunConfig, index: int, data: images.ImageCaptions,
                     teacher_target: np.ndarray | None, tokenizer, student: Student) -> StageData:
    """Stage `index`'s image batches. self:HEAD targets are the student's HEAD vectors of the
    captions, computed here from its text side, which image stages keep frozen."""
    stage = cfg.stages[index]
    targets = {"teacher": teacher_target} if teacher_target is not None else {}
    for source in sorted({t for t in stage.targets.values() if t.startswith("self:")}):
        logger.info("Stage %s: encoding %d captions with the student's %s head (its own targets).",
                    stage.name, len(data.captions), source)
        targets[source] = encode(student, tokenizer, data.captions, source.removeprefix("self:"),
                                 cfg.student.max_length, progress=True)
    transform = student.image.tower.preprocess.transform()
    dataset = images.ImageCaptionDataset(data, targets, transform, stage.captions,
                                         seed=cfg.train.seed + 7919 * index)
    tower = student.image.tower
    size = len(dataset) * tower.width * student.image.projection.tokens * 4  # at least; N >= K
    if "tower" not in vision_parts(stage.train) and size < MAX_FROZEN_BYTES:
        dataset.tokens = images.tower_tokens(dataset, tower)  # a frozen tower's tokens never change
    return StageData(dataset, None, images.ImageCaptionDataset.collate, images.StepTaggedSampler)


def corpus_stage_data(corpus: Corpus, arrays: list[np.ndarray], weights: list[float], tokenizer,
                    max_length: int, progress: bool = True) -> StageData:
    """The corpus's batches for text stages: every text tokenized once, here (batches only pad)."""

    def dataset(texts: list[str], offset: int, part: str) -> TargetDataset:
        tokens = TokenizedTexts.build(tokenizer, texts, max_length, desc=f"tokenize {part} texts",
                                      progress=progress)
        return TargetDataset(texts, arrays, weights, offset=offset, tokens=tokens)

    train = dataset(corpus.train, 0, "train")
    dev = dataset(corpus.dev, len(corpus.train), "dev") if corpus.dev else None
    return StageData(train, dev, collate_tokens, lengths=train.tokens.lengths)


def frozen_features(student: Student, tokenizer, texts: list[str], max_length: int,
                    accelerator: Accelerator, tokens: TokenizedTexts | None = None) -> np.ndarray:
    """(N, H) pooled outputs of the frozen encoder for `texts`, each process encoding its share:
    from their kept token ids when given (the same batches as tokenizing them again)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per = -(-len(texts) // world)
    first, progress = rank * per, accelerator.is_local_main_process
    if tokens is None:
        mine = pooled_features(student, tokenizer, texts[first:first + per], max_length, progress=progress)
    else:
        mine = pooled_features_of(student, [len(t) for t in texts[first:first + per]],
                                  lambda rows: tokens.pad(first + rows), progress=progress)
    if world == 1:
        return mine
    part = torch.zeros(per, mine.shape[1], device=accelerator.device)
    part[: len(mine)] = torch.from_numpy(mine).to(accelerator.device)
    return accelerator.gather(part)[: len(texts)].cpu().numpy()  # rank order: the texts' order


def text_stage_data(cfg: RunConfig, index: int, data: StageData, tokenizer, accelerator,
                    student: Student) -> StageData:
    """Stage `index`'s text batches: tokens, or, in a heads-only stage, the frozen encoder's pooled
    outputs computed once (train.frozen_features) when they fit in memory, under DDP or one process
    (FSDP and DeepSpeed shard or cast the encoder outside their steps): the encoder runs in
    eval mode there, so every step would compute exactly these again (in float32 here, outside
    any mixed-precision autocast)."""
    stage = cfg.stages[index]
    hidden = student.encoder.config.hidden_size
    rows = len(data.train) + (len(data.dev) if data.dev is not None else 0)
    if not (cfg.train.frozen_features and stage.train == "heads" and rows * hidden * 4 < MAX_FROZEN_BYTES
            and runs_student_outside_steps(accelerator)):
        return data
    logger.info("Stage %s trains heads only: computing the frozen encoder's outputs of %d texts once.",
                stage.name, rows)

    def features(dataset):
        return FeatureDataset(dataset, frozen_features(student, tokenizer, list(dataset.texts),
                                                       cfg.student.max_length, accelerator, dataset.tokens))

    return StageData(features(data.train), features(data.dev) if data.dev is not None else None,
                     collate_features, data.sampler)  # no padding: no length grouping


def length_mismatches(cfg: RunConfig) -> list[str]:
    """A teacher that reads more tokens than the student makes the student match vectors of text
    it never sees; one that reads fewer, the reverse. Allowed, but said."""
    student = cfg.student.max_length
    return [f"teachers.{i} ({t.name}) reads up to {t.max_length} tokens, the student "
            f"{student} (student.max_length): texts longer than the shorter limit are cut for one "
            "side only. Set both to the same value unless that is what you want."
            for i, t in enumerate(cfg.teachers) if t.max_length is not None and t.max_length != student]


def fill_target_caches(cfg: RunConfig, verify: bool = False) -> None:
    """What `python -m mtd.cache` runs: every target cache a run of `cfg` reads (its corpus, and
    the image captions when an image stage learns teacher targets), filled by the launched
    processes together, and nothing else. verify: check every chunk of a complete cache against
    its checksum too, encoding again those that fail."""
    text_stages = any(s.data == "text" for s in cfg.stages)
    if not cfg.teachers or not (text_stages or captions_need_teachers(cfg) or pairs_need_teachers(cfg)):
        raise cache.CacheError(f"Config {cfg.name!r} reads no teacher targets (it has no teachers, or "
                               "no text stage and no image stage with teacher targets), so there is "
                               "no target cache to fill: train it directly with train.py.")
    accelerator = make_accelerator(cfg.train, cfg.run_dir)
    _make_assets(cfg, accelerator)
    check_model_paths(cfg)
    if text_stages:
        texts = load_corpus(cfg).texts
        logger.info("Target caches of the corpus: %d texts, %d processes.", len(texts),
                    accelerator.num_processes)
        _teacher_arrays(cfg, texts, accelerator, verify=verify, fill_hint="")
    if captions_need_teachers(cfg):
        captions = load_image_captions(cfg).captions
        logger.info("Target caches of the image captions: %d captions, %d processes.", len(captions),
                    accelerator.num_processes)
        _teacher_arrays(cfg, captions, accelerator, verify=verify, fill_hint="")
    if pairs_need_teachers(cfg):
        anchors = load_pairs(cfg).anchor
        logger.info("Target caches of the pairs' anchors: %d texts, %d processes.", len(anchors),
                    accelerator.num_processes)
        _teacher_arrays(cfg, anchors, accelerator, verify=verify, fill_hint="")
    # Every process leaves together and tears its process group down, as a training run does: a
    # process exiting while another still fills used to abort now and then (gloo's threads).
    accelerator.wait_for_everyone()
    accelerator.end_training()


def run(cfg: RunConfig, resume: bool = False) -> Path:
    """Train every stage of `cfg` (resuming if asked), export, report. Returns the run folder."""
    run_dir = cfg.run_dir
    accelerator, found = _prepare_run(cfg, resume)
    check_model_paths(cfg)
    text_stages = any(s.data == "text" for s in cfg.stages)
    corpus = load_corpus(cfg) if text_stages else Corpus([], [])
    if text_stages:
        logger.info("Corpus: %d training texts, %d dev texts.", len(corpus.train), len(corpus.dev))
        for message in length_mismatches(cfg):
            logger.warning("%s", message)
    pairs = load_image_captions(cfg) if any(s.data == "images" for s in cfg.stages) else None
    labeled = load_pairs(cfg) if any(s.data == "pairs" for s in cfg.stages) else None
    rows = {"text": len(corpus.train)} | ({"images": len(pairs.images)} if pairs is not None else {})
    rows |= {"pairs": len(labeled)} if labeled is not None else {}
    check_batch_sizes(cfg, rows, accelerator.num_processes)
    fingerprint = data_fingerprint(cfg, corpus, pairs, labeled)
    if found is not None:  # every process compares the same record with the same data
        check_same_data(found, fingerprint)
    main_decides(lambda: _start_run(cfg, found))  # before the teachers: a bad log stops at once
    arrays = _teacher_arrays(cfg, corpus.texts, accelerator) if text_stages and cfg.teachers else []
    weights = [t.weight for t in cfg.teachers]
    caption_target = _caption_targets(cfg, pairs, accelerator) if pairs is not None else None
    anchor_arrays = _teacher_arrays(cfg, labeled.anchor, accelerator) if (
        labeled is not None and pairs_need_teachers(cfg)) else []
    teacher_arrays = arrays or anchor_arrays  # the same teachers: the same target size
    target_dim = sum(a.shape[1] for a in teacher_arrays) if teacher_arrays else (
        caption_target.shape[1] if caption_target is not None else None)
    # The init must not depend on what ran before (building assets or caches draws random numbers,
    # and only some runs or ranks do it): seed it, so equal configs start from equal students.
    set_seed(cfg.train.seed)
    student, tokenizer = build_student(cfg, target_dim)
    check_dims(cfg, student.head_dims, target_dim or 0)
    if any(stage.train.startswith("last:") for stage in cfg.stages):
        check_layers(cfg, len(layer_list(student.encoder)))

    text_data = corpus_stage_data(corpus, arrays, weights, tokenizer, cfg.student.max_length,
                                accelerator.is_local_main_process) if text_stages else None

    pair_data = pair_stage_data(cfg, labeled, anchor_arrays, tokenizer,
                                accelerator.is_local_main_process) if labeled is not None else None

    def data_for(index: int):
        if cfg.stages[index].data == "text":
            make = partial(text_stage_data, cfg, index, text_data, tokenizer, accelerator)
            return make, len(text_data.train)
        if cfg.stages[index].data == "pairs":
            return (lambda _student: pair_data), len(pair_data.train)
        make = partial(image_stage_data, cfg, index, pairs, caption_target, tokenizer)
        return make, len(pairs.images)

    finished = train_stages(accelerator, student, cfg.stages, cfg.train, run_dir, data_for, found,
                            fingerprint)
    accelerator.end_training()
    if not finished or not accelerator.is_main_process:
        return run_dir
    # The last stage-end checkpoint holds full weights even where training sharded them (FSDP,
    # DeepSpeed), so the saved student is rebuilt from it rather than taken from memory.
    final_ckpt, _ = latest_checkpoint(run_dir)
    set_seed(cfg.train.seed)
    student, tokenizer = build_student(cfg, target_dim)
    student.load_state_dict(load_safetensors(final_ckpt / "model.safetensors", CHECKPOINT_FIX))
    prefixes = {name: set(dims) for name, dims in trained_prefixes(cfg).items()}
    for stage in cfg.stages:  # text stages only: the config refuses prefixes elsewhere
        for name, dims in stage.matryoshka.items():
            prefixes.setdefault(name, set()).update(dims)
    save_student(student, tokenizer, run_dir / "student", cfg.student.max_length,
                 {name: sorted(dims) for name, dims in prefixes.items()})
    head = cfg.export_head or next(iter(student.heads))
    export_student(student, tokenizer, run_dir / "final", head, cfg.student.max_length, overwrite=True)
    e = cfg.eval
    report.final_report(
        run_dir, export_head=head, teachers=cfg.teachers, sts_dir=e.sts_dir, split=e.split,
        batch_size=e.batch_size, score_teachers=e.teachers, cache_dir=Path(cfg.cache_dir),
        dev_texts=corpus.dev, dev_targets=[np.asarray(a[len(corpus.train):]) for a in arrays],
        image_eval=cfg.images.eval, device=str(accelerator.device))
    return run_dir
