"""Expert parallelism (EP) for the DeepSeek-V3 policy: DeepSpeed AutoEP + ZeRO-1/2, V3-exact routing,
gathered checkpoints, and the process-group plumbing of multi-process training.

Layout on W ranks with ``ep_size = e`` (W % e == 0, n_routed_experts % e == 0), DeepSpeed's groups:

    routed experts of each MoE layer   EP group = e consecutive ranks; EP rank r holds experts
                                       [r E/e, (r+1) E/e); the W/e ranks holding the same experts form
                                       an expert-data-parallel (EDP) group
    everything else                    (embeddings, MLA, dense MLPs, shared experts, routers, norms,
                                       head, MTP) replicated on all W ranks: plain data parallel
    gradients                          dense: mean over the W ranks; experts: their gradient already holds
                                       the contributions of the e ranks of the EP group (the all-to-all's
                                       backward), then DeepSpeed reduces it over the EDP group, with the
                                       same 1/W factor, so both equal the gradient of the mean loss
    ZeRO-1/2                           optimizer state (stage 2: also gradients) of the dense parameters is
                                       partitioned over the W ranks, of the expert parameters over their
                                       EDP group (DeepSpeed's MoE parameter groups)

Token dispatch (DeepSpeed's ``AutoEPMoELayer``): each rank routes its own tokens, sends each (token, expert)
pair to the expert's owner with an all-to-all of variable split sizes (no capacity factor: no token is ever
dropped), runs its local experts, returns the outputs with a second all-to-all, weights them after the
experts and sums over the K choices, then adds the shared experts.

Routing: exactly the policy's (``grpo.moe.route``): s = sigmoid(x W_g^T) in fp32, selection on s + b
(correction bias, selection only), group-limited top-k (groups scored by their top-2 sum), weights
scale * s / sum_K s. DeepSpeed's own router (``TokenChoiceTopKRouter``) implements the same selection
rule and carries a copy of b, but it computes the gate logits in the activation dtype (bf16 under bf16
training; V3 gates in fp32), never updates b (its expert-bias balancing, ``load_balance_coeff``, is
refused for the deepseek_v3 preset), and exposes neither the per-token scores that the sequence-wise
balance loss needs nor routing replay. ``parallelize`` therefore swaps it for the policy's router
(``grpo.model.PolicyRouter``, or transformers' ``DeepseekV3TopkRouter``), registered under its
transformers name ``mlp.gate`` and reading the gate weight that DeepSpeed's optimizer updates. The
policy's load counts, balance loss, MTP, routing replay and ``update_router_bias`` then work unchanged;
``update_router_bias`` sums loads over all W ranks (each rank routes its own tokens), so the bias update
equals the single-process update on the global batch.

Checkpoints: ``full_state_dict`` gathers the experts over each EP group and restores transformers' names
(``experts.gate_up_proj`` [E, 2I, d], ``experts.down_proj`` [E, d, I]), so a checkpoint saved at any
``ep_size`` loads at any other, and with ``from_pretrained``; ``load_full_state_dict`` takes each rank's
experts back out of such a state dict. Optimizer state stays per rank (``save_optimizer_state``), valid for
the same world size and ``ep_size``.

Failure handling: the process group is created with the recipe's ``timeout_s``, and ``parallelize`` gives
DeepSpeed's EP/EDP groups the same (DeepSpeed creates them with torch's 30-minute default); a rank that dies
or hangs makes its peers' collectives fail after at most that long (gloo raises; NCCL's watchdog aborts with
``TORCH_NCCL_ASYNC_ERROR_HANDLING``), and the launcher then ends the job.

Departure from the single-process policy under bf16: DeepSpeed keeps every trained parameter in the training
dtype (fp32 masters in the optimizer), so the gate weight is stored in bf16, where transformers keeps
``gate.weight`` in fp32; the gate logits are still computed in fp32 from it, and the correction bias stays fp32.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from grpo.config import ConfigError

@dataclass(kw_only=True)
class ParallelConfig:
    """Multi-process layout. Field names are ``parallelize``'s keywords: ``parallelize(model, optim, **asdict(cfg))``."""

    ep_size: int = 1  # ranks that share one copy of the routed experts; 1 = no expert parallelism
    zero_stage: Optional[Literal[0, 1, 2]] = None  # ZeRO stage; None: the JSON's, else 1
    deepspeed_config: Optional[str] = None  # base JSON (recipes/deepspeed/*.json): the knobs the recipe leaves alone
    timeout_s: float = 600.0  # process-group timeout: a dead or hung rank ends the job after at most this

    def __post_init__(self):
        if self.ep_size < 1:
            raise ConfigError("ep_size", f"must be >= 1, got {self.ep_size}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError("deepspeed_config", f"no such file: {self.deepspeed_config} (see recipes/deepspeed/)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, timeout_s: float = 600.0, backend: str | None = None) -> None:
    """Create the default process group (env:// as set by torchrun / ``accelerate launch``) with ``timeout_s``.

    No-op when one exists (e.g. created by ``make_accelerator``, which sets the same timeout). A single
    process without launcher variables gets a one-rank group, which DeepSpeed needs. nccl with CUDA, else gloo."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL errors/timeouts abort the process
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def make_accelerator(timeout_s: float = 600.0, **kwargs):
    """The stages' ``accelerate.Accelerator``: CPU processes (gloo) when no GPU is visible, and the recipe's
    process-group timeout. Under ``accelerate launch`` (torchrun-style launcher) every process gets one.
    With ``parallelize`` (ep_size > 1) do not ``prepare`` the model or optimizer with it."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[handler], **kwargs)


def _set(config: dict, dotted: str, value: Any) -> None:
    """config[dotted] = value, unless the base JSON holds a different concrete value (then a ConfigError)."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise ConfigError(f"deepspeed_config: {dotted}", f"the recipe sets it ({value!r}), the JSON says "
                          f"{current!r}: use \"auto\" or the same value")
    node[leaf] = value


def build_deepspeed_config(optimizer: dict[str, Any], *, ep_size: int, zero_stage: int | None,
                           deepspeed_config: str | None = None, bf16: bool = False, grouped_mm: bool = False) -> dict:
    """The DeepSpeed config dict: the base JSON (may be None) with the recipe's values filled in. The recipe owns
    batch bookkeeping, gradient accumulation, clipping, the optimizer, bf16, the ZeRO stage and the expert-parallel
    size; the JSON may leave them "auto" or repeat the same value.

    optimizer: {lr (required), betas, eps, weight_decay, max_grad_norm (0 = no clipping)}. Gradient accumulation
    is the trainer's: ``managed_gradient_accumulation`` is off, the trainer scales each micro-batch loss itself,
    calls ``engine.backward(loss, scale_wrt_gas=False)`` per micro-batch and ``engine.step()`` once per optimizer
    step (reduce, clip, AdamW, zero grads)."""
    if "lr" not in optimizer:
        raise ConfigError("optimizer", f"needs a learning rate 'lr', got {optimizer!r}")
    config = json.loads(Path(deepspeed_config).read_text()) if deepspeed_config else {}
    adamw = dict(lr=float(optimizer["lr"]), betas=[float(b) for b in optimizer.get("betas", (0.9, 0.999))],
                 eps=float(optimizer.get("eps", 1e-8)), weight_decay=float(optimizer.get("weight_decay", 0.0)),
                 torch_adam=True)  # torch's AdamW (foreach on CUDA): FusedAdam would need a CUDA toolkit to build
    _set(config, "train_micro_batch_size_per_gpu", 1)
    _set(config, "gradient_accumulation_steps", 1)
    _set(config, "managed_gradient_accumulation", False)
    _set(config, "gradient_clipping", float(optimizer.get("max_grad_norm", 0.0)))  # DeepSpeed's default is 1.0
    _set(config, "optimizer", {"type": "AdamW", "params": adamw})
    _set(config, "bf16.enabled", bf16)
    if zero_stage is not None or config.get("zero_optimization", {}).get("stage", "auto") == "auto":
        _set(config, "zero_optimization.stage", 1 if zero_stage is None else zero_stage)
    _set(config, "expert_parallel.enabled", ep_size > 1)
    if ep_size > 1:
        _set(config, "expert_parallel.autoep_size", ep_size)
        _set(config, "expert_parallel.preset_model", "deepseek_v3")
        config["expert_parallel"].setdefault("use_grouped_mm", grouped_mm)
        config["expert_parallel"].setdefault("load_balance_coeff", None)
    else:
        config.pop("expert_parallel")
    return config


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _autoep_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: AutoEPMoELayer} of a (wrapped) model."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, AutoEPMoELayer)}


class _RouterAdapter(nn.Module):
    """DeepSpeed's router contract served by a transformers-style V3 router.

    ``forward(x [T, d], expert_bias) -> (weights [T, K] fp32, indices [T, K], tokens per expert [E] int32)``
    from ``gate(x) -> (logits, weights, indices)``. The gate is registered once, as the layer's ``gate``
    (transformers' name); this module holds a plain reference and owns no parameters. ``expert_bias`` (DeepSpeed's
    own balancing) is always None: DeepSpeed refuses ``load_balance_coeff`` for the deepseek_v3 preset."""

    score_func = "sigmoid"

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.__dict__["gate_ref"] = gate

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
        from deepspeed.moe.ep_count import count_tokens_per_expert

        gate = self.gate_ref
        _, weights, indices = gate(x)
        return weights, indices, count_tokens_per_expert(indices, gate.num_experts)


def _adopt_routers(model: nn.Module, routers: dict[str, nn.Module]) -> None:
    """Swap each AutoEP layer's router for the model's own (``routers``: module path -> original ``mlp.gate``)."""
    for name, layer in _autoep_layers(model).items():
        gate = routers.pop(name)
        ds_router = layer.router
        gate.weight = ds_router.gate.weight  # the parameter DeepSpeed's optimizer owns (ZeRO flat buffer view)
        bias = gate.e_score_correction_bias  # fp32 on the model's device, whatever the training dtype
        bias.data = bias.data.to(device=gate.weight.device, dtype=torch.float32)
        layer.router = _RouterAdapter(gate)
        layer.gate = gate
    if routers:
        raise RuntimeError(f"AutoEP did not replace the MoE blocks {sorted(routers)}: they would run unsharded")


def parallelize(model: nn.Module, optimizer: dict[str, Any], *, ep_size: int, zero_stage: int | None = None,
                deepspeed_config: str | None = None, timeout_s: float = 600.0):
    """Wrap ``model`` in a DeepSpeed engine: ZeRO ``zero_stage`` (None: the JSON's, else 1), routed experts
    sharded over ``ep_size`` ranks. ``optimizer``: AdamW settings (``build_deepspeed_config``).

    Returns ``(engine, optimizer)``. Train with ``engine(...)`` as the model, ``engine.backward(loss,
    scale_wrt_gas=False)`` per micro-batch, ``engine.step()`` per optimizer step, then
    ``grpo.model.update_router_bias(engine)``. Every rank calls this, with the same model (same seed or
    same checkpoint: rank 0's weights are broadcast). bf16 training when the model's parameters are bf16
    (fp32 master weights in the optimizer). AdamW decays matrices only (not norms, biases), as the stages do."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise ImportError(f"parallel.ep_size > 1 / parallel.zero_stage need DeepSpeed ({e}): "
                          "pip install --no-build-isolation -r requirements-deepspeed.txt") from None

    init_distributed(timeout_s=timeout_s)
    world = dist.get_world_size()
    config = getattr(model, "config", None)
    n_experts = getattr(config, "n_routed_experts", None)
    if ep_size > 1:
        if getattr(config, "model_type", None) != "deepseek_v3":
            raise ConfigError("ep_size", f"expert parallelism needs a DeepSeek-V3 model, got model_type="
                              f"{getattr(config, 'model_type', None)!r}; use ep_size=1")
        if world % ep_size or n_experts % ep_size:
            raise ConfigError("ep_size", f"must divide the number of processes ({world}) and of routed experts "
                              f"({n_experts}), got {ep_size}")
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for its CPU backend (~1 min of C++ the first time);
        # only its inference all-reduce uses it, training collectives go through torch.distributed (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    ds_config = build_deepspeed_config(optimizer, ep_size=ep_size, zero_stage=zero_stage,
                                       deepspeed_config=deepspeed_config, bf16=bf16,
                                       grouped_mm=torch.cuda.is_available() and bf16)
    routers = {name: m.gate for name, m in model.named_modules()
               if hasattr(m, "experts") and hasattr(getattr(m, "gate", None), "e_score_correction_bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "decay", "params": [p for p in params if p.ndim >= 2]},  # matrices only, like the stages
              {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    # DeepSpeed creates its expert (EP) and expert-data-parallel groups with torch's default timeout (30 min for
    # gloo, 10 for NCCL): give every group this rank belongs to the recipe's.
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)
    if ep_size > 1:
        _adopt_routers(engine, routers)
    return engine, zero_optimizer


def is_deepspeed(model: Any) -> bool:
    """True for a DeepSpeed engine (what ``parallelize`` returns)."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return isinstance(model, DeepSpeedEngine)


def _expert_slices(layer: nn.Module) -> tuple[int, int]:
    start = layer.ep_rank * layer.num_local_experts
    return start, start + layer.num_local_experts


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in transformers' layout, experts gathered, on every rank (CPU tensors).

    Collective: every rank must call it. Keys and shapes are those of the unsharded model, so
    ``save_pretrained(dir, state_dict=...)`` writes a checkpoint that loads at any ``ep_size``."""
    module = _unwrap(model)
    state = {k: v.detach() for k, v in module.state_dict().items()}
    for name, layer in _autoep_layers(module).items():
        prefix = f"{name}.experts."
        full = {}
        for w in ("w1", "w2", "w3"):
            local = state.pop(prefix + w).contiguous()
            if layer.ep_size > 1:
                gathered = local.new_empty((layer.ep_size * local.shape[0], *local.shape[1:]))
                dist.all_gather_into_tensor(gathered, local, group=layer.ep_group)
                local = gathered
            full[w] = local
        state[prefix + "gate_up_proj"] = torch.cat([full["w1"], full["w3"]], dim=1)  # [E, 2I, d]: gate then up
        state[prefix + "down_proj"] = full["w2"]  # [E, d, I]
    return {k: v.to("cpu", copy=True) for k, v in state.items()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a transformers-layout state dict (any ``ep_size`` it was saved at) into a ``parallelize``d model;
    each rank keeps its own experts. Refreshes DeepSpeed's fp32 master weights from the loaded values."""
    module = _unwrap(model)
    layers = _autoep_layers(module)
    source = dict(state_dict)
    for name, layer in layers.items():
        prefix = f"{name}.experts."
        start, end = _expert_slices(layer)
        gate_up = source.pop(prefix + "gate_up_proj")[start:end]
        inter = gate_up.shape[1] // 2
        source[prefix + "w1"], source[prefix + "w3"] = gate_up[:, :inter], gate_up[:, inter:]
        source[prefix + "w2"] = source.pop(prefix + "down_proj")[start:end]
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(source)), sorted(set(source) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in own.items():
        if target.shape != source[key].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(source[key].shape)} != model {tuple(target.shape)}")
        target.copy_(source[key])
    optimizer = getattr(model, "optimizer", None)
    if hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> None:
    """Gathered transformers checkpoint of a ``parallelize``d model (collective; rank 0 writes)."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        _unwrap(model).save_pretrained(directory, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    dist.barrier()


def _layout(model) -> dict[str, int]:
    layers = _autoep_layers(model)
    ep = next(iter(layers.values())).ep_size if layers else 1
    return {"world_size": dist.get_world_size(), "ep_size": ep, "zero_stage": model.zero_optimization_stage()}


def save_optimizer_state(model, directory: str | os.PathLike) -> None:
    """Each rank writes its optimizer partition (fp32 master weights, AdamW m and v) to
    ``directory/optimizer_rank{r}.pt``, with the layout it belongs to."""
    path = Path(directory) / f"optimizer_rank{dist.get_rank()}.pt"
    torch.save({"layout": _layout(model), "state": model.optimizer.state_dict()}, path)


def load_optimizer_state(model, directory: str | os.PathLike) -> None:
    """Restore this rank's optimizer partition written by ``save_optimizer_state`` at the same layout."""
    path = Path(directory) / f"optimizer_rank{dist.get_rank()}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no optimizer state for rank {dist.get_rank()} (saved with fewer processes?)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["layout"] != _layout(model):
        raise ValueError(f"optimizer state in {directory} was saved with {saved['layout']}, this run is "
                         f"{_layout(model)}: per-rank optimizer partitions only load into the same layout "
                         "(the gathered weights load at any ep_size; restart the optimizer there)")
    states = [None] * dist.get_world_size()
    states[dist.get_rank()] = saved["state"]
    model.optimizer.load_state_dict(states, load_from_fp32_weights=True)


def expert_parallel_group(model: nn.Module):
    """The EP process group of a ``parallelize``d model (None without expert parallelism)."""
    layers = _autoep_layers(model)
    return next(iter(layers.values())).ep_group if layers else None
