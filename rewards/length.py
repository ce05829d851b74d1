"""Length-shaping rewards: DAPO soft overlong punishment, cosine length scaling, n-gram repetition penalty.

Length contract: completion lengths are token counts passed by the trainer as the column
``completion_lengths: list[int]`` (the rollout's ``lengths``). The rewards that need them raise a ValueError
naming that column when it is missing; they never re-tokenize.

overlong_penalty (DAPO, Yu et al. 2025, eq. 13), with L = |y| in tokens, L_max = ``max_len``, L_cache = ``cache_len``::

    R(y) = 0                                  if L <= L_max - L_cache
           ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
           -1                                 if L > L_max

cosine_length (Yeo et al. 2025, "Demystifying Long CoT", eq. 1), with t = L, T = ``max_len``::

    CosFn(t, T, eta_min, eta_max) = eta_min + 1/2 (eta_max - eta_min) (1 + cos(pi t / T))
    R(y) = CosFn(t, T, r_L^c, r_0^c)  if correct        (short correct answers earn most)
           CosFn(t, T, r_L^w, r_0^w)  if wrong          (short wrong answers are punished most)
           r_e                        if t >= T          (hit the generation budget: exceeded / truncated)

Correctness comes from ``rewards.math.correctness`` on the ``answer`` column; rows without a gold answer
get None. Defaults are the paper's: r_0^c = 2, r_L^c = 1, r_0^w = -10, r_L^w = 0, r_e = -10.

repetition_penalty (as in Yeo et al. / open-r1): over the n-grams of the completion's tokens (whitespace
words, and single CJK characters, lower-cased), with n = ``ngram_size``::

    R(y) = max_penalty * (1 - #distinct n-grams / #n-grams)      (0 when there are fewer than n tokens)

so a completion without repeats scores 0 and one repeating a single n-gram tends to ``max_penalty`` (<= 0).
"""
from __future__ import annotations

import math
import re

from rewards.math import DEFAULT_TIMEOUT, correctness


def _lengths(completion_lengths: list[int] | None, n: int, reward: str) -> list[int]:
    if completion_lengths is None:
        raise ValueError(f"{reward} needs the column 'completion_lengths' (token count per completion, "
                         "passed by the trainer from the rollout's lengths)")
    if len(completion_lengths) != n:
        raise ValueError(f"{reward}: 'completion_lengths' has {len(completion_lengths)} values for {n} completions")
    return [int(x) for x in completion_lengths]


def overlong_penalty(prompts: list[str], completions: list[str], completion_lengths: list[int] | None = None,
                     max_len: int = 1024, cache_len: int = 256, **_) -> list[float]:
    """DAPO soft overlong punishment per completion (formula in the module docstring)."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    safe = max_len - cache_len
    out = []
    for length in _lengths(completion_lengths, len(completions), "overlong_penalty"):
        out.append(0.0 if length <= safe else (safe - length) / cache_len if length <= max_len else -1.0)
    return out


def cosine_scale(t: float, total: float, eta_min: float, eta_max: float) -> float:
    """CosFn: eta_max at t = 0, falling along a half cosine to eta_min at t = total."""
    return eta_min + 0.5 * (eta_max - eta_min) * (1.0 + math.cos(math.pi * t / total))


def cosine_length(prompts: list[str], completions: list[str], answer: list[str | None] | None = None,
                  completion_lengths: list[int] | None = None, max_len: int = 1024, correct_short: float = 2.0,
                  correct_long: float = 1.0, wrong_short: float = -10.0, wrong_long: float = 0.0,
                  exceed: float = -10.0, timeout: float = DEFAULT_TIMEOUT, **_) -> list[float | None]:
    """Correctness reward scaled by length along a cosine (formula in the module docstring)."""
    if max_len <= 0:
        raise ValueError(f"cosine_length: max_len must be > 0, got {max_len}")
    if answer is None:
        raise ValueError("cosine_length needs the column 'answer' (gold answers) to judge correctness")
    lengths = _lengths(completion_lengths, len(completions), "cosine_length")
    out: list[float | None] = []
    for ok, t in zip(correctness(completions, answer, timeout), lengths):
        if ok is None:
            out.append(None)
        elif t >= max_len:
            out.append(exceed)
        else:
            out.append(cosine_scale(t, max_len, correct_long, correct_short) if ok
                       else cosine_scale(t, max_len, wrong_long, wrong_short))
    return out


_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+")


def repetition_penalty(prompts: list[str], completions: list[str], ngram_size: int = 3, max_penalty: float = -1.0,
                       **_) -> list[float]:
    """N-gram repetition penalty in [max_penalty, 0] per completion (formula in the module docstring)."""
    if ngram_size < 1:
        raise ValueError(f"repetition_penalty: ngram_size must be >= 1, got {ngram_size}")
    if max_penalty > 0:
        raise ValueError(f"repetition_penalty: max_penalty must be <= 0, got {max_penalty}")
    out = []
    for completion in completions:
        tokens = _TOKEN.findall(completion.lower())
        grams = [tuple(tokens[i : i + ngram_size]) for i in range(len(tokens) - ngram_size + 1)]
        out.append(max_penalty * (1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out
