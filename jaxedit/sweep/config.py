"""Sweep configuration: YAML → `SweepConfig`, dotted `key=value` overrides, validation.

A config names a task, models, localizations, seeds, a grid (dotted key → list of values), a
device mesh and an output root; its other sections are the experiment's own settings classes
(`experiment.Settings`: data, localize, train, general_text, eval, relearn, soft_prompt), so each
knob is declared, with its default, once. An unknown key is an error that suggests the nearest
valid one; every grid point is validated like the base config before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from pathlib import Path

import yaml

from jaxedit.errors import JaxeditError
from jaxedit.experiment import Settings
from jaxedit.localize.components import PAPER_LOCALIZATIONS, RULES
from jaxedit.models.model import DTYPES
from jaxedit.sharding.mesh import MeshSpec
from jaxedit.tasks import TASKS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data; the checkout's configs/ links here
PRESET_KEYS = ("train.lr", "train.forget_loss_coef")  # what a train.preset sets per model and localization
MOVED_KEYS = {"train.dtype": "dtype"}  # old key → the key that replaced it (the precision of every stage, not training's)


@dataclasses.dataclass(frozen=True)
class SweepConfig(Settings):
    """A sweep: the experiment's settings (inherited sections) plus what the sweep loops over."""

    name: str = "sweep"
    task: str = "sports_athletes"
    models: tuple[str, ...] = ("gemma-3-270m",)
    localizations: tuple[str, ...] = PAPER_LOCALIZATIONS
    seeds: tuple[int, ...] = (0,)
    grid: dict | None = None  # {'train.lr': [1e-4, 3e-4], ...}: every combination, for every localization
    dtype: str = "float32"  # the precision each model is loaded at, so every stage of every unit runs at it
    parallel_units: int = 1  # units of one model run at once, in threads sharing the model (results unchanged)
    mesh: MeshSpec = MeshSpec()
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
        if path in MOVED_KEYS:
            raise JaxeditError(f"config key {path!r} is now {MOVED_KEYS[path]!r}: set {MOVED_KEYS[path]}={value} "
                               "at the top level")
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
    """The validated config of a file / named config with `key=value` overrides applied.

    Every grid point is validated too, and a `train.preset` beside an explicit `train.lr` or
    `train.forget_loss_coef` (in the config or its grid) is an error: the preset sets both.
    """
    raw = read_yaml(source)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    config = _build(SweepConfig, raw, "")
    validate(config)
    _check_preset(raw, config)
    for point in grid_points(config):
        validate(with_values(config, dict(point)))
    return config


def _check_preset(raw: dict, config: SweepConfig) -> None:
    train = raw.get("train") or {}
    grid = config.grid or {}
    if not (config.train.preset or "train.preset" in grid):
        return
    explicit = [k for k in PRESET_KEYS if k.partition(".")[2] in train or k in grid]
    if explicit:
        raise JaxeditError(f"train.preset sets {' and '.join(PRESET_KEYS)} per model and localization, and "
                           f"{', '.join(explicit)} is set too: remove one of them")


def grid_points(config: SweepConfig) -> list[tuple[tuple[str, object], ...]]:
    """Every grid assignment ((dotted key, value), ...) sorted by key; [()] without a grid."""
    grid = config.grid or {}
    keys = sorted(grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [()]


def validate(config: SweepConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    if config.task not in TASKS:
        raise JaxeditError(f"unknown task {config.task!r}: {_suggest(config.task, TASKS)}")
    for name in config.localizations:
        if name not in PAPER_LOCALIZATIONS:
            raise JaxeditError(f"unknown localization {name!r}: {_suggest(name, PAPER_LOCALIZATIONS)}")
    if not config.models or not config.localizations or not config.seeds:
        raise JaxeditError("models, localizations and seeds each need at least one entry")
    for key in ("models", "localizations", "seeds"):
        repeated = sorted({str(v) for v in getattr(config, key) if getattr(config, key).count(v) > 1})
        if repeated:
            raise JaxeditError(f"{key} lists {', '.join(repeated)} more than once: list each once")
    for dotted, values in (config.grid or {}).items():
        if not isinstance(values, list) or not values:
            raise JaxeditError(f"grid.{dotted}: give a non-empty list of values")
        section, _, key = dotted.partition(".")
        hints = typing.get_type_hints(SweepConfig)
        if section not in hints or not dataclasses.is_dataclass(hints[section]):
            raise JaxeditError(f"grid key {dotted!r}: {_suggest(section, hints)} (grid keys look like train.lr)")
        if section == "mesh":
            raise JaxeditError(f"grid key {dotted!r}: the mesh is one per sweep (run a sweep per mesh)")
        fields = typing.get_type_hints(hints[section])
        if key not in fields:
            raise JaxeditError(f"grid key {dotted!r}: {_suggest(key, fields)}")
        for value in values:
            _coerce(value, fields[key], f"grid.{dotted}")
    if config.dtype not in DTYPES:
        raise JaxeditError(f"dtype {config.dtype!r}: use one of {', '.join(DTYPES)}")
    if config.parallel_units < 1:
        raise JaxeditError(f"parallel_units {config.parallel_units}: run at least 1 unit at a time")
    if config.train.steps < 1 or config.train.batch_size < 1 or config.train.accumulate < 1:
        raise JaxeditError("train.steps, train.batch_size and train.accumulate must be ≥ 1")
    if config.localize.rule not in RULES:
        raise JaxeditError(f"localize.rule {config.localize.rule!r}: use one of {', '.join(RULES)}")
    for model in config.models:  # fails now, not mid-sweep, when a model or setting has no preset
        for name in config.localizations:
            config.train.for_localization(model, name)
    if config.relearn.enabled and config.relearn.steps < 1:  # eval_at is checked by RelearnSettings
        raise JaxeditError("relearn.steps must be ≥ 1 (or set relearn.enabled=false)")
    if config.eval.probes and config.eval.probe_steps < 1:
        raise JaxeditError("eval.probe_steps must be ≥ 1 (or set eval.probes=false)")
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
