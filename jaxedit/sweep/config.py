"""Sweep configuration: YAML → nested frozen dataclasses, dotted `key=value` overrides, validation.

A config names a task, models, localizations, training / evaluation / attack settings, a grid
(dotted key → list of values), seeds, a device mesh and an output root. Every section is a frozen
dataclass; an unknown key is an error that suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from jaxedit.errors import JaxeditError
from jaxedit.localize.components import PAPER_LOCALIZATIONS

TASKS = ("sports_athletes", "sport_to_golf", "counterfact", "counterfact_sequential")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data; the checkout's configs/ links here


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # null: the built-in set of the task
    mcq_path: str | None = None  # CounterFact MCQ parquet (prompt_id join); null: the options in the data
    n_forget: int = 16
    split: str | None = None  # sports whole-sport split (e.g. basketball_split) or CounterFact split name
    known_threshold: float = 0.5
    max_maintain: int | None = 64  # cap on maintain facts kept (train 80% / test 20%); null: all
    pool_size: int = 8  # CounterFact few-shot pool (the last known rows; paper: 64)


@dataclasses.dataclass(frozen=True)
class LocalizeConfig:
    flu_layers: tuple[int, ...] | None = None  # null: fact lookup on the forget facts picks them
    ct_samples: int = 3
    rule: str = "fill"  # 'fill' (ours) or 'threshold' (the paper's, §10.9)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str | None = None  # a §4.4 setting (e.g. sports_athletes): the paper's lr / coefficient per model
    preset_model: str | None = None  # the paper model whose preset applies (default: from the model name)
    lr: float = 1e-4
    forget_loss_coef: float = 1.0
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    kl_coef: float = 0.0
    unlearn: bool = False
    steps: int = 10
    batch_size: int = 8
    accumulate: int = 1
    clip_norm: float | None = 1.0
    dtype: str = "float32"
    remat: bool = False
    checkpoint_every: int = 5  # orbax checkpoint of in-flight training every this many steps (0: never)


@dataclasses.dataclass(frozen=True)
class GeneralTextConfig:
    corpus: str | None = None  # .txt / .jsonl / directory; null: text sampled from the original model
    n: int = 32
    ctx: int = 48
    batch_size: int | None = None  # sequences per micro-batch of the LM/KL term (null: train.batch_size)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    probe_steps: int = 100
    probes: bool = True
    mmlu_dir: str | None = None
    mmlu_limit: int | None = 20  # questions per subject
    n_shots: int = 8  # CounterFact MCQ


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
    enabled: bool = True
    lora_rank: int | None = 64  # null: full fine-tuning of every linear weight
    lora_alpha: float = 32.0
    lr: float = 2e-4
    steps: int = 10
    eval_at: tuple[int, ...] = (0, 5, 10)
    batch_size: int = 4
    accumulate: int = 2


@dataclasses.dataclass(frozen=True)
class SoftPromptConfig:
    enabled: bool = True
    kind: str = "attention"  # 'attention' (the paper's adversary) or 'prefix'
    n_vectors: int = 15
    eps: float = 6.0
    lr: float = 1e-5
    steps: int = 16
    batch_size: int = 8
    restarts: int = 2


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    task: str = "sports_athletes"
    models: tuple[str, ...] = ("gemma-3-270m",)
    localizations: tuple[str, ...] = PAPER_LOCALIZATIONS
    seeds: tuple[int, ...] = (0,)
    grid: dict | None = None  # {'train.lr': [1e-4, 3e-4], ...}
    data: DataConfig = DataConfig()
    localize: LocalizeConfig = LocalizeConfig()
    train: TrainConfig = TrainConfig()
    general_text: GeneralTextConfig = GeneralTextConfig()
    eval: EvalConfig = EvalConfig()
    relearn: RelearnConfig = RelearnConfig()
    soft_prompt: SoftPromptConfig = SoftPromptConfig()
    mesh: MeshConfig = MeshConfig()
    output: str = "runs"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(key: str, valid, prefix: str = "") -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if near:
        return f"did you mean {prefix + near[0]!r}?"
    return f"valid: {', '.join(prefix + v for v in sorted(valid))}"


def _coerce(value, hint, where: str):
    """`value` (from YAML) as type `hint`; one clear line when it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except JaxeditError:
                continue
        raise JaxeditError(f"{where}: {value!r} is not a {hint}: fix the value")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = args[0] if args else object
        if len(args) == 2 and args[1] is not Ellipsis:
            if len(items) != 2:
                raise JaxeditError(f"{where}: expected a pair, got {value!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(items, args))
        return tuple(_coerce(v, inner, where) for v in items)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise JaxeditError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise JaxeditError(f"{where}: expected true or false, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is object:
        return value
    raise JaxeditError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls, values, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise JaxeditError(f"{where or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            prefix = f"{where}." if where else ""
            raise JaxeditError(f"unknown config key {path!r}: {_suggest(str(key), hints, prefix)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise JaxeditError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """'train.lr=3e-4' → ('train.lr', 3e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise JaxeditError(f"override {text!r} is not key=value (e.g. train.steps=20)")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise JaxeditError(f"override {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from None


def named_configs() -> dict[str, Path]:
    """Config name → YAML file in configs/."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def read_yaml(source: str | None) -> dict:
    """A config's raw mapping from a file path or a name in configs/ (None: the default config)."""
    if source is None:
        source = "default"
    path = Path(source)
    if not path.is_file():
        named = named_configs()
        if source not in named:
            raise JaxeditError(f"no config file or named config {source!r}: {_suggest(source, named)}")
        path = named[source]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JaxeditError(f"config {path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise JaxeditError(f"config {path} must be a mapping of keys, not a {type(raw).__name__}")
    return raw


def load_config(source: str | None = None, overrides: list[str] = ()) -> SweepConfig:
    """The validated config of a file / named config with `key=value` overrides applied."""
    raw = read_yaml(source)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    config = _build(SweepConfig, raw, "")
    validate(config)
    return config


def validate(config: SweepConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    if config.task not in TASKS:
        raise JaxeditError(f"unknown task {config.task!r}: {_suggest(config.task, TASKS)}")
    for name in config.localizations:
        if name not in PAPER_LOCALIZATIONS:
            raise JaxeditError(f"unknown localization {name!r}: {_suggest(name, PAPER_LOCALIZATIONS)}")
    if not config.models or not config.localizations or not config.seeds:
        raise JaxeditError("models, localizations and seeds each need at least one entry")
    for dotted, values in (config.grid or {}).items():
        if not isinstance(values, list) or not values:
            raise JaxeditError(f"grid.{dotted}: give a non-empty list of values")
        section, _, key = dotted.partition(".")
        hints = typing.get_type_hints(SweepConfig)
        if section not in hints or not dataclasses.is_dataclass(hints[section]):
            raise JaxeditError(f"grid key {dotted!r}: {_suggest(section, hints)} (grid keys look like train.lr)")
        fields = typing.get_type_hints(hints[section])
        if key not in fields:
            raise JaxeditError(f"grid key {dotted!r}: {_suggest(key, fields)}")
        for value in values:
            _coerce(value, fields[key], f"grid.{dotted}")
    if config.train.steps < 1 or config.train.batch_size < 1 or config.train.accumulate < 1:
        raise JaxeditError("train.steps, train.batch_size and train.accumulate must be ≥ 1")
    if config.soft_prompt.kind not in ("attention", "prefix"):
        raise JaxeditError(f"soft_prompt.kind {config.soft_prompt.kind!r}: use 'attention' or 'prefix'")
    if config.localize.rule not in ("fill", "threshold"):
        raise JaxeditError(f"localize.rule {config.localize.rule!r}: use 'fill' or 'threshold'")
    if config.train.preset:
        from jaxedit.edit.train import paper_model, preset

        for model in config.models:  # fails now, not mid-sweep, when a model or setting has no preset
            for name in config.localizations:
                preset(config.train.preset, config.train.preset_model or paper_model(model), name)
    if config.data.n_forget < 2:
        raise JaxeditError("data.n_forget must be ≥ 2 (the attacks split the forget set in half)")


def with_values(config: SweepConfig, assignment: dict) -> SweepConfig:
    """A copy of `config` with dotted keys set (a grid point)."""
    sections = {}
    for dotted, value in assignment.items():
        section, _, key = dotted.partition(".")
        sections.setdefault(section, {})[key] = value
    changes = {}
    for section, values in sections.items():
        current = getattr(config, section)
        hints = typing.get_type_hints(type(current))
        changes[section] = dataclasses.replace(current, **{k: _coerce(v, hints[k], f"grid.{section}.{k}")
                                                           for k, v in values.items()})
    return dataclasses.replace(config, **changes)
