"""Full training-state checkpoints, shared by every stage (SFT, GRPO, rejection sampling, ...).

Layout of a checkpoint root (e.g. ``runs/tiny/sft/checkpoints``)::

    latest                  text file holding the name of the newest complete checkpoint
    step-00000040/          one checkpoint, a directory that `from_pretrained` loads directly
        config.json, model.safetensors, generation_config.json   <- model.save_pretrained
        tokenizer.json, tokenizer_config.json, ...               <- tokenizer.save_pretrained
        optimizer.pt        optimizer + LR-scheduler state_dicts
        rng_<rank>.pt       python / numpy / torch CPU / CUDA / named torch.Generator states of each process
        state.json          {"step", "data_state", "extra"}  (plain JSON: inspectable, diffable)
        run_config.yaml     the resolved stage config (`grpo.config.save_config`)

Writes are atomic: everything goes to ``.tmp-step-XXXXXXXX`` and is renamed into place only when
complete, then ``latest`` is replaced (also by rename), then checkpoints beyond ``keep_last`` are removed.
A crash at any point leaves ``latest`` pointing at a complete checkpoint.

Stages resume by default (`resume_point`): ``train.resume_from: latest`` (the default) continues from the
newest complete checkpoint under ``output_dir/checkpoints`` (a fresh start when there is none),
``train.resume_from: none`` starts over and removes that directory's old checkpoints (`start_fresh`, called
once the new run's inputs are loaded), any other value is a checkpoint to continue from. On resume the config
must equal the checkpoint's ``run_config.yaml`` except for the keys in ``RESUME_SAFE`` (step budget, logging,
checkpointing, evaluation); any other difference is refused, naming the keys. `StopOnSignal` turns
SIGINT/SIGTERM into "finish this step, checkpoint, exit 128 + signal"; a second signal exits at once.
``final/`` (`export_model`) and ``DONE`` (`mark_done`) are written to a temporary name and renamed into place.

Multi-process (accelerate / torchrun): every process calls `save_checkpoint` / `load_checkpoint` (each
saves/restores its own RNG state); rank 0 writes the model, tokenizer and bookkeeping files. Optimizer
state: the main process's for a replicated (DDP) optimizer; for a DeepSpeed engine from
`grpo.parallel.parallelize` the weights are gathered into transformers' layout (loadable at any ep_size)
and every rank writes its ZeRO partition (`optimizer_rank<r>.pt`, resumable at the same layout).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from grpo import parallel
from grpo.config import ConfigError, save_config, to_dict

LATEST = "latest"
STEP_PREFIX = "step-"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "run_config.yaml"
DONE_FILE = "DONE"
# config keys a resumed run may change: the step budget, logging, checkpointing, evaluation, where it writes
RESUME_SAFE = ("train.max_steps", "train.epochs", "train.log_every", "train.save_every", "train.keep_last",
               "train.sample_every", "train.samples_logged", "train.resume_from", "eval", "test", "wandb_mode",
               "run_name", "output_dir")  # eval / test: the held-out sets (RL and SFT / the reward model)
FRESH = (None, "none")  # train.resume_from values that start over


@dataclass(kw_only=True)
class TrainState:
    """What `load_checkpoint` hands back besides the objects it restores in place."""

    step: int  # optimizer steps completed when the checkpoint was written
    data_state: dict[str, Any] = field(default_factory=dict)  # e.g. {"epoch": 1, "index": 96}
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific JSON state (counters, ref-model path)
    config: dict[str, Any] | None = None  # the resolved config saved with the checkpoint (plain YAML data)
    path: Path  # the step directory it was read from


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_main() -> bool:
    return _rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_deepspeed(model) -> bool:
    return "deepspeed" in sys.modules and parallel.is_deepspeed(model)


def _unwrap(model, accelerator):
    if accelerator is not None and not _is_deepspeed(model):
        return accelerator.unwrap_model(model)
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    return model


def _rng_state(generators: dict[str, torch.Generator] | None) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint has no RNG state for generator {name!r} (has {sorted(state['generators'])})")
        gen.set_state(state["generators"][name])


def _json_dumps(name: str, value: Any) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"checkpoint {name} must be JSON-serializable (numbers, strings, lists, dicts): {e}") from e


def _save_model_files(directory: Path, model, tokenizer, accelerator) -> None:
    """save_pretrained of the unwrapped model (+ tokenizer). Call on every process; main writes."""
    state_dict = None
    if _is_deepspeed(model):
        state_dict = parallel.full_state_dict(model)  # experts gathered over the EP group; collective
    elif accelerator is not None:
        state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP) weights; collective
    if _is_main():
        _unwrap(model, accelerator).save_pretrained(directory, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by `root/latest`, or None when `root` holds no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a step directory or a checkpoint root (then follow its `latest` pointer)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a step directory containing {STATE_FILE} "
            f"or a checkpoint root containing a '{LATEST}' pointer"
        )
    return found


def save_checkpoint(
    root: str | os.PathLike,
    *,
    model,
    tokenizer,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    data_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    config=None,
    keep_last: int | None = 3,
    accelerator=None,
) -> Path:
    """Write the full training state as `root/step-XXXXXXXX` atomically, point `root/latest` at it and keep
    the newest `keep_last` checkpoints (None keeps all). `config` is a config dataclass (saved as YAML).
    Returns the checkpoint directory."""
    root = Path(root)
    name = f"{STEP_PREFIX}{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    state_json = _json_dumps("state", {"step": step, "data_state": data_state or {}, "extra": extra or {}})
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    _save_model_files(tmp, model, tokenizer, accelerator)
    torch.save(_rng_state(generators), tmp / f"rng_{_rank()}.pt")
    sharded_optimizer = optimizer is not None and _is_deepspeed(model)
    if sharded_optimizer:
        parallel.save_optimizer_state(model, tmp)  # every rank its ZeRO partition: optimizer_rank<r>.pt
    if _is_main():
        torch.save(
            {
                "optimizer": None if optimizer is None or sharded_optimizer else optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
            },
            tmp / OPTIMIZER_FILE,
        )
        if config is not None:
            save_config(config, tmp / CONFIG_FILE)
        (tmp / STATE_FILE).write_text(state_json)  # written last: its presence marks a complete directory
    _barrier()

    if _is_main():
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old copy
            shutil.rmtree(final)
        tmp.rename(final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        pointer_tmp.replace(root / LATEST)
        if keep_last is not None:
            for old in checkpoint_dirs(root)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model=None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    accelerator=None,
) -> TrainState:
    """Restore in place whatever is passed (model weights, optimizer, scheduler, RNG states, named
    generators) from a step directory or a checkpoint root (follows `latest`), and return the bookkeeping.

    Model weights are read with `from_pretrained` of the model's own class (so any on-disk format
    conversion transformers applies is undone exactly) and copied into `model`, keeping the optimizer's
    parameter references valid."""
    path = resolve_checkpoint(path)
    deepspeed = model is not None and _is_deepspeed(model)
    if model is not None:
        target = _unwrap(model, accelerator)
        loaded = type(target).from_pretrained(path, dtype=next(target.parameters()).dtype).state_dict()
        if deepspeed:
            parallel.load_full_state_dict(model, loaded)  # each rank keeps its experts; refreshes fp32 masters
        else:
            target.load_state_dict(loaded)
        del loaded
    if optimizer is not None and deepspeed:
        parallel.load_optimizer_state(model, path)
        optimizer = None
    if optimizer is not None or scheduler is not None:
        saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
            if obj is not None:
                if saved[key] is None:
                    raise KeyError(f"checkpoint {path} was saved without a {key} state")
                obj.load_state_dict(saved[key])
    if restore_rng:
        rng_file = path / f"rng_{_rank()}.pt"
        if not rng_file.is_file():  # resumed with more processes than saved: reuse rank 0's streams
            rng_file = path / "rng_0.pt"
        _set_rng_state(torch.load(rng_file, weights_only=True), generators)
    state = json.loads((path / STATE_FILE).read_text())
    config_file = path / CONFIG_FILE
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    return TrainState(
        step=state["step"], data_state=state["data_state"], extra=state["extra"], config=config, path=path
    )


def export_model(directory: str | os.PathLike, model, tokenizer, config=None, *, accelerator=None) -> Path:
    """Write the final model (save_pretrained + tokenizer + resolved config) atomically to `directory`:
    loadable by `AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and by
    `load_policy(ModelConfig(init=directory), tokenizer)`."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _save_model_files(tmp, model, tokenizer, accelerator)
    if _is_main():
        if config is not None:
            save_config(config, tmp / CONFIG_FILE)
        old = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():  # the previous export stays whole until the new one is complete
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return directory


def mark_done(output_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write `output_dir/DONE` (JSON `info`, e.g. final metrics) so a pipeline can skip the finished stage."""
    marker = Path(output_dir) / DONE_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, _json_dumps("DONE info", info or {}))
    return marker


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file renamed into place (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def publish(tmp_dir: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Move every file of `tmp_dir` into `directory` by rename (each appears whole), then remove `tmp_dir`."""
    tmp_dir, directory = Path(tmp_dir), Path(directory)
    for f in sorted(tmp_dir.iterdir(), key=lambda f: f.suffix != ".jsonl"):  # row files before their summary
        f.replace(directory / f.name)
    tmp_dir.rmdir()


# ---- resuming a stage ----------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_differences(saved: dict, cfg, safe: tuple[str, ...] = RESUME_SAFE) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's saved config and `cfg` (a config dataclass),
    ignoring `safe` keys and everything under them."""
    now = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    a, b = _flatten(saved), _flatten(now)
    ignored = lambda key: any(key == s or key.startswith(s + ".") for s in safe)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))


def resume_point(output_dir: str | os.PathLike, resume_from: str | None, cfg=None) -> Path | None:
    """The checkpoint a stage continues from, or None for a fresh start: `resume_from` "latest" -> the newest
    complete checkpoint under output_dir/checkpoints (None when there is none); None / "none" -> None; else
    that checkpoint (a step directory or a checkpoint root). With `cfg`, a config that differs from the
    checkpoint's run_config.yaml outside RESUME_SAFE is refused. A missing or incomplete checkpoint and a
    refused config raise ``ConfigError`` (key ``train.resume_from``): stages call this before loading the policy."""
    if resume_from in FRESH:
        return None
    try:
        path = latest_checkpoint(Path(output_dir) / "checkpoints") if resume_from == "latest" \
            else resolve_checkpoint(resume_from)
    except FileNotFoundError as e:
        raise ConfigError("train.resume_from", str(e)) from None
    if path is None or cfg is None or not (path / CONFIG_FILE).is_file():
        return path
    differ = config_differences(yaml.safe_load((path / CONFIG_FILE).read_text()), cfg)
    if differ:
        raise ConfigError("train.resume_from", f"{path} was trained with other values of {', '.join(differ)}; "
                          "resume with the same values, or start over with train.resume_from=none (removes the "
                          "old checkpoints) or another output_dir")
    return path


def start_fresh(output_dir: str | os.PathLike, resume_from: str | None) -> bool:
    """With train.resume_from=none, remove the checkpoints an earlier run left in output_dir (main process;
    call once the new run's inputs are loaded). True when something was removed."""
    root = Path(output_dir) / "checkpoints"
    if resume_from not in FRESH or not root.is_dir() or not _is_main():
        return False
    shutil.rmtree(root)
    print(f"train.resume_from=none: removed the earlier run's checkpoints in {root}", flush=True)
    return True


class StopOnSignal:
    """``with StopOnSignal() as stop:`` around a training loop. The first SIGINT/SIGTERM only sets
    ``stop.signum``: the loop finishes its current step, saves a checkpoint and calls ``stop.exit``
    (exit status 128 + signal: 130 for SIGINT, 143 for SIGTERM). A second signal exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"{name} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"{name}: finishing the current step, then saving a checkpoint and exiting "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def requested(self, accelerator=None) -> bool:
        """Whether to stop after this step; with several processes, whether any of them was signalled."""
        flag = self.signum is not None
        if accelerator is not None and accelerator.num_processes > 1:
            t = torch.tensor([float(self.signum or 0)], device=accelerator.device)
            value = int(accelerator.reduce(t, reduction="sum").item())
            if value and self.signum is None:
                self.signum = signal.SIGTERM
            flag = value > 0
        return flag

    def exit(self, step: int, path: str | os.PathLike) -> None:
        """Raise SystemExit(128 + signal) after saying where the run stopped."""
        signum = self.signum or signal.SIGTERM
        print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path}; "
              f"run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


def is_done(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / DONE_FILE).is_file()
