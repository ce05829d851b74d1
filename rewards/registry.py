"""The reward registry: recipe names -> reward callables, and batched scoring with error policy.

Contract of a reward function::

    fn(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]

``columns`` are the dataset's columns for the same rows (e.g. ``answer``, ``tests``, ``source``) plus
the trainer's extras (``completion_lengths``); keyword arguments from the recipe are passed too.
``None`` means "does not apply to this sample": it is excluded from that reward's group baseline. Any
sequence of numbers will do (list, tuple, numpy array, torch tensor). A NaN/inf value, like a raise,
stops the run under ``rewards_on_error: raise`` and scores 0 (counted in the failures) under ``zero``.
A reward may also be a class; it is then built once with the recipe's kwargs and called per batch.
The recipe's kwargs are checked against the reward's signature when the reward set is built (see
``allowed_kwargs``): an unknown key is a ``ConfigError`` naming the reward, the key and the allowed keys.

A recipe names a built-in (``accuracy``, ``code``, ``format``, ...) or any ``package.module:function``.

Tags (``grpo.reward_types.RewardTags``) say what a reward's score means to the trainer's metrics, which never
name a reward: ``verifiable`` marks a correctness score in [0, 1] that counts toward the ``accuracy`` metric
(the built-ins ``accuracy`` and ``code`` are verifiable; the others are not). A reward declares its tags in a
``reward_tags`` attribute, a mapping of tag name to bool (on a function or a class; the module needs no import
from this project)::

    def my_checker(prompts, completions, answer, **_): ...
    my_checker.reward_tags = {"verifiable": True}

and a recipe may set or override them: ``{name: my.mod:my_checker, weight: 1.0, tags: {verifiable: true}}``.
Both are checked when the reward set is built: an unknown tag is a ``ConfigError`` naming it and the allowed
ones. A ``RewardSet`` returns ``grpo.reward_types.RewardScores`` (scores, weights, failures and tags per name).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from grpo.config import ConfigError, InputError
from grpo.reward_types import RewardScores, RewardTags

log = logging.getLogger(__name__)

BUILTINS: dict[str, str] = {
    "accuracy": "rewards.math:accuracy",
    "code": "rewards.code:code_reward",
    "format": "rewards.format:format_reward",
    "language": "rewards.language:language_consistency",
    "overlong": "rewards.length:overlong_penalty",
    "cosine_length": "rewards.length:cosine_length",
    "repetition": "rewards.length:repetition_penalty",
    "reward_model": "rewards.reward_model:RewardModelReward",
}


# Built-ins whose options arrive through ``**kwargs``: the fields of this dataclass are their allowed keys.
OPTION_CONFIGS: dict[str, str] = {"accuracy": "rewards.math:MathConfig"}


def check_tags(tags: dict[str, Any], key: str) -> None:
    """Refuse tag names that ``RewardTags`` lacks and non-boolean values (``ConfigError`` at ``key.<tag>``)."""
    allowed = RewardTags.names()
    for tag, value in tags.items():
        if tag not in allowed:
            raise ConfigError(f"{key}.{tag}", f"unknown reward tag {tag!r}; allowed tags: {', '.join(allowed)}")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}.{tag}", f"expected true or false, got {value!r}")


@dataclass(kw_only=True)
class RewardSpec:
    """One reward in a recipe: ``{name: accuracy, weight: 1.0, kwargs: {...}, tags: {verifiable: true}}``.

    ``tags`` override the ones the reward declares (``reward_tags``); the names allowed are ``RewardTags``' fields."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in BUILTINS and ":" not in self.name:
            raise ConfigError("name", f"unknown reward {self.name!r}; built-ins: {', '.join(BUILTINS)}, or 'package.module:function'")
        check_tags(self.tags, "tags")
        if self.kwargs and self.name in BUILTINS:  # a built-in's options are known now: refuse typos with the config
            check_kwargs(self.name, resolve(self.name), self.kwargs, "kwargs")


class RewardError(InputError):
    """A reward function that cannot be loaded, or that raised or returned something outside its contract."""


def resolve(name: str) -> Callable:
    """The callable a recipe name stands for (imported on first use)."""
    target = BUILTINS.get(name, name)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward {name!r}: expected a built-in ({', '.join(BUILTINS)}) or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from None


def _is_column(annotation: Any) -> bool:
    """A parameter annotated as a list takes a dataset column (per-row values), not a recipe option."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    return re.match(r"(typing\.)?(list|List|Sequence|Optional\[(list|List))\b", text.strip()) is not None


def allowed_kwargs(name: str, target: Callable) -> list[str] | None:
    """The recipe ``kwargs`` keys that reward ``target`` really takes, sorted; None where its signature cannot
    be read (then nothing is checked). A function: its named keyword parameters after ``prompts, completions``
    that are not columns (annotated as lists); a class: its constructor's named parameters. Options that arrive
    through ``**kwargs`` are declared by a dataclass whose fields are the keys: ``OPTION_CONFIGS`` for built-ins
    (e.g. the math reward's ``MathConfig``), or a ``reward_options`` attribute (a dataclass or key names) on
    any reward."""
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if not isinstance(target, type):
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for _ in range(2):  # prompts, completions
            if params and params[0].kind in positional:
                params = params[1:]
        params = [p for p in params if not _is_column(p.annotation)]
    keys = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    declared = getattr(target, "reward_options", None)
    if declared is None and name in OPTION_CONFIGS:
        declared = resolve(OPTION_CONFIGS[name])
    if declared is not None:
        if isinstance(declared, str):
            declared = [declared]
        keys |= {f.name for f in dataclasses.fields(declared)} if dataclasses.is_dataclass(declared) else set(declared)
    return sorted(keys)


def check_kwargs(name: str, target: Callable, kwargs: dict, key: str) -> None:
    """Refuse recipe ``kwargs`` keys that reward ``name`` does not take (``ConfigError`` at ``key.<first unknown>``)."""
    allowed = allowed_kwargs(name, target)
    if allowed is None:
        return
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"reward {name!r} has no option {', '.join(map(repr, unknown))}; "
                                                f"allowed keys: {', '.join(allowed) or 'none'}")


class RewardSet:
    """The rewards of a recipe, resolved and ready to score batches."""

    def __init__(self, specs: list[RewardSpec], on_error: Literal["raise", "zero"] = "raise"):
        self.specs, self.on_error = specs, on_error
        self.fns: dict[str, Callable] = {}
        self.tags: dict[str, RewardTags] = {}
        for i, spec in enumerate(specs):
            target = resolve(spec.name)
            check_kwargs(spec.name, target, spec.kwargs, f"rewards[{i}].kwargs")
            declared = getattr(target, "reward_tags", {})
            check_tags(declared, f"{spec.name}.reward_tags")
            self.tags[spec.name] = RewardTags(**{**declared, **spec.tags})
            # Classes (e.g. a reward model) are built once with their kwargs; functions get kwargs per call.
            self.fns[spec.name] = target(**spec.kwargs) if isinstance(target, type) else _bind(target, spec.kwargs)

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> RewardScores:
        per_reward, failures = {}, {}
        for spec in self.specs:
            per_reward[spec.name], failures[spec.name] = self._score_one(spec.name, prompts, completions, columns)
            if failures[spec.name]:
                log.warning("reward %s raised or returned NaN/inf on %d of %d samples; scored 0", spec.name,
                            failures[spec.name], len(prompts))
        return RewardScores(per_reward, {s.name: s.weight for s in self.specs}, failures, self.tags)

    def _score_one(self, name, prompts, completions, columns) -> tuple[list[float | None], int]:
        fn = self.fns[name]
        try:
            values = fn(prompts, completions, **columns)
        except RewardError:
            raise
        except Exception:
            pass
        else:
            return self._finite(name, _checked(name, values, len(prompts)), range(len(prompts)))
        # Find the samples that make it raise, one at a time.
        values, failed = [], 0
        for i in range(len(prompts)):
            row = {k: v[i : i + 1] for k, v in columns.items()}
            try:
                value = fn(prompts[i : i + 1], completions[i : i + 1], **row)
            except RewardError:
                raise
            except Exception as e:
                if self.on_error == "raise":
                    raise RewardError(
                        f"reward {name!r} raised {type(e).__name__}: {e} on sample {i}: "
                        f"prompt={_clip(prompts[i])!r} completion={_clip(completions[i])!r} "
                        "(set rewards_on_error: zero to score such samples 0)"
                    ) from e
                values.append(0.0)
                failed += 1
                continue
            (v,), bad = self._finite(name, _checked(name, value, 1), [i])
            values.append(v)
            failed += bad
        return values, failed

    def _finite(self, name: str, values: list, samples) -> tuple[list[float | None], int]:
        """``values`` with NaN/inf refused (``raise``) or scored 0 and counted as failures (``zero``)."""
        bad = [j for j, v in enumerate(values) if v is not None and not math.isfinite(v)]
        if bad and self.on_error == "raise":
            j = bad[0]
            raise RewardError(f"reward {name!r} returned {values[j]} for sample {samples[j]}; rewards must be finite "
                              "(set rewards_on_error: zero to score such samples 0)")
        for j in bad:
            values[j] = 0.0
        return values, len(bad)


def _bind(fn: Callable, kwargs: dict) -> Callable:
    return (lambda prompts, completions, **cols: fn(prompts, completions, **cols, **kwargs)) if kwargs else fn


def _checked(name: str, values: Any, n: int) -> list[float | None]:
    """A reward's return value as a list of n floats/None: any sequence of numbers (list, tuple, numpy array,
    torch tensor) is accepted; NaN/inf pass through (``RewardSet._finite`` decides)."""
    kind = type(values).__name__
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # numpy arrays, torch tensors
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or len(values) != n:
        got = f"{kind} of length {len(values)}" if hasattr(values, "__len__") else repr(values)
        raise RewardError(f"reward {name!r} must return a list of {n} float|None (or a tuple, array or tensor), "
                          f"got {got}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise RewardError(f"reward {name!r} returned {v!r} for sample {i}; expected float or None") from None
    return out


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."
