"""Chat formatting shared by every stage: SFT examples with an assistant-token mask, and generation prompts.

``encode_chat`` returns ``(input_ids, assistant_mask)`` where ``assistant_mask[t] == 1`` exactly on the
tokens of assistant message contents plus the end-of-turn token that closes each of them, and 0 on the
bos token, role markers, and system/user turns. Two ways to find those tokens:

1. the template marks them with ``{% generation %} ... {% endgeneration %}`` (ours does): transformers'
   ``apply_chat_template(..., return_assistant_tokens_mask=True)`` maps the marked characters to tokens;
2. otherwise (any other HF chat template) incremental prefix rendering: assistant message ``i`` spans the
   characters between ``render(messages[:i], add_generation_prompt=True)`` and
   ``render(messages[:i + 1])`` with trailing whitespace removed (so ``<|im_end|>`` is in, the newline
   after it is not); tokens overlapping those spans get 1. This needs every prefix rendering to be a
   prefix of the full rendering; templates that rewrite earlier turns (e.g. drop old reasoning) raise.
"""
from __future__ import annotations

import re
from pathlib import Path

from grpo.config import ConfigError

R1_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first works through the reasoning step by step in its mind, then gives the User the answer. "
    "The reasoning goes inside <think> </think> tags and the answer follows them, i.e. "
    "<think> reasoning here </think> answer here. A math answer is written inside \\boxed{}."
)
"""System prompt with the meaning of DeepSeek-R1's training template (our wording; the answer is marked by
``\\boxed{}`` instead of ``<answer>`` tags). Pass it as ``system=R1_TEMPLATE``; the built-in demo data uses no
system prompt, so keep it off there to match what SFT saw."""

SYSTEM_FILE = "file:"


def resolve_system_prompt(value: str, key: str = "system_prompt") -> str | None:
    """The system turn a recipe's ``system_prompt`` stands for: ``none`` -> no system turn, ``r1`` ->
    ``R1_TEMPLATE``, ``file:<path>`` -> the text of that UTF-8 file (leading/trailing whitespace removed; the
    path is relative to the working directory), anything else -> that string itself. A missing, unreadable,
    empty or non-UTF-8 file, or an empty string, is a one-line ``ConfigError`` at ``key``."""
    if value == "none":
        return None
    if value == "r1":
        return R1_TEMPLATE
    if not value.startswith(SYSTEM_FILE):
        if not value.strip():
            raise ConfigError(key, "must be none, r1, file:<path> or the prompt text itself; got an empty string")
        return value
    path = Path(value[len(SYSTEM_FILE):])
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(key, f"no such system prompt file: {path} (file:<path>, relative to the working "
                               "directory)") from None
    except OSError as e:
        raise ConfigError(key, f"system prompt file {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"system prompt file {path} is not UTF-8 text (byte {e.start + 1} is "
                               f"0x{e.object[e.start]:02x})") from None
    if not text:
        raise ConfigError(key, f"system prompt file {path} is empty")
    return text


THINK_PREFILL = "<think>\n"
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def _template(tokenizer) -> str:
    template = tokenizer.get_chat_template() if tokenizer.chat_template else None
    if not template:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "use the one built by `python -m data.tokenizer` or set tokenizer.chat_template")
    return template


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("messages is empty; expected a list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"message {i} is an empty assistant turn; assistant content must be non-empty text")


def _encode_by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the first message is an assistant turn; without {% generation %} tags in the chat "
                             "template its tokens cannot be told apart from the template header")
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(f"the chat template renders message {i} differently once later messages follow, so "
                             "the assistant mask cannot be found by prefix rendering; add {% generation %} tags")
        spans.append((len(before), len(upto.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(b < end and e > start for start, end in spans)) for b, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def encode_chat(tokenizer, messages: list[dict], max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted conversation and the assistant mask, equal lengths (the first
    ``max_len`` tokens when given). See the module docstring for what the mask covers."""
    _check_messages(messages)
    if _GENERATION_TAG.search(_template(tokenizer)):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _encode_by_prefixes(tokenizer, messages)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_prompt(tokenizer, prompt: str, system: str | None = None, think: bool = False) -> str:
    """The chat-formatted generation prompt for one user turn, ending with the assistant opener (and
    ``<think>\\n`` when ``think``, to force the reasoning block). Tokenize it with
    ``add_special_tokens=False`` (the template already holds bos), or use ``encode_prompt``."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    _check_messages(messages)
    _template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + THINK_PREFILL if think else text


def encode_prompt(tokenizer, prompt: str, system: str | None = None, think: bool = False) -> list[int]:
    """Token ids of ``render_prompt(...)``, without any extra special tokens."""
    return list(tokenizer(render_prompt(tokenizer, prompt, system, think), add_special_tokens=False)["input_ids"])
