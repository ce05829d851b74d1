"""The whole pipeline of recipes/tiny/pipeline.yaml at toy size: every step as its subprocess, a few steps each."""
import json
import re
from pathlib import Path

import pytest
import yaml

import stages.pipeline as pipeline

ROOT = Path(__file__).resolve().parents[2]
TOY_MODEL = json.dumps({
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
})
RL = ["sampling.max_new_tokens=8", "sampling.max_batch=16", "train.prompts_per_step=2", "train.group_size=4",
      "train.micro_batch_size=4", "train.minibatches=2", "train.max_steps=2", "train.save_every=0", "wandb_mode=disabled"]
SFT = ["train.micro_batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.save_every=0",
       "train.max_seq_len=96", "wandb_mode=disabled"]
EVAL = ["heldout.max_new_tokens=8", "heldout.batch_size=16"]
SMOKE = {
    "data": ["--n-math", "24", "--n-math-test", "4", "--n-math-rl", "24", "--n-code", "4", "--n-code-test", "2", "--n-cot", "40",
             "--n-general", "8", "--n-general-test", "2", "--n-pref", "8", "--n-pref-test", "4"],
    "tokenizer": ["--vocab-size", "400"],
    "sft": [f"model.overrides={TOY_MODEL}", "train.max_steps=3", *SFT],
    "eval_sft": EVAL, "eval_rl_reasoning": EVAL, "eval_sft_rs": EVAL, "eval_rl_general": EVAL,
    "rl_reasoning": [*RL, "train.dynamic_sampling=false"],
    "rejection_sampling": ["samples=2", "sampling.max_new_tokens=8", "prompts_per_source={math: 4, code: 2}",
                           "general_rows=8"],  # a random toy model answers nothing right: general rows only
    "sft_rs": ["train.max_steps=2", *SFT],
    "reward_model": ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0",
                     "wandb_mode=disabled"],
    "rl_general": RL,
}


def test_smoke_pipeline_runs_every_stage_resumes_and_reports(tmp_path, capfd):
    recipe = yaml.safe_load((ROOT / "recipes/tiny/pipeline.yaml").read_text())
    run = tmp_path / "run"
    recipe.update(run_dir=str(run), seed=1, step_overrides=SMOKE, threads=1)
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(recipe))
    report = pipeline.main(["--recipe", str(tmp_path / "smoke.yaml")])
    names = [s["name"] for s in recipe["steps"]]
    assert names[2:] == ["sft", "eval_sft", "rl_reasoning", "eval_rl_reasoning", "rejection_sampling", "sft_rs",
                         "eval_sft_rs", "reward_model", "rl_general", "eval_rl_general"]
    timings = json.loads((run / "pipeline.json").read_text())
    assert list(timings) == names
    printed = capfd.readouterr().out
    assert "== sft: python -m stages.sft --recipe recipes/tiny/sft.yaml" in printed
    # chained through checkpoints on disk
    assert (run / "rl_reasoning/final/config.json").is_file() and (run / "reward_model/final/config.json").is_file()
    assert json.loads((run / "rejection_sampling/summary.json").read_text())["rows"]["general"] == 8
    text = report.read_text()
    assert "seed 1; 1 thread(s) per step (OMP_NUM_THREADS)" in text
    for label in ("cold-start SFT", "reasoning RL", "rejection-sampling SFT", "general RL"):
        assert f"| {label} |" in text
    # accuracy +- its standard error, the paired change from the row above, greedy next to it
    assert re.search(r"\| reasoning RL \| [\d.]+% \+- [\d.]+ \| [+-][\d.]+ \+- [\d.]+ \| [\d.]+% \+- [\d.]+ \|", text)
    assert (run / "plots/heldout.png").is_file() and (run / "plots/rl_general.png").is_file()
    assert "heldout_pairwise_accuracy" in text
    # everything is DONE: a second run skips every step
    pipeline.main(["--recipe", str(tmp_path / "smoke.yaml")])
    assert capfd.readouterr().out.count("skipped") == len(names)


def test_unknown_step_in_overrides_is_a_config_error(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--recipe", str(ROOT / "recipes/tiny/pipeline.yaml"), "step_overrides={sfft: [x=1]}"])
    assert "step_overrides: unknown step 'sfft'" in capsys.readouterr().err


def test_rerun_starts_a_training_stage_from_scratch():
    from grpo.config import load_config

    cfg = load_config(pipeline.PipelineConfig, ROOT / "recipes/tiny/pipeline.yaml", ["rerun=[sft, data]"])
    steps = {s.name: s for s in cfg.steps}
    assert "train.resume_from=none" in pipeline.command(steps["sft"], cfg)
    assert "train.resume_from=none" not in pipeline.command(steps["data"], cfg)
    assert "train.resume_from=none" not in pipeline.command(steps["rl_reasoning"], cfg)
