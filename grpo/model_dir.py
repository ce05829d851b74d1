"""Checks of a local model dir before transformers reads it, with one-line errors that say what is wrong.

transformers' own errors for a missing or half-written dir point elsewhere: ``Repo id must be in the form
'repo_name'`` for a missing local path, ``Should have a model_type key`` for a config.json without one,
``need sentencepiece or tiktoken`` for a missing tokenizer.json, ``SafetensorError: incomplete metadata`` for
truncated weights. ``check_model_dir`` / ``check_tokenizer_dir`` raise ``ModelDirError`` (a ``ConfigError``
keyed by the config field that named the dir) naming the dir, what is missing or corrupt, and how such a dir
is normally produced. Only names that look like local paths are checked (``is_local``): a hub id such as
``org/name`` that does not exist locally is left to transformers.

The weights check is cheap: it reads each safetensors file's 8-byte header length and JSON header and
compares the tensor data length the header promises with the file size (truncation), loading no tensor.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from grpo.config import ConfigError

PRODUCED_BY = ("a model dir is written by stages.sft / stages.rl_reasoning / stages.rl_general / "
               "stages.reward_model as <output_dir>/final, or by grpo.checkpoint as "
               "<output_dir>/checkpoints/step-XXXXXXXX (save_pretrained + the tokenizer)")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER = 100_000_000  # the safetensors format's limit on the JSON header
# Vocab files a tokenizer without tokenizer.json can be built from (any one set suffices).
VOCAB_FILES = (("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("spiece.model",),
               ("sentencepiece.bpe.model",), ("tokenizer.tiktoken",))


class ModelDirError(ConfigError):
    """A local model dir that is missing, incomplete or corrupt (one line: key, dir, problem, how it is made)."""

    def __init__(self, key: str, directory: str | os.PathLike, problem: str):
        self.directory, self.problem = str(directory), problem
        message = f"model dir {str(directory)!r}: {problem}; {PRODUCED_BY}"
        super().__init__(key, " ".join(message.split()))  # one line whatever the problem text holds


def is_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` means a local dir rather than a hub id: it exists, starts with '.', '/' or '~', or
    has a path separator a hub id cannot have (a backslash, or more than one '/'; ``org/name`` is a hub id)."""
    text = os.fspath(name)
    if not text:
        return False
    if isinstance(name, Path) or os.path.exists(os.path.expanduser(text)) or text[0] in "./~":
        return True
    return "\\" in text or text.count("/") > 1


def _read_json(key: str, directory: Path, path: Path, what: str):
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(key, directory, f"{path.name} ({what}) is not readable JSON ({type(e).__name__}: {e})") \
            from None


def check_safetensors(key: str, directory: Path, path: Path) -> None:
    """The safetensors file ``path`` has a readable header and all the tensor data that header promises."""
    name = path.relative_to(directory) if path.is_relative_to(directory) else path
    if not path.is_file():
        raise ModelDirError(key, directory, f"weights file {name} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelDirError(key, directory, f"weights file {name} is truncated ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise ModelDirError(key, directory, f"weights file {name} is corrupt (header length {length} bytes)")
        if 8 + length > size:
            raise ModelDirError(key, directory, f"weights file {name} is truncated: its header needs {8 + length} "
                                f"bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelDirError(key, directory, f"weights file {name} is corrupt: its header is not JSON ({e})") \
                from None
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):
        raise ModelDirError(key, directory, f"weights file {name} is corrupt: its header is not a safetensors "
                            "header (tensor name -> dtype, shape, data_offsets)") from None
    promised = 8 + length + end
    if size < promised:
        raise ModelDirError(key, directory, f"weights file {name} is truncated: its header promises {promised} bytes, "
                            f"the file has {size}")
    if size > promised:
        raise ModelDirError(key, directory, f"weights file {name} is corrupt: {size - promised} bytes after the "
                            f"tensor data its header describes ({promised} bytes)")


def _shards(key: str, directory: Path, index: str) -> list[Path]:
    weight_map = _read_json(key, directory, directory / index, "weights index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirError(key, directory, f"{index} has no weight_map (tensor name -> shard file)")
    shards = [directory / s for s in sorted(set(map(str, weight_map.values())))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ModelDirError(key, directory, f"{len(missing)} of the {len(shards)} shards listed in {index} are "
                            f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return shards


def check_weights(directory: str | os.PathLike, key: str = "init") -> None:
    """model.safetensors, or model.safetensors.index.json and its shards (every header readable, no file
    truncated); else pytorch_model.bin, or its index and shards (present and non-empty)."""
    directory = Path(directory).expanduser()
    if (directory / SAFETENSORS).exists():
        check_safetensors(key, directory, directory / SAFETENSORS)
    elif (directory / SAFETENSORS_INDEX).exists():
        for shard in _shards(key, directory, SAFETENSORS_INDEX):
            check_safetensors(key, directory, shard)
    elif (directory / TORCH_BIN).exists() or (directory / TORCH_BIN_INDEX).exists():
        files = [directory / TORCH_BIN] if (directory / TORCH_BIN).exists() else _shards(key, directory, TORCH_BIN_INDEX)
        for path in files:
            if not path.is_file() or path.stat().st_size == 0:
                raise ModelDirError(key, directory, f"weights file {path.name} is empty or not a file")
    else:
        raise ModelDirError(key, directory, f"weights are missing (no {SAFETENSORS}, {SAFETENSORS_INDEX} + "
                            f"its shards, or {TORCH_BIN})")


def check_config(directory: str | os.PathLike, key: str = "init") -> dict:
    """config.json exists and is a JSON object with a model_type; returns it."""
    directory = Path(directory).expanduser()
    path = directory / "config.json"
    if not path.is_file():
        raise ModelDirError(key, directory, "config.json is missing")
    config = _read_json(key, directory, path, "the model config")
    if not isinstance(config, dict):
        raise ModelDirError(key, directory, f"config.json is not a JSON object (got {type(config).__name__})")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelDirError(key, directory, "config.json has no model_type (e.g. \"deepseek_v3\")")
    return config


def _check_exists(directory: Path, key: str) -> None:
    if not directory.exists():
        raise ModelDirError(key, directory, "does not exist")
    if not directory.is_dir():
        raise ModelDirError(key, directory, "is not a directory")


def check_model_dir(name: str | os.PathLike, key: str = "init") -> bool:
    """Check the local model dir ``name`` (exists, config.json with model_type, complete weights) before
    ``from_pretrained``; ``key`` is the config field that named it (for the error). Returns False, checking
    nothing, for a name that is not a local path (a hub id, ``is_local``), True after a passed check."""
    if not is_local(name):
        return False
    directory = Path(name).expanduser()
    _check_exists(directory, key)
    check_config(directory, key)
    check_weights(directory, key)
    return True


def check_tokenizer_dir(name: str | os.PathLike, key: str = "tokenizer") -> bool:
    """Check the local dir ``name`` a tokenizer is loaded from (``AutoTokenizer.from_pretrained``): tokenizer.json
    (readable JSON), or tokenizer_config.json with vocab files (``VOCAB_FILES``). False for a hub id, as above."""
    if not is_local(name):
        return False
    directory = Path(name).expanduser()
    _check_exists(directory, key)
    if (directory / "tokenizer.json").exists():
        _read_json(key, directory, directory / "tokenizer.json", "the tokenizer")
        return True
    if not (directory / "tokenizer_config.json").is_file():
        raise ModelDirError(key, directory, "tokenizer files are missing (tokenizer.json, or tokenizer_config.json "
                            "with vocab files)")
    _read_json(key, directory, directory / "tokenizer_config.json", "the tokenizer config")
    if not any(all((directory / f).is_file() for f in files) for files in VOCAB_FILES):
        raise ModelDirError(key, directory, "tokenizer.json is missing and tokenizer_config.json has no vocab files "
                            f"beside it ({', '.join(' + '.join(files) for files in VOCAB_FILES)})")
    return True


def load_tokenizer(name: str | os.PathLike, key: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained(name)`` after ``check_tokenizer_dir`` (a one-line error for a broken dir)."""
    from transformers import AutoTokenizer

    check_tokenizer_dir(name, key)
    return AutoTokenizer.from_pretrained(name)
