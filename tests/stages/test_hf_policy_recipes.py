"""The embedded default's stage recipes with a Hugging Face model of another architecture (model.init=<dir>):
they carry no V3-only model.overrides and no tokenizer, so the model's own config, tokenizer and chat template
are what trains and what final/ holds."""
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import stages.rl_reasoning as rl
import stages.sft as sft
from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.config import load_config
from stages.pipeline import PipelineConfig, expand

ROOT = Path(__file__).resolve().parents[2]
SIZES = Sizes(math=20, math_test=4, math_rl=16, code=4, code_test=2, cot=40, general=4, general_test=2, pref=2, pref_test=2)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Generated data and a random 2-layer Qwen2 saved with save_pretrained, with a tokenizer of its own: another
    vocab size than the tiny one's and a ChatML chat template with <|im_end|> as eos."""
    root = tmp_path_factory.mktemp("hf")
    paths = write_all(root / "data", seed=0, sizes=SIZES)
    tok = train_tokenizer([p for name, p in paths.items() if name.endswith("_train")], vocab_size=300)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    return root


def assert_own_tokenizer(final: Path, source: Path) -> None:
    saved, own = AutoTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained(source)
    assert len(saved) == len(own) and saved.get_vocab() == own.get_vocab()
    assert saved.chat_template == own.chat_template == CHATML and saved.eos_token == "<|im_end|>"
    config = AutoConfig.from_pretrained(final)
    assert config.model_type == "qwen2" and config.vocab_size == len(own)


def test_sft_recipe_trains_a_hf_model_with_its_own_tokenizer(workdir, tmp_path):
    out = tmp_path / "sft"
    result = sft.main([
        "--recipe", str(ROOT / "recipes/tiny/sft.yaml"), f"model.init={workdir / 'qwen'}",
        f"data=[{{path: {workdir / 'data/cot_train.jsonl'}}}]", f"output_dir={out}", "wandb_mode=disabled",
        "train.max_steps=2", "train.micro_batch_size=4", "train.warmup_steps=1", "train.log_every=1",
        "train.save_every=0", "train.max_seq_len=96", "eval.data=null",
    ])
    assert result["steps"] == 2 and (out / "DONE").is_file()
    assert_own_tokenizer(out / "final", workdir / "qwen")


def test_rl_reasoning_recipe_trains_a_hf_model_with_its_own_tokenizer(workdir, tmp_path):
    out = tmp_path / "rl"
    result = rl.main([
        "--recipe", str(ROOT / "recipes/tiny/rl_reasoning.yaml"), f"model.init={workdir / 'qwen'}",
        f"data=[{{path: {workdir / 'data/math_train.jsonl'}}}]", f"output_dir={out}", "wandb_mode=disabled",
        "sampling.max_new_tokens=8", "sampling.max_batch=16", "train.prompts_per_step=2", "train.group_size=4",
        "train.micro_batch_size=4", "train.minibatches=2", "train.max_steps=2", "train.save_every=0",
        "train.dynamic_sampling=false", "eval.data=null",
    ])
    assert result["steps"] == 2 and (out / "DONE").is_file()
    assert_own_tokenizer(out / "final", workdir / "qwen")


STAGE_RECIPES = sorted(p for p in ROOT.glob("recipes/*/*.yaml")  # the recipe sets: a dir with a preset
                       if (p.parent / "model.yaml").is_file() and p.name not in ("model.yaml", "pipeline.yaml"))


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_recipes_name_no_tokenizer_and_no_model_overrides(recipe):
    """A preset's own settings live in its model.yaml; a tokenizer is passed by whoever builds from the preset."""
    values = yaml.safe_load(recipe.read_text()) or {}
    assert values.get("tokenizer") is None
    assert not (values.get("model") or {}).get("overrides")


@pytest.mark.parametrize("size", ["tiny", "v3-mini"])
def test_pipelines_give_sft_from_a_preset_its_tokenizer(size):
    """The pipeline's SFT steps build valid configs: the preset one gets the run's tokenizer, sft_rs none (its
    checkpoint's own)."""
    cfg = load_config(PipelineConfig, ROOT / f"recipes/{size}/pipeline.yaml")
    steps = {s.name: s for s in cfg.steps}
    built = {name: load_config(sft.SFTConfig, ROOT / expand(steps[name].recipe, cfg),
                               [expand(a, cfg) for a in steps[name].args]) for name in ("sft", "sft_rs")}
    assert built["sft"].model.init == size and built["sft"].tokenizer == f"runs/{size}/tokenizer"
    assert built["sft_rs"].model.init == f"runs/{size}/sft/final" and built["sft_rs"].tokenizer is None
    assert built["sft_rs"].output_dir == f"runs/{size}/sft_rs" and built["sft_rs"].run_name == "sft_rs"
