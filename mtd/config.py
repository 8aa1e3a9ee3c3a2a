"""Typed run configuration: dataclasses with defaults, YAML holds what differs.

Loading is strict (house style rule 3): an unknown key anywhere is an error that names the valid
keys, and values are checked against the field types, so a typo never silently falls back to a
default. Overrides use dotted paths (`train.seed=3`, `stages.0.lr=1e-4`) and are typed the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtd.errors import MtdError

LOSS_TERMS = ("cos", "sim", "resim", "nce", "ckd", "kl", "pair")
STAGE_DATA = ("text", "images", "pairs")
VISION_PARTS = ("tower", "projection", "markers")


class ConfigError(MtdError, ValueError):
    """A config file or override that cannot be used as written."""


# ---------------------------------------------------------------------------------------------
# Valid ranges: every numeric field declares its own (`num`), all are checked at load


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (of each item, for lists and dicts). None is valid
    wherever the type allows it; NaN and infinities never are."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # `low` itself is not valid
    high_open: bool = False
    why: str = ""  # appended to the message, e.g. why a batch needs 2 texts

    def __contains__(self, value: float) -> bool:
        return (math.isfinite(value) and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'more than' if self.low_open else 'at least'} {_number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


RANGE = "range"  # the dataclass field metadata key holding a field's Range
SEED = {"ge": 0, "le": 2**32 - 1}  # what numpy's seeding accepts


def num(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
        ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, why: str = "") -> Any:
    """A numeric dataclass field with its valid range, e.g. `batch_size: int = num(64, ge=1)`."""
    low, high = (gt if gt is not None else ge), (lt if lt is not None else le)
    valid = Range(-math.inf if low is None else low, math.inf if high is None else high,
                  gt is not None, lt is not None, why)
    return field(default=default, default_factory=factory, metadata={RANGE: valid})


@dataclass
class TeacherConfig:
    name: str  # short name used in cache folders and logs
    path: str  # local folder (sentence-transformers or transformers), hub id or hf:ORG/NAME
    prompt: str = ""  # prepended to every text, e.g. "query: " (sentence-transformers prompt)
    max_length: int | None = num(None, ge=1)  # tokens; None keeps the model's own max_seq_length
    batch_size: int = num(64, ge=1)  # encode batch size while filling the target cache
    dtype: str = "float32"  # float32 | float16 | bfloat16 (weights and activations)
    pooling: str = "mean"  # for plain transformers folders only: mean | cls | max | lasttoken
    # multiplies this teacher's normalized vector in the concatenated target
    weight: float = num(1.0, gt=0, why=" (to leave a teacher out, remove it)")
    trust_remote_code: bool = False  # run code shipped with the model; off unless you trust it


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=list)  # .txt (one text per line) or .jsonl files
    text_field: str = "text"  # key holding the text in .jsonl corpora
    max_texts: int | None = num(None, ge=1)  # use only the first N texts (after shuffling with `seed`)
    shuffle: bool = True  # shuffle once before taking max_texts / dev rows, so both are random
    dev_size: int = num(0, ge=0)  # texts held out for periodic dev evaluation and agreement scores
    max_chars: int = num(20_000, ge=1)  # longer texts are cut to this many characters (warned, counted)
    # share of the texts of 2+ sentences replaced by their chunks of consecutive sentences (0: off)
    chunk_share: float = num(0.0, ge=0, le=1)
    # [min, max] sentences per chunk, each chunk's size drawn uniformly (the last takes the rest)
    chunk_sentences: list[int] = num(factory=lambda: [1, 10], ge=1)
    seed: int = num(0, **SEED)


@dataclass
class VisionConfig:
    kind: str  # vision tower registry name: open_clip | timm | transformers (mtd/models/vision.py)
    name: str  # model name (open_clip, timm) or folder / hub id / hf:ORG/NAME (transformers)
    pretrained: str | None = None  # open_clip tag or checkpoint; timm: weights file or "timm"
    model_config: dict[str, Any] = field(default_factory=dict)  # extra build kwargs (tiny models)
    tokens: int = num(32, ge=1)  # K: vision tokens entering the text encoder after the projection pool
    projection: str = "linear"  # pool: Jasper's parameter-free AdaptiveAvgPool | linear: + a Linear
    trust_remote_code: bool = False


@dataclass
class StudentConfig:
    init: str = "scratch"  # scratch | pretrained | teacher | run (an mtd run or student folder)
    path: str | None = None  # pretrained/teacher folder or hub id; for scratch: the tokenizer
    layers: list[int] | None = num(None, ge=0)  # init=teacher|pretrained: encoder layers to keep, e.g. [0, 3]
    model_config: dict[str, Any] = field(default_factory=dict)  # init=scratch: transformers config
    heads: dict[str, Any] = field(default_factory=lambda: {"fc1": "target"})  # name -> dim
    max_length: int = num(128, ge=1)  # student tokens per text
    trust_remote_code: bool = False
    vision: VisionConfig | None = None  # image path: tower -> projection pool -> text encoder


@dataclass
class StageConfig:
    name: str
    # text: the corpus | images: image-caption pairs (Jasper stage 4) | pairs: labeled text pairs
    # (the `pairs:` section; contrastive fine-tuning, DisCo's second step)
    data: str = "text"
    # heads | all | last:K (heads plus the last K encoder layers); images: vision (tower, projection
    # and markers) or vision:PART,PART with parts among tower, projection, markers
    train: str = "heads"
    # head -> loss terms: cos, sim, resim (Jasper); nce (symmetric InfoNCE against the in-batch
    # targets); ckd (DisCo's contrastive distillation: InfoNCE against the batch's and the queue's
    # targets); kl (KL between the in-batch similarity distributions); pair (pairs stages: the
    # anchor picks its positive among the batch's positives and hard negatives). In a pairs stage
    # the other terms distill the anchors' teacher targets on the same batch.
    heads: dict[str, list[str]] = field(default_factory=lambda: {"fc1": ["cos", "sim", "resim", "nce"]})
    # head -> "teacher" | "self:HEAD"; in image stages self:HEAD is the student's own HEAD vector
    # of the image's captions (self-distillation, the paper's stage 4)
    targets: dict[str, str] = field(default_factory=dict)
    # head -> prefix dims trained as vectors of their own (Matryoshka): sim + resim on each
    # renormalized prefix against the head's target, beside the head's own terms
    matryoshka: dict[str, list[int]] = num(factory=dict, ge=1)
    # Jasper paper, section 3; nce, ckd, kl and pair weigh 1 unless given here (each only where listed)
    weights: dict[str, float] = num(
        factory=lambda: {"cos": 10.0, "sim": 200.0, "resim": 20.0, "nce": 1.0}, ge=0
    )
    cos_reduction: str = "sum"  # cos over the batch: sum (the paper's formula) | mean (its code)
    margin: float = num(0.015, ge=0)  # relative-similarity margin
    temperature: float = num(0.05, gt=0)  # softmax temperature of nce, ckd, kl and pair
    # ckd: earlier batches' targets kept as extra negatives (DisCo: 65536); 0: the batch's only
    queue_size: int = num(0, ge=0)
    # ckd: the temperature is a trained parameter of the student, starting at `temperature`
    learn_temperature: bool = False
    captions: str = "mean"  # images: target = mean of the captions' normalized targets | sample one
    # exact resim of batches under 25 (P x P in chunks): rows held at once; bigger ones are O(P log^2 P)
    resim_chunk_size: int = num(1024, ge=1)
    resim_samples: int | None = num(None, ge=1)  # estimate resim on this many pairs-of-pairs instead
    lr: float = num(1e-4, gt=0)
    weight_decay: float = num(0.01, ge=0)
    warmup_ratio: float = num(0.05, ge=0, lt=1)  # linear warmup, then cosine decay to 0
    steps: int | None = num(None, ge=1)  # optimizer steps; or give epochs
    epochs: float | None = num(None, gt=0)
    # global batch, split across processes
    batch_size: int = num(128, ge=2, why=" (in-batch losses compare the texts of a batch)")


@dataclass
class ImagesConfig:
    train: list[str] = field(default_factory=list)  # image-caption .jsonl files (coco_mini layout)
    hub: str | None = None  # or a hub data set (or a local folder laid out like one)
    hub_split: str = "train"
    image_column: str = "image"
    caption_column: str = "captions"  # a string or a list of strings per row
    eval: str | None = None  # image-caption .jsonl scored at the end (image-text Recall@1/5/10)
    max_images: int | None = num(None, ge=1)  # use only the first N training images


@dataclass
class PairsConfig:
    """Labeled pairs for `data: pairs` stages (anchor, positive, optional hard negative)."""

    jsonl: list[str] = field(default_factory=list)  # .jsonl files of {"anchor", "positive"[, "negative"]}
    sts: list[str] = field(default_factory=list)  # STS .jsonl (sentence1, sentence2, score) or set folders
    sts_min_score: float = num(4.0)  # STS rows scoring at least this are positive pairs (STS-B: 0-5)
    captions: list[str] = field(default_factory=list)  # image-caption .jsonl: captions of one image pair up
    hub: str | None = None  # a hub data set (or a local folder laid out like one)
    hub_split: str = "train"
    anchor_column: str = "anchor"  # the field names, in .jsonl files and hub sets
    positive_column: str = "positive"
    # hard negatives: in .jsonl read where every row has the field; a hub set must have the column
    # (set null for one without)
    negative_column: str | None = "negative"
    max_pairs: int | None = num(None, ge=1)  # a seeded random subset of this many pairs


@dataclass
class TrainConfig:
    seed: int = num(0, **SEED)
    mixed_precision: str = "no"  # no | fp16 (GPU only) | bf16 (Accelerate)
    grad_accum: int = num(1, ge=1)  # batches per optimizer step; in-batch losses see one batch each
    max_grad_norm: float | None = num(1.0, gt=0)  # gradient clipping; null: none
    log_every: int = num(10, ge=1)  # optimizer steps between log.jsonl rows
    eval_every: int = num(0, ge=0)  # optimizer steps between dev evaluations (0: only at stage ends)
    save_every: int = num(500, ge=1)  # optimizer steps between checkpoints (also at stage ends)
    keep_checkpoints: int = num(2, ge=1)  # mid-stage checkpoints kept; stage-end ones always are
    max_steps_per_job: int | None = num(None, ge=1)  # stop after this many steps (time-limited jobs)
    num_workers: int = num(0, ge=0)  # DataLoader workers
    # heads-only text stages: run the frozen encoder once over the texts (if its outputs fit in
    # 4 GiB) and train the heads on those, instead of running it again at every step
    frozen_features: bool = True
    # text batches of similar token length (within windows of 64 batches, order shuffled): less padding
    group_by_length: bool = False
    compile: bool = False  # torch.compile the student's encoder (GPU speed; minutes of compiling first)
    report_to: str | None = None  # Accelerate tracker, e.g. tensorboard | wandb
    # how long a process waits in a collective for the others before the run stops (a teacher
    # filling the target cache inside a run, a slow checkpoint); NCCL's own default is 10
    timeout_minutes: int = num(60, ge=1, le=7 * 24 * 60)


@dataclass
class EvalConfig:
    sts_dir: str | None = None  # folder of STS sets (<set>/<split>.jsonl); missing: skipped
    split: str = "test"
    teachers: bool = True  # score the teachers beside the student (results cached)
    batch_size: int = num(64, ge=1)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # the run writes OUTPUT_DIR/NAME/
    cache_dir: str = "cache"  # target caches, shared between runs
    cache_chunk_size: int = num(1024, ge=1)  # texts per cache chunk: the unit of resuming and of progress
    synthetic_assets: str | None = None  # build tiny random teachers + corpus here first
    teachers: list[TeacherConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    stages: list[StageConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export_head: str | None = None  # head in final/ (default: the first head)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------
# Strict, typed construction from plain dicts


def _valid_keys_message(cls: type, key: str, where: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(names)}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}.")
        return from_dict(tp, value, where + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}.")
        return [_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # a quoted number, e.g. '3e-4'
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    hint = " (write true or false)" if tp is bool else ""
    raise ConfigError(f"'{where}' must be {getattr(tp, '__name__', tp)}, got {value!r}{hint}.")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_valid_keys_message(cls, key, where))
        kwargs[key] = _coerce(value, hints[key], where + key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"Missing required config key(s) {missing} in '{where or 'top level'}'.")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# YAML as configs mean it

_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")  # 1e-4: YAML 1.1 says string


class ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain data only, no objects) with YAML 1.2's booleans: only
    true/false are booleans, so `no`, `off`, `yes`, `on` stay strings as written (e.g.
    `mixed_precision: no`). 1e-4 is a float, and a key given twice is an error rather than the
    last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"key {key_node.value!r} is given twice; keep one", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
ConfigLoader.add_implicit_resolver(_FLOAT, _EXPONENT_FLOAT, list("-+0123456789"))


class ConfigDumper(yaml.SafeDumper):
    """Quotes strings that either YAML 1.1 or ConfigLoader would read as another type."""


ConfigDumper.add_implicit_resolver(_FLOAT, _EXPONENT_FLOAT, list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """Plain data from YAML text; a syntax error names `source`, line and column, and the problem."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark, start = e.problem_mark or e.context_mark, e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        context = f" ({e.context}{f' from line {start.line + 1}' if start else ''})" if e.context else ""
        hint = "" if isinstance(e, yaml.constructor.ConstructorError) else (
            " Fix it there (often: a tab in the indentation, an unclosed [ or {, or a value with "
            "': ' that needs quotes).")
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e}{context}.{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}.") from None


# ---------------------------------------------------------------------------------------------
# Overrides: `a.b=value`, `stages.1.lr=3e-5`


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like key.path=value (e.g. train.seed=1).")
    key, raw = item.split("=", 1)
    return key.strip().split("."), load_yaml(raw, f"override {item!r}, value") if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in the raw dict; the typed check happens in `from_dict` afterwards."""
    for item in overrides:
        path, value = _parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"'{'.'.join(path[: i + 1])}': no list item {part!r}.")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"'{'.'.join(path[: i + 1])}' is not a section.")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"'{'.'.join(path)}': no list item {last!r}.")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} not found. Pass a YAML file such as configs/tiny.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    data = _with_base(path, load_yaml(text, str(path)) or {}, ())
    cfg = from_dict(RunConfig, apply_overrides(data, list(overrides)))
    validate(cfg)
    return cfg


BASE = "base"  # top-level key: the YAML (relative to this one) whose values this file changes


def _with_base(path: Path, data: Any, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The config `path` holds, over the one its `base:` names (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections.")
    if BASE not in data:
        return data
    base = (path.parent / str(data.pop(BASE))).resolve()
    if base in seen or base == path.resolve():
        raise ConfigError(f"{path}: base: {base} leads back to itself; a chain of bases must end.")
    if not base.is_file():
        raise ConfigError(f"{path}: base: {base} not found. Name a YAML file relative to {path.parent}.")
    return _merge(_with_base(base, load_yaml(base.read_text(encoding="utf-8"), str(base)) or {},
                             (*seen, path.resolve())), data, "")


def _merge(base: Any, over: Any, where: str) -> Any:
    """`over` on top of `base`: mappings key by key; a list by a mapping of item numbers (e.g.
    `stages: {2: {lr: 1e-5}}` changes stage 2, and the number after the last item adds one);
    anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return base | {k: _merge(base[k], v, f"{where}{k}.") if k in base else v for k, v in over.items()}
    if isinstance(base, list) and isinstance(over, dict):
        items = list(base)
        for key in over:
            if not (isinstance(key, int) and not isinstance(key, bool) and key >= 0):
                raise ConfigError(f"'{where}{key}': change a list item by its number, 0 to {len(items) - 1} "
                                  f"(or {len(items)} to add one).")
        for key, value in sorted(over.items()):
            if key > len(items):
                raise ConfigError(f"'{where}{key}': there is no item {key - 1} before it; number new "
                                  f"items from {len(items)} on.")
            if key == len(items):
                items.append(value)
            else:
                items[key] = _merge(items[key], value, f"{where}{key}.")
        return items
    return over


def parse_config_args(parser: argparse.ArgumentParser,
                      argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """A command's arguments: CONFIG and dotted overrides added to `parser`, then the config loaded
    from them; a bad config exits 2 with the parser's usage line, as a bad argument does."""
    parser.add_argument("config", help="YAML run config, e.g. configs/default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seed=1")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides), args
    except ConfigError as e:
        parser.error(str(e))


def dump_config(cfg: RunConfig) -> str:
    return yaml.dump(to_dict(cfg), Dumper=ConfigDumper, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Cross-field checks that types alone cannot express


def _check_train_mode(stage: StageConfig, where: str) -> None:
    if stage.data not in STAGE_DATA:
        raise ConfigError(f"{where}.data={stage.data!r}: use one of {STAGE_DATA}.")
    if stage.data == "images":
        parts = stage.train.removeprefix("vision").removeprefix(":").split(",")
        if not stage.train.startswith("vision") or (stage.train != "vision" and (
                not all(parts) or set(parts) - set(VISION_PARTS))):
            raise ConfigError(
                f"{where}.train={stage.train!r}: an image stage trains the vision side only "
                f"(the text side stays frozen): use vision, or vision:PARTS with parts among "
                f"{', '.join(VISION_PARTS)} (e.g. vision:projection,markers).")
        if stage.captions not in ("mean", "sample"):
            raise ConfigError(f"{where}.captions={stage.captions!r}: use mean or sample.")
    elif stage.train not in ("heads", "all") and not (
        stage.train.startswith("last:") and stage.train[5:].isdigit() and int(stage.train[5:]) > 0
    ):
        raise ConfigError(f"{where}.train={stage.train!r}: use heads, all, or last:K (e.g. last:3).")


def _check_stage(stage: StageConfig, heads: dict[str, Any], where: str) -> None:
    if (stage.steps is None) == (stage.epochs is None):
        raise ConfigError(f"{where}: give exactly one of 'steps' or 'epochs'.")
    _check_train_mode(stage, where)
    for head, terms in stage.heads.items():
        if heads and head not in heads:
            raise ConfigError(f"{where}.heads: unknown head '{head}'; student heads: {list(heads)}.")
        bad = [t for t in terms if t not in LOSS_TERMS]
        if bad or not terms:
            raise ConfigError(f"{where}.heads.{head}: loss terms {bad or terms} not in {LOSS_TERMS}.")
    for head, target in stage.targets.items():
        if head not in stage.heads:
            raise ConfigError(f"{where}.targets: head '{head}' is not trained in this stage.")
        source = target.removeprefix("self:")
        if target != "teacher" and not (target.startswith("self:") and (source in heads or not heads)):
            raise ConfigError(
                f"{where}.targets.{head}={target!r}: use 'teacher' or 'self:HEAD' "
                f"with HEAD one of {list(heads)}."
            )
    if stage.matryoshka and stage.data != "text":
        raise ConfigError(f"{where}.matryoshka: prefixes train in text stages only (an image stage's "
                          "frozen text side has no prefix to match). List them in a text stage; the "
                          "image vectors share them through the same head.")
    for head, dims in stage.matryoshka.items():
        if head not in stage.heads:
            raise ConfigError(f"{where}.matryoshka: head '{head}' is not trained in this stage; "
                              f"its heads: {list(stage.heads)}.")
        if not dims:  # whole numbers of at least 1: the typed parse and the range check that
            raise ConfigError(f"{where}.matryoshka.{head}=[]: give a list of prefix sizes, e.g. "
                              "[64, 128, 256], or leave the head out.")
        if len(set(dims)) != len(dims):
            raise ConfigError(f"{where}.matryoshka.{head}={dims!r}: a prefix size appears twice; "
                              "list each once.")
    _check_contrastive(stage, where)
    if stage.cos_reduction not in ("sum", "mean"):
        raise ConfigError(f"{where}.cos_reduction={stage.cos_reduction!r}: use sum or mean.")
    if set(stage.weights) - set(LOSS_TERMS):
        raise ConfigError(f"{where}.weights: keys must be among {LOSS_TERMS}.")


def _check_contrastive(stage: StageConfig, where: str) -> None:
    """pair only in pairs stages (and some head with it there); queue and learned temperature only
    where a head has ckd."""
    with_pair = [h for h, terms in stage.heads.items() if "pair" in terms]
    if with_pair and stage.data != "pairs":
        raise ConfigError(f"{where}.heads.{with_pair[0]}: the pair term needs labeled pairs, and this "
                          f"stage trains on {stage.data}. Set {where}.data=pairs (with a pairs: "
                          "section), or remove pair from its terms.")
    if stage.data == "pairs" and not with_pair:
        raise ConfigError(f"{where} trains on labeled pairs but no head has the pair term: add pair "
                          f"to a head's terms (e.g. {where}.heads.fc1=[pair, cos, sim, resim]).")
    with_ckd = any("ckd" in terms for terms in stage.heads.values())
    for key, on in (("queue_size", stage.queue_size > 0), ("learn_temperature", stage.learn_temperature)):
        if on and not with_ckd:
            raise ConfigError(f"{where}.{key} is set, but no head of this stage has the ckd term that "
                              f"uses it: add ckd to a head's terms, or remove {key}.")
    if stage.learn_temperature and stage.train.startswith("vision"):
        raise ConfigError(f"{where}.learn_temperature: image stages train the vision side only; use a "
                          "fixed temperature there.")


POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")
TEACHER_DTYPES = ("float32", "float16", "bfloat16")
MIXED_PRECISION = ("no", "fp16", "bf16")


def check_ranges(cfg: Any, where: str = "") -> None:
    """Every numeric field of `cfg` (and of the configs inside it) against its declared Range."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), where + f.name
        valid = f.metadata.get(RANGE)
        if valid is not None:
            for item_key, item in _numbers(value, key):
                if item not in valid:
                    raise ConfigError(f"{item_key}={item!r} is out of range: it must be "
                                      f"{valid.describe()}{valid.why}.")
        elif dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, f"{key}.{i}.")


def _numbers(value: Any, key: str) -> list[tuple[str, float]]:
    """(dotted key, number) for a numeric field's value: itself, or each number inside its lists
    and dicts (e.g. stages.N.matryoshka.fc1.0)."""
    if value is None:
        return []
    if isinstance(value, (list, dict)):
        items = enumerate(value) if isinstance(value, list) else value.items()
        return [pair for k, v in items for pair in _numbers(v, f"{key}.{k}")]
    return [(key, value)]


def _check_choices(cfg: RunConfig) -> None:
    for i, teacher in enumerate(cfg.teachers):
        if teacher.pooling not in POOLING_MODES:
            raise ConfigError(f"teachers.{i}.pooling={teacher.pooling!r}: use one of {POOLING_MODES}.")
        if teacher.dtype not in TEACHER_DTYPES:
            raise ConfigError(f"teachers.{i}.dtype={teacher.dtype!r}: use one of {TEACHER_DTYPES}.")
    if cfg.train.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision!r}: use one of "
                          f"{', '.join(MIXED_PRECISION)} (fp16 needs a GPU).")


# Keys a resumed run may change: they do not alter what is trained.
RESUMABLE_CHANGES = ("train.max_steps_per_job", "train.report_to", "train.num_workers", "train.compile",
                     "eval.", "export_head")


def _flatten(value: Any, key: str = "") -> dict[str, Any]:
    """{"stages.0.lr": 1e-4, ...}: one entry per leaf, list items by index."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value) and value:
        items = enumerate(value)
    else:
        return {key: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out |= _flatten(v, f"{key}.{k}" if key else str(k))
    return out


def check_resume(saved_yaml: str, cfg: RunConfig) -> None:
    """Refuse to resume a run with a config that changes what it trains. A key the saved config
    lacks (a field added since the run started) counts as holding its default."""
    old, new = _flatten(load_yaml(saved_yaml, "the run's config.yaml") or {}), _flatten(to_dict(cfg))
    defaults = _flatten(to_dict(RunConfig()))
    old |= {k: defaults[k] for k in new.keys() - old.keys() if k in defaults}
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"--resume with a different config than the run was started with ({shown}). "
            "Resume with the original values, or start a new run (name=NEW_NAME)."
        )


def check_saved_config(path: Path, cfg: RunConfig) -> None:
    """--resume of a run with checkpoints: its saved config must be there, readable, and agree with
    `cfg`. Without it any new values would be accepted silently."""
    fix = "Restore it (the run's config.yaml), or start a new run (name=NEW_NAME); nothing was changed."
    if not path.is_file():
        raise ConfigError(f"--resume: {path}, the config the run was started with, is missing, so the "
                          f"values given now cannot be checked against it. {fix}")
    try:
        text = path.read_text(encoding="utf-8")
        readable = isinstance(yaml.safe_load(text), dict)
    except (yaml.YAMLError, UnicodeDecodeError):
        readable = False
    if not readable:
        raise ConfigError(f"--resume: {path}, the config the run was started with, is not a readable "
                          f"YAML mapping. {fix}")
    check_resume(text, cfg)


def learns_teacher(stage: StageConfig, head: str) -> bool:
    """Whether `head` learns the teachers' targets in `stage` (a head trained with the pair term
    alone learns from the labels only; a self:HEAD target is the student's own)."""
    return stage.targets.get(head, "teacher") == "teacher" and set(stage.heads[head]) != {"pair"}


def uses_teachers(cfg: RunConfig) -> bool:
    """Whether any stage learns teacher targets or any head is sized to them."""
    return any(learns_teacher(s, h) for s in cfg.stages for h in s.heads) or (
        cfg.student.init not in FULL_STUDENT_INITS and "target" in cfg.student.heads.values())


# Inits that load a whole text side (encoder and heads): their heads come from the folder.
FULL_STUDENT_INITS = ("run", "sentence-transformers")
STUDENT_INITS = ("scratch", "pretrained", "teacher", *FULL_STUDENT_INITS)


def _check_images(cfg: RunConfig) -> None:
    image_stages = [i for i, s in enumerate(cfg.stages) if s.data == "images"]
    if not image_stages:
        return
    if cfg.student.vision is None:
        raise ConfigError(f"stages.{image_stages[0]} trains on images but the student has no vision "
                          "tower: add student.vision (kind, name; see configs/multimodal.yaml).")
    if not cfg.images.train and not cfg.images.hub:
        raise ConfigError(f"stages.{image_stages[0]} trains on images but none are given: set "
                          "images.train (image-caption .jsonl files) or images.hub.")
    if cfg.student.vision.projection not in ("pool", "linear"):
        raise ConfigError(f"student.vision.projection={cfg.student.vision.projection!r}: use pool or "
                          "linear.")


def validate(cfg: RunConfig) -> None:
    check_ranges(cfg)
    _check_choices(cfg)
    if not cfg.stages:
        raise ConfigError("No stages: add a 'stages:' list (see configs/default.yaml).")
    if uses_teachers(cfg) and not cfg.teachers:
        raise ConfigError("No teachers: add a 'teachers:' list with name and path for each.")
    names = [t.name for t in cfg.teachers]
    if len(set(names)) != len(names):
        raise ConfigError(f"Teacher names must be unique, got {names}.")
    if not cfg.data.corpus and any(s.data == "text" for s in cfg.stages):
        raise ConfigError("data.corpus is empty: list one or more .txt or .jsonl files.")
    p = cfg.pairs
    pair_stages = [i for i, s in enumerate(cfg.stages) if s.data == "pairs"]
    if pair_stages and not (p.jsonl or p.sts or p.captions or p.hub):
        raise ConfigError(f"stages.{pair_stages[0]} trains on labeled pairs but none are given: set "
                          "pairs.jsonl, pairs.sts, pairs.captions or pairs.hub.")
    low_high = cfg.data.chunk_sentences
    if len(low_high) != 2 or low_high[0] > low_high[1]:
        raise ConfigError(f"data.chunk_sentences={low_high}: give [min, max] sentences per chunk "
                          "with min <= max, e.g. [1, 10].")
    if cfg.student.init not in STUDENT_INITS:
        raise ConfigError(f"student.init={cfg.student.init!r}: use one of {', '.join(STUDENT_INITS)}.")
    if cfg.student.init != "scratch" and not cfg.student.path:
        raise ConfigError(f"student.init={cfg.student.init} needs student.path.")
    for head, dim in cfg.student.heads.items():
        if dim != "target" and not (isinstance(dim, int) and dim > 0):
            raise ConfigError(f"student.heads.{head}={dim!r}: use a positive int or 'target'.")
    # A loaded text side brings its own heads, known once it is loaded (checked then).
    heads = {} if cfg.student.init in FULL_STUDENT_INITS else cfg.student.heads
    for i, stage in enumerate(cfg.stages):
        _check_stage(stage, heads, f"stages.{i}")
    if cfg.student.layers is not None and cfg.student.init in ("teacher", "pretrained"):
        check_layers(cfg, len(cfg.student.layers))  # the rest once the student is built
    stage_names = [s.name for s in cfg.stages]
    if len(set(stage_names)) != len(stage_names):
        raise ConfigError(f"Stage names must be unique (they name checkpoints), got {stage_names}.")
    if cfg.export_head is not None and heads and cfg.export_head not in heads:
        raise ConfigError(f"export_head={cfg.export_head!r} is not one of {list(cfg.student.heads)}.")
    _check_images(cfg)


def check_dims(cfg: RunConfig, head_dims: dict[str, int], target_dim: int) -> None:
    """Cosine compares vectors pointwise, so a head with `cos` needs its target's size.

    Checked once the teachers' dims are known, before any training step.
    """
    for i, stage in enumerate(cfg.stages):
        for head, terms in stage.heads.items():
            if head not in head_dims:
                raise ConfigError(f"stages.{i}.heads: unknown head '{head}'; the student's heads: "
                                  f"{list(head_dims)}.")
            source = stage.targets.get(head, "teacher")
            if source != "teacher" and source.removeprefix("self:") not in head_dims:
                raise ConfigError(f"stages.{i}.targets.{head}={source!r}: no such head; the "
                                  f"student's heads: {list(head_dims)}.")
            too_big = [d for d in stage.matryoshka.get(head, []) if d >= head_dims[head]]
            if too_big:
                raise ConfigError(
                    f"stages.{i}.matryoshka.{head}: prefixes {too_big} are not smaller than the head "
                    f"({head_dims[head]} dims). Use prefix sizes below {head_dims[head]}; the full "
                    "head is trained by its own terms.")
            want = target_dim if source == "teacher" else head_dims[source.removeprefix("self:")]
            pointwise = [t for t in ("cos", "nce", "ckd") if t in terms]
            if pointwise and head_dims[head] != want:
                fix = "target" if source == "teacher" else want
                raise ConfigError(
                    f"stages.{i}.heads.{head}: '{pointwise[0]}' needs equal dims, but {head} has "
                    f"{head_dims[head]} and its target ({source}) has {want}. Use only sim/resim "
                    f"for this head, or set student.heads.{head}: {fix}."
                )


def check_layers(cfg: RunConfig, layers: int) -> None:
    """A `last:K` stage needs K encoder layers; checked once the student is built, before stage 1
    trains (else a student cut to fewer layers would fail only when that stage starts)."""
    for i, stage in enumerate(cfg.stages):
        if stage.train.startswith("last:") and int(stage.train[5:]) > layers:
            raise ConfigError(f"stages.{i}.train={stage.train}: the student's encoder has {layers} "
                              f"layers. Use last:{layers} or less, or all (stages.{i}.train=all).")


def check_batch_sizes(cfg: RunConfig, rows: dict[str, int], processes: int) -> None:
    """Each stage's global batch against its training rows ({"text": N, "images": M}, those read)
    and the number of processes. Checked once the data is read and before any teacher runs: the
    stage itself would fail only when it starts, after the teachers and earlier stages."""
    held_out = {"text": f"training texts (after data.dev_size={cfg.data.dev_size} held out)",
                "images": "training images (those that decode)", "pairs": "labeled pairs"}
    for i, stage in enumerate(cfg.stages):
        n = rows.get(stage.data)
        if n is not None and stage.batch_size > n:
            raise ConfigError(
                f"stages.{i} ({stage.name}): batch_size {stage.batch_size} is larger than the {n} "
                f"{held_out[stage.data]}. Lower stages.{i}.batch_size to {n} or less, or give "
                "more data.")
        if stage.batch_size % processes:
            raise ConfigError(
                f"stages.{i} ({stage.name}): the global batch_size {stage.batch_size} does not "
                f"divide evenly over {processes} processes; use a multiple of {processes}.")
