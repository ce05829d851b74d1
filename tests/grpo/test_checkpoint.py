import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedTokenizerFast,
    get_scheduler,
)

from grpo.checkpoint import (
    TrainState,
    checkpoint_dirs,
    export_model,
    is_done,
    latest_checkpoint,
    load_checkpoint,
    mark_done,
    save_checkpoint,
)
from grpo.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_v3(seed: int) -> DeepseekV3ForCausalLM:
    """Transformers' own DeepSeek-V3 at toy size: MLA, one dense + one MoE layer (4 routed + 1 shared expert)."""
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        vocab_size=len(CHARS) + 3, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return DeepseekV3ForCausalLM(cfg)


def make_run(seed: int):
    model = tiny_v3(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)
    return model, optimizer, scheduler, {"noise": torch.Generator().manual_seed(123)}


def train_steps(model, optimizer, scheduler, generators, n: int) -> list[float]:
    """Each step draws from every RNG a checkpoint must restore: torch global (batch), python and numpy
    (batch length), a named generator (router-bias update, standing in for aux-loss-free balancing)."""
    losses = []
    for _ in range(n):
        length = random.randint(6, 10) + int(np.random.randint(0, 3))
        ids = torch.randint(3, len(CHARS) + 3, (2, length))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bias = model.model.layers[1].mlp.gate.e_score_correction_bias
        bias.add_(torch.randn(bias.shape, generator=generators["noise"]))
        losses.append(loss.item())
    return losses


@dataclass(kw_only=True)
class RunConfig:
    lr: float = 1e-2
    name: str = "unit"


def test_resume_continues_exactly(tmp_path):
    model, opt, sched, gens = make_run(seed=0)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    reference = train_steps(model, opt, sched, gens, 4)
    final_reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched, gens = make_run(seed=0)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    first = train_steps(model, opt, sched, gens, 2)
    save_checkpoint(tmp_path, model=model, tokenizer=tiny_tokenizer(), optimizer=opt, scheduler=sched, step=2,
                    data_state={"epoch": 0, "index": 4}, extra={"ref_model": "x"}, generators=gens, config=RunConfig())
    del model, opt, sched, gens
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # the "killed" process's RNG is gone

    model, opt, sched, gens = make_run(seed=1)  # different init: everything must come from the checkpoint
    state = load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, generators=gens)
    assert (state.step, state.data_state, state.extra) == (2, {"epoch": 0, "index": 4}, {"ref_model": "x"})
    assert state.config == {"lr": 0.01, "name": "unit"}
    resumed = first + train_steps(model, opt, sched, gens, 2)

    assert resumed == pytest.approx(reference, rel=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final_reference[name], rtol=1e-6, atol=1e-7, msg=name)


def test_rng_states_restored(tmp_path):
    model = tiny_v3(0)
    gen = torch.Generator().manual_seed(5)
    save_checkpoint(tmp_path, model=model, tokenizer=None, step=1, generators={"sampling": gen})
    draws = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen))
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen)
    load_checkpoint(tmp_path, generators={"sampling": gen})
    again = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen))
    assert draws[:2] == again[:2]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    with pytest.raises(KeyError, match="generator 'other'"):
        load_checkpoint(tmp_path, generators={"other": torch.Generator()})


def test_latest_pointer_keep_last_and_hf_loadable(tmp_path):
    model, tokenizer = tiny_v3(0), tiny_tokenizer()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, model=model, tokenizer=tokenizer, step=step, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    assert not list(tmp_path.glob(".tmp-*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "step-00000004")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert AutoTokenizer.from_pretrained(tmp_path / "step-00000004")("ab1")["input_ids"] == [3, 4, 30]
    assert isinstance(load_checkpoint(tmp_path / "step-00000003"), TrainState)


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    model = tiny_v3(0)
    save_checkpoint(tmp_path, model=model, tokenizer=None, step=1)

    class Broken(torch.optim.SGD):
        def state_dict(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, model=model, tokenizer=None, step=2, optimizer=Broken(model.parameters(), lr=1))
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001"]
    assert load_checkpoint(tmp_path).step == 1


def test_clear_errors(tmp_path):
    model = tiny_v3(0)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(tmp_path, model=model, tokenizer=None, step=1, extra={"t": torch.zeros(1)})
    save_checkpoint(tmp_path, model=model, tokenizer=None, step=1)
    with pytest.raises(KeyError, match="without a optimizer state"):
        load_checkpoint(tmp_path, optimizer=torch.optim.SGD(model.parameters(), lr=1))


def test_export_model_and_done_marker(tmp_path):
    model, tokenizer = tiny_v3(0), tiny_tokenizer()
    out = export_model(tmp_path / "final", model, tokenizer, RunConfig())
    assert (out / "run_config.yaml").is_file() and (out / "config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.n_routed_experts == 4
    assert not is_done(tmp_path)
    mark_done(tmp_path, {"accuracy": 0.5})
    assert is_done(tmp_path)


DEEPSPEED_WORKER = """
import sys, torch
from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.model import DeepseekV3Policy, ModelConfig, preset_config, update_router_bias
from grpo.parallel import parallelize

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_nextn_predict_layers=1)

def engine(seed):
    torch.manual_seed(seed)
    model = DeepseekV3Policy._from_config(preset_config("tiny", TINY), dtype=torch.float32)
    model.policy_config = ModelConfig(bias_update_speed=0.01)
    return parallelize(model.train(), dict(lr=1e-2, max_grad_norm=1.0), ep_size=1, zero_stage=1)

def train(eng, n):
    losses = []
    for _ in range(n):
        ids = torch.randint(3, 40, (2, 12))
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss, scale_wrt_gas=False)
        eng.step()
        update_router_bias(eng)
        losses.append(loss.item())
    return losses

root = sys.argv[1]
eng, opt = engine(0)
torch.manual_seed(5)
first = train(eng, 2)
save_checkpoint(root, model=eng, tokenizer=None, optimizer=opt, step=2)
reference = first + train(eng, 2)
final = {k: v.clone() for k, v in eng.module.state_dict().items()}
eng, opt = engine(1)
assert load_checkpoint(root, model=eng, optimizer=opt).step == 2
resumed = first + train(eng, 2)
assert resumed == reference, (resumed, reference)
for k, v in eng.module.state_dict().items():
    torch.testing.assert_close(v, final[k], rtol=1e-6, atol=1e-7, msg=k)
print("resumed exactly", resumed)
"""


def test_deepspeed_engine_checkpoint_resumes_exactly(tmp_path):
    """A `grpo.parallel.parallelize`d model (DeepSpeed ZeRO-1, one CPU process): gathered weights + per-rank
    optimizer partition, then the resumed run repeats the uninterrupted one."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_WORKER, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resumed exactly" in proc.stdout
    assert (tmp_path / "step-00000002/optimizer_rank0.pt").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "step-00000002").config.n_routed_experts == 4
    # the gathered weights are saved in DeepSeek's release format: the MTP layer holds the shared embedding and head
    from safetensors import safe_open
    with safe_open(str(tmp_path / "step-00000002/model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.2.embed_tokens.weight"), f.get_tensor("model.embed_tokens.weight"))
        assert torch.equal(f.get_tensor("model.layers.2.shared_head.head.weight"), f.get_tensor("lm_head.weight"))
    config = json.loads((tmp_path / "step-00000002/config.json").read_text())
    assert (config["scoring_func"], config["topk_method"]) == ("sigmoid", "noaux_tc")


def test_a_failed_export_leaves_the_previous_final_and_done_is_renamed_into_place(tmp_path, monkeypatch):
    import grpo.checkpoint as ckpt

    model, tokenizer = tiny_v3(0), tiny_tokenizer()
    export_model(tmp_path / "final", model, tokenizer)
    before = (tmp_path / "final/model.safetensors").read_bytes()

    def crash(directory, *a, **k):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_save_model_files", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(tmp_path / "final", tiny_v3(1), tokenizer)
    assert (tmp_path / "final/model.safetensors").read_bytes() == before
    mark_done(tmp_path, {"a": 1})
    assert json.loads((tmp_path / "DONE").read_text()) == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-DONE")]


def test_resume_point_refuses_a_changed_config_naming_the_keys(tmp_path):
    from grpo.checkpoint import config_differences, resume_point, start_fresh

    @dataclass
    class Train:
        lr: float = 1e-3
        max_steps: int = 4
        resume_from: str = "latest"

    @dataclass
    class Stage:
        train: Train
        output_dir: str = "x"

    model = tiny_v3(0)
    assert resume_point(tmp_path, "latest", Stage(Train())) is None  # a fresh output_dir: a fresh start
    save_checkpoint(tmp_path / "checkpoints", model=model, tokenizer=None, step=2, config=Stage(Train()))
    more = Stage(Train(max_steps=9), output_dir="moved")  # safe to change
    assert resume_point(tmp_path, "latest", more) == tmp_path / "checkpoints/step-00000002"
    assert resume_point(tmp_path, "none", Stage(Train(lr=1.0))) is None
    assert config_differences({"train": {"lr": 1e-3, "max_steps": 4}}, Stage(Train(lr=2e-3))) == ["train.lr"]
    with pytest.raises(ConfigError, match=r"^train.resume_from: .*step-00000002 was trained with other values of train.lr;"):
        resume_point(tmp_path, "latest", Stage(Train(lr=2e-3)))
    with pytest.raises(ConfigError, match="^train.resume_from: no checkpoint at"):
        resume_point(tmp_path, str(tmp_path / "nothing"), Stage(Train()))
    assert start_fresh(tmp_path, "none") and not (tmp_path / "checkpoints").exists()


STOP_WORKER = """
import os, signal, sys
from grpo.checkpoint import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested() and stop.signum == signal.SIGTERM
    if sys.argv[1] == "twice":
        os.kill(os.getpid(), signal.SIGINT)  # exits at once
        print("still running")
    stop.exit(3, "ckpt")
"""


def test_stop_on_signal_once_then_twice():
    once = subprocess.run([sys.executable, "-c", STOP_WORKER, "once"], cwd=ROOT, capture_output=True, text=True)
    assert once.returncode == 143 and "stopped by SIGTERM after step 3" in once.stderr
    twice = subprocess.run([sys.executable, "-c", STOP_WORKER, "twice"], cwd=ROOT, capture_output=True, text=True)
    assert twice.returncode == 130 and "still running" not in twice.stdout and "stopped by" not in twice.stderr
