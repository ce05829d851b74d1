"""Recipes: YAML files that pick and override the fields of a stage's keyword-only config dataclass.

A stage declares one dataclass (composed of the dataclasses that sit next to the components they
configure); a recipe is a YAML mapping over its fields; command-line ``key=value`` pairs override
single fields, nested with dots (``sampling.temperature=0.7``). Everything is validated before any
work starts: unknown keys, wrong types and failed cross-field checks (``__post_init__`` raising
``ConfigError``) are reported with the dotted key and what is allowed. Booleans are strict: only
``true``/``false`` (YAML 1.1's ``yes``/``no``/``on``/``off`` are strings, so a bool field refuses them).

Entry points run as ``if __name__ == "__main__": run(main)``: a problem with the run's inputs found later (an
``InputError``: a config value, a dataset or row, a model or checkpoint dir; or a reward that cannot be built
or breaks its contract) ends the process with one ``error: ...`` line on stderr and exit status 2, unless
``--debug`` is given (then the full traceback). Stages check their inputs before loading the policy.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")
_BOOL_TAG = "tag:yaml.org,2002:bool"


class _StrictBoolLoader(yaml.SafeLoader):
    """YAML with strict booleans: only true/false (any case YAML 1.2 allows) are booleans; YAML 1.1's
    yes/no/on/off/y/n stay strings, so a bool field given one is refused instead of silently read."""


_StrictBoolLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictBoolLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(stream) -> Any:
    return yaml.load(stream, Loader=_StrictBoolLoader)


class InputError(ValueError):
    """A problem with the run's inputs that the user fixes (``run`` reports it in one line): the base of
    ``ConfigError`` (and so ``grpo.model_dir.ModelDirError``), ``data.loaders.DataError`` and
    ``rewards.registry.RewardError``."""


class ConfigError(InputError):
    """A recipe or override that cannot be turned into a valid config. ``key`` is the dotted field path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (ints to floats, dicts to dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        dataclass_errors = [e for e in errors if e.key != key]
        if dataclass_errors:
            raise dataclass_errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in get_args(tp))}; got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of {_type_name(item)}, got {value!r}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false (booleans are strict), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type[T], values: dict, prefix: str = "") -> T:
    """Construct the dataclass ``cls`` from a (nested) mapping, validating every field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}", f"unknown key; allowed keys of {cls.__name__}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(prefix) if prefix else e
    except TypeError as e:
        raise ConfigError(prefix, str(e)) from None


def _parse_scalar(text: str) -> Any:
    """Parse an override's value with YAML rules (numbers, booleans, null, lists, mappings); booleans are
    only true/false (``yes``/``on`` stay strings)."""
    try:
        return _yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(values: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key=value (nested keys with dots)")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = _parse_scalar(text)


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read a YAML recipe (may be None: the dataclass defaults), apply ``key=value`` overrides, validate."""
    values: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError("--recipe", f"no such recipe file: {path}")
        with path.open() as f:
            loaded = _yaml_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError("--recipe", f"{path} must hold a YAML mapping of config keys")
        values = loaded
    for assignment in overrides:
        apply_override(values, assignment)
    return build(cls, values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[str]:
    """One line per (nested) field: dotted key, type, default (a nested section's default comes from its
    parent's default, e.g. a stage that starts from a checkpoint rather than the component's own default)."""
    if instance is None:
        try:
            instance = cls()
        except (TypeError, ConfigError):  # required fields, or defaults that only validate with a recipe
            instance = None
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        value = getattr(instance, f.name) if instance is not None else None
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, key + ".", value)
            continue
        if instance is not None:
            default = repr(value)
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        lines.append(f"  {key} : {_type_name(tp)} = {default}")
    return lines


def cli(cls: type[T], description: str | None = None, argv: list[str] | None = None) -> T:
    """Parse ``--recipe FILE key=value ...`` for a stage entry point; exits with a clear message on bad input."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value, nested with dots):\n" + "\n".join(describe(cls)),
    )
    parser.add_argument("--recipe", help="YAML recipe file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    parser.add_argument("--debug", action="store_true", help="on an input error, the full traceback instead of one line")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.recipe, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Call ``main(argv)`` (default: ``sys.argv[1:]``) as an entry point: an ``InputError`` (bad config, data,
    model dir, reward) is printed as ``error: <message>`` on one line of stderr and exits with status 2; with
    ``--debug`` in ``argv`` it propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except InputError as e:
        if "--debug" in argv:
            raise
        print(f"error: {' '.join(str(e).split())} (--debug shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
