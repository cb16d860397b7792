"""Typed training configs filled from YAML and overridden from the command line.

Every entry point under ``adatok_vlm.training`` takes ``--config FILE.yaml`` and overrides any field
as ``--section.field VALUE`` (values parsed as YAML, so ``--train.lr 3e-4``, ``--data.flip false``,
``--model.fsq_levels [8,5,5,5]`` work). The common fields have short forms: ``--output_dir``,
``--max_steps``, ``--seed``, ``--resume`` (all in the ``train`` section).

A YAML file may start from another with ``base: other.yaml`` (relative to itself); nested mappings
are merged, so one base file plus small per-size overrides replace copied files.

The project's own config files (``configs/``) ship inside the package as ``adatok_vlm.configs``;
:func:`configs_dir` finds them in a regular install as in a source checkout.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

SHORT_FLAGS = {"output_dir": "train.output_dir", "max_steps": "train.max_steps", "seed": "train.seed",
               "overwrite": "train.overwrite",
               "resume": "train.resume"}


# ---------------------------------------------------------------------------------------------
# the shipped configs
# ---------------------------------------------------------------------------------------------
def configs_dir() -> Path:
    """The folder of the project's config files (``configs/``: YAML, DeepSpeed JSON, VAE architectures).

    They are package data (``adatok_vlm.configs``), so ``importlib.resources`` finds them wherever the
    package is installed, a wheel included. An editable install made before ``configs/`` became a
    package does not map it; there the checkout's ``configs/`` beside ``training/`` is the same folder.
    """
    from importlib.resources import files

    try:
        folder = Path(str(files("adatok_vlm.configs")))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[1] / "configs"
    if not folder.is_dir():
        raise FileNotFoundError(f"the packaged configs folder is missing (looked in {folder}); reinstall adatok-vlm")
    return folder


# ---------------------------------------------------------------------------------------------
# YAML with inheritance
# ---------------------------------------------------------------------------------------------
def deep_merge(base: dict, override: dict, where: str = "") -> dict:
    """``override`` over ``base``, nested mappings merged. A mapping on one side and a value (not null) on the
    other is a ``ValueError`` naming the key: ``train: 5`` in a file is not silently replaced by ``--train.lr``."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = deep_merge(old, value, f"{where}{key}.")
            continue
        if old is not None and value is not None and isinstance(value, dict) != isinstance(old, dict):
            mapping, other = (value, old) if isinstance(value, dict) else (old, value)
            raise ValueError(f"{where}{key} is given both as a mapping ({sorted(map(str, mapping))[:5]}) and as "
                             f"the value {other!r}; a section holds fields, a field holds one value")
        out[key] = value
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``base:`` chains (relative to the including file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config {path} includes itself through 'base:'")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config {path} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"config {path} is not UTF-8 text ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(load_yaml(path.parent / base, _seen + (path,)), data)
    return data


# ---------------------------------------------------------------------------------------------
# command-line overrides
# ---------------------------------------------------------------------------------------------
def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """``["--config", "x.yaml", "--train.lr", "1e-3", "--seed=3"]`` -> ``("x.yaml", {"train": {...}})``."""
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"missing value for --{key}")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
            continue
        key = SHORT_FLAGS.get(key, key)   # a key without a dot sets a top-level field (e.g. --tokenizer)
        node = overrides
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{key}: --{'.'.join(parents[:depth + 1])} was given a value ({node!r}) and "
                                 "cannot also hold fields")
        if isinstance(node.get(leaf), dict) and node[leaf]:
            raise ValueError(f"--{key}: its fields were given already (--{key}.{next(iter(node[leaf]))} ...); a "
                             "section cannot also be set to one value")
        try:
            node[leaf] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as error:
            raise ValueError(f"--{key}: the value {value!r} is not valid YAML ({error})") from None
    return config_path, overrides


# ---------------------------------------------------------------------------------------------
# dataclass filling with type checks
# ---------------------------------------------------------------------------------------------
def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is None:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {value!r}")
        return fill_dataclass(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[]") for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:                       # an int beyond float's range (10**400)
            raise ValueError(f"{where} must be a finite number, got an integer of {len(str(value))} digits") from None
        if not math.isfinite(value):                # NaN never compares, inf is no setting: neither is meant
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def fill_dataclass(cls, values: dict, where: str = "config"):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise TypeError(f"{where}: field names must be strings, got {odd[0]!r} ({type(odd[0]).__name__})")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {where}; known: {sorted(names)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def check_fields(config_cls, section: dict, where: str = "model", extra: tuple[str, ...] = ("preset",)) -> None:
    """Refuse keys of a free-form config section (``model:``, handed to a ``PretrainedConfig`` dataclass that
    would keep any unknown key as an attribute) that are not fields of ``config_cls``: a misspelt
    ``hiden_size`` is a ``ValueError`` naming it and the closest field, not silently ignored."""
    import difflib

    known = {f.name for f in dataclasses.fields(config_cls)} | set(extra)
    odd = [key for key in section if not isinstance(key, str)]
    if odd:
        raise TypeError(f"{where}: field names must be strings, got {odd[0]!r} ({type(odd[0]).__name__})")
    unknown = sorted(set(section) - known)
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                 else repr(key) for key in unknown]
        raise ValueError(f"unknown field(s) in {where}: {', '.join(hints)}; {config_cls.__name__} has no such field")


def build_model_config(section: dict):
    """A config's ``model:`` section, ``{"preset": name, **overrides}`` (or plain fields) -> ``AdaTokConfig``.

    The one reading of a tokenizer's model section: its trainer, the latent cache and the VAE
    conversion all build the same config from it.
    """
    from ..tokenizer import AdaTokConfig

    if not isinstance(section, dict):
        raise TypeError(f"model must be a mapping of AdaTokConfig fields, got {section!r}")
    check_fields(AdaTokConfig, section)
    section = dict(section)
    preset = section.pop("preset", None)
    try:
        return AdaTokConfig.from_preset(preset, **section) if preset else AdaTokConfig(**section)
    except (ValueError, TypeError) as error:
        if any(name in str(error) for name in [*section, "preset"]):
            raise
        # an error from deeper inside (int('abc') of a list field): say which of the given fields it could be
        raise type(error)(f"model: the fields {sorted(section)} do not make an AdaTokConfig: {error}") from error


def parse_config(cls, argv: list[str] | None = None, default_config: str | None = None):
    """Parse ``--config FILE`` plus overrides into dataclass ``cls``; returns ``(config, raw_dict)``."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cls))
        raise SystemExit(0)
    config_path, overrides = parse_overrides(argv)
    config_path = config_path or default_config
    raw = load_yaml(config_path) if config_path else {}
    raw = deep_merge({**mapping_defaults(cls), **raw}, overrides)
    return fill_dataclass(cls, raw), raw


def mapping_defaults(cls) -> dict:
    """The non-empty defaults of ``cls``'s mapping fields (a trainer's ``model: {"preset": "adatok-s"}``).

    A config file's section replaces such a default whole (the file says what the model is); flags merge
    into whatever is there, so ``--model.vae_path DIR`` without a file keeps the default preset instead of
    dropping it."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if isinstance(value, dict) and value:
                out[f.name] = value
    return out


def exit_if_help(argv: list[str], usage: str, *classes) -> None:
    """``-h``/``--help`` anywhere in ``argv``: print ``usage`` and each config class's fields, exit 0 (for
    entry points that parse their overrides themselves, such as the demos)."""
    if any(a in ("-h", "--help") for a in argv):
        print("\n\n".join([usage.strip(), *(config_help(c) for c in classes)]))
        raise SystemExit(0)


def config_help(cls) -> str:
    """Usage text listing every ``--section.field`` of ``cls`` with its type and default."""
    lines = ["usage: --config FILE.yaml [--section.field VALUE ...]   (values are YAML; short forms: "
             + ", ".join(f"--{k}" for k in SHORT_FLAGS) + ")", ""]

    def walk(klass, prefix: str) -> None:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            lines.append(f"  {'--' + prefix + f.name:<34} {name:<16} {default!r}")

    walk(cls, "")
    return "\n".join(lines)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
