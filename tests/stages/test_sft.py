import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import stages.sft as sft
from data.generate import Sizes, write_all
from data.loaders import DataConfig, DataError
from data.tokenizer import train_tokenizer
from grpo.config import ConfigError
from grpo.model import ModelConfig, load_policy
from tests.stages.stop_signal import sigterm_after_first_step

ROOT = Path(__file__).resolve().parents[2]
SIZES = Sizes(math=20, math_test=6, math_rl=16, code=4, code_test=2, cot=60, general=10, general_test=2, pref=2, pref_test=2)
TOY_MODEL = {  # the tiny preset shrunk further: 2 layers (1 dense, 1 MoE), 4 routed experts
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Generated data + a trained tokenizer, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("sft")
    paths = write_all(root / "data", seed=0, sizes=SIZES)
    train_tokenizer([p for name, p in paths.items() if name.endswith("_train")], root / "tok", vocab_size=400)
    return root


@pytest.fixture(scope="module")
def tokenizer(workdir):
    return AutoTokenizer.from_pretrained(workdir / "tok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--recipe", str(ROOT / "recipes/tiny/sft.yaml"),
        f"tokenizer={workdir / 'tok'}", f"data=[{{path: {workdir / 'data/cot_train.jsonl'}}}]",
        f"output_dir={out}", f"model.overrides={json.dumps(TOY_MODEL)}", "model.mtp_layers=1", "wandb_mode=disabled",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=4", "train.warmup_steps=1",
        "train.log_every=1", "train.max_seq_len=96",
        f"eval.data={{path: {workdir / 'data/math_test.jsonl'}, limit: 3}}", "eval.max_new_tokens=8",
        "eval.every=0",  # the recipe's held-out curve off (test_heldout_curve turns it on)
        *extra,
    ]


def test_labels_are_exactly_the_assistant_tokens(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}."}]
    ex = sft.build_example(tokenizer, messages, max_seq_len=512)
    learned = [t for t in ex.labels if t != -100]
    assert tokenizer.decode(learned) == messages[1]["content"] + tokenizer.eos_token
    first = ex.labels.index(learned[0])
    assert ex.labels[:first] == [-100] * first  # bos, role markers and the user turn
    assert ex.input_ids[first:] == learned  # the assistant turn is the tail, every token of it learned
    assert sft.build_example(tokenizer, messages, max_seq_len=first) is None  # truncated to the prompt


def test_loss_and_gradient_only_from_assistant_tokens(tokenizer):
    torch.manual_seed(0)
    model = load_policy(ModelConfig(overrides=TOY_MODEL, mtp_layers=1), tokenizer)
    convs = [[{"role": "user", "content": "Compute 12 + 7."}, {"role": "assistant", "content": "The answer is 19."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
              {"role": "assistant", "content": "Goodbye"}]]
    batch = sft.collate([sft.build_example(tokenizer, m, 512) for m in convs], tokenizer.pad_token_id)
    out = model(**batch, use_cache=False)
    out.logits.retain_grad()
    out.loss.backward()

    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    counted = targets != -100
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1][counted], targets[counted])
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    grad_norm = out.logits.grad.norm(dim=-1)  # [B, T]
    assert torch.all(grad_norm[:, :-1][~counted] == 0) and torch.all(grad_norm[:, -1] == 0)
    assert torch.all(grad_norm[:, :-1][counted] > 0)
    # the user turns' tokens are never targets: changing them leaves the set of targets unchanged
    assert set(batch["labels"][1][batch["labels"][1] != -100].tolist()) <= set(
        tokenizer("Hello" + "Goodbye" + tokenizer.eos_token, add_special_tokens=False)["input_ids"])


def test_epoch_batches_cover_data_sorted_and_seeded():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = sft.epoch_batches(lengths, 8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == sft.epoch_batches(lengths, 8, seed=3, epoch=0)
    assert batches != sft.epoch_batches(lengths, 8, seed=3, epoch=1)
    assert len(batches) == len(sft.epoch_batches(lengths, 8, seed=3, epoch=1))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 8 would spread ~75


def test_step_stream_resumes_from_position():
    lengths = list(range(50))
    full = sft.step_stream(lengths, 4, seed=0, per_step=3, epoch=0, index=0)
    steps = [next(full) for _ in range(10)]  # 12 batches -> 4 steps per epoch, crosses two epochs
    assert [s[:2] for s in steps[3:6]] == [(0, 12), (1, 3), (1, 6)]
    epoch, index, _ = steps[6]
    resumed = sft.step_stream(lengths, 4, seed=0, per_step=3, epoch=epoch, index=index)
    assert [next(resumed) for _ in range(3)] == steps[7:10]


def test_prompt_response_rows_become_chats(tmp_path):
    path = tmp_path / "pr.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi", "response": "hi"}) + "\n")
    assert sft.load_conversations(DataConfig(path=str(path))) == [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]]
    path.write_text(json.dumps({"question": "Say hi"}) + "\n")
    with pytest.raises(DataError, match="'messages' column, or 'prompt' and 'response'"):
        sft.load_conversations(DataConfig(path=str(path)))


def test_config_errors_are_clean(workdir, tmp_path, capsys):
    for override, message in [
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train.lr_scheduler=step", "train.lr_scheduler: must be one of 'cosine', 'linear', 'constant'"),
        ("train.batch=3", "train.batch: unknown key"),
        ("tokenizer=null", "tokenizer: required when model.init is the preset 'tiny'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            sft.main(recipe_args(workdir, tmp_path, override))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_entry_point_trains_and_saves_loadable_model(workdir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "stages.sft", *recipe_args(workdir, out, "train.save_every=2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: " in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.model_type == "deepseek_v3" and len(tok) == model.config.vocab_size
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and "moe/max_vio_mean" in m for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert json.loads((out / "eval.json").read_text())["n"] == 3
    assert json.loads((out / "DONE").read_text())["steps"] == 4
    assert (out / "checkpoints/latest").read_text() == "step-00000004"
    saved = yaml.safe_load((out / "final/run_config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4


def test_resume_after_crash_matches_uninterrupted_run(workdir, tmp_path, monkeypatch):
    args = ["train.save_every=2", "eval.data=null"]
    sft.main(recipe_args(workdir, tmp_path / "a", *args))

    calls = {"n": 0}
    real_update = sft.update_router_bias

    def crash_on_third_step(model, group=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_update(model, group)

    monkeypatch.setattr(sft, "update_router_bias", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        sft.main(recipe_args(workdir, tmp_path / "b", *args))
    assert not (tmp_path / "b/DONE").exists()
    monkeypatch.setattr(sft, "update_router_bias", real_update)
    torch.manual_seed(1234)  # whatever the RNG state, the checkpoint restores it
    sft.main(recipe_args(workdir, tmp_path / "b", *args))  # the same command resumes (train.resume_from: latest)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    assert losses("b") == pytest.approx(losses("a"), rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a/final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b/final").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_changed_config_or_bad_data_never_touch_a_finished_run(workdir, tmp_path):
    out = tmp_path / "a"
    sft.main(recipe_args(workdir, out, "train.max_steps=2", "eval.data=null"))
    done = (out / "DONE").read_text()
    with pytest.raises(ConfigError, match="train.resume_from: .* other values of train.lr;") as e:
        sft.main(recipe_args(workdir, out, "train.max_steps=3", "eval.data=null", "train.lr=0.5"))
    assert "max_steps" not in str(e.value)
    with pytest.raises((Exception, SystemExit)):
        sft.main(recipe_args(workdir, out, "train.max_steps=3", "eval.data=null",
                             f"data=[{{path: {tmp_path / 'missing.jsonl'}}}]"))
    assert (out / "DONE").read_text() == done and (out / "final/config.json").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_any_hf_causal_lm(workdir, tokenizer, tmp_path):
    """A non-V3 model (a toy Llama checkpoint): no aux loss, no router; trains and exports all the same."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    result = sft.main(recipe_args(workdir, tmp_path / "out", f"model.init={tmp_path / 'llama'}", "tokenizer=null",
                                  "model.overrides={}", "train.max_steps=2"))
    assert result["heldout"]["n"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in m if "loss" in k) for m in metrics] == [["loss"], ["loss"]]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out/final").config.model_type == "llama"


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "train.lr" in text and "model.init" in text and "parallel.ep_size" in text and "--recipe" in text


def test_expert_parallel_run_under_accelerate_launch(workdir, tmp_path):
    """Two CPU processes (gloo), routed experts sharded over both (DeepSpeed AutoEP): trains, checkpoints
    per-rank optimizer partitions, exports a model that loads unsharded."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ep"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
           "--main_process_port", str(free_port()), "-m", "stages.sft",
           *recipe_args(workdir, out, "parallel.ep_size=2", "train.max_steps=2", "train.grad_accum=1")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ckpt = out / "checkpoints/step-00000002"
    assert (ckpt / "optimizer_rank0.pt").is_file() and (ckpt / "optimizer_rank1.pt").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == TOY_MODEL["n_routed_experts"]


def test_sigterm_saves_the_last_step_and_the_rerun_resumes(workdir, tmp_path):
    out = tmp_path / "run"
    extra = ("train.save_every=0", "eval.data=null")
    done = sigterm_after_first_step("stages.sft", recipe_args(workdir, out, "train.max_steps=100000", *extra), out)
    assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and (out / "checkpoints/latest").read_text() == f"step-{n:08d}"
    result = sft.main(recipe_args(workdir, out, f"train.max_steps={n + 2}", *extra))
    assert result["steps"] == n + 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, n + 3))


@pytest.mark.parametrize("arch", ["v3", "llama"])
def test_activation_checkpointing_trains_the_same(workdir, tokenizer, tmp_path, arch):
    """model.gradient_checkpointing: the same losses and final weights as without (V3 with MTP and the balance
    loss through the recomputed routers; any HF causal LM through transformers' checkpointing)."""
    extra = ["eval.data=null", "train.max_steps=2"]
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
        tokenizer.save_pretrained(tmp_path / "llama")
        extra += [f"model.init={tmp_path / 'llama'}", "tokenizer=null", "model.overrides={}"]
    for on in ("true", "false"):
        sft.main(recipe_args(workdir, tmp_path / on, *extra, f"model.gradient_checkpointing={on}"))
    losses = {on: [json.loads(line)["loss"] for line in (tmp_path / on / "metrics.jsonl").read_text().splitlines()]
              for on in ("true", "false")}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "false/final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "true/final").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_heldout_curve_from_step_0(workdir, tmp_path):
    out = tmp_path / "curve"
    sft.main(recipe_args(workdir, out, "eval.every=2", "eval.samples=2", "train.save_every=0"))
    points = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "heldout/pass@1" in m]
    assert [m["step"] for m in points] == [0, 2, 4]
    assert all(0 <= m["heldout/pass@1"] <= 1 and m["heldout/mean_tokens"] > 0 for m in points)
