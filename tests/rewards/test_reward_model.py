import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from rewards.registry import RewardSet, RewardSpec
from rewards.reward_model import RewardModelReward

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
CORPUS = ["what is two plus two", "the answer is four", "<think>add them</think> four", "hello world " * 3]


def _save(path, chat_template=True, num_labels=1):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        hf.chat_template = TEMPLATE
    hf.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=num_labels, pad_token_id=hf.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("rm"))


def _manual(rm, text, max_length=None, special=False):
    ids = rm.tokenizer(text, add_special_tokens=special)["input_ids"]
    ids = ids[-max_length:] if max_length else ids
    with torch.no_grad():
        return rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


PROMPTS = ["what is two plus two", "hello", "what", "the answer", "two plus two plus two plus two"]
COMPLETIONS = ["<think>add them</think> four", "world", "is four four four four four", "four", "eight"]


def test_scores_match_unbatched_forward(rm_dir):
    rm = RewardModelReward(rm_dir, batch_size=2, device="cpu")
    assert rm.render("hi", "yo") == "<|user|>hi<|end|><|assistant|>yo<|end|>"
    got = rm(PROMPTS, COMPLETIONS, answer=[None] * 5)
    expected = [_manual(rm, rm.render(p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 6) for v in got)) == len(got)  # different texts, different scores
    assert RewardModelReward(rm_dir, batch_size=16)(PROMPTS, COMPLETIONS) == pytest.approx(got, abs=1e-5)


def test_left_truncation_keeps_the_end(rm_dir):
    rm = RewardModelReward(rm_dir, max_length=6)
    text = rm.render(PROMPTS[0], COMPLETIONS[0])
    assert len(rm.tokenizer(text, add_special_tokens=False)["input_ids"]) > 6
    assert rm(PROMPTS[:1], COMPLETIONS[:1]) == pytest.approx([_manual(rm, text, max_length=6)], abs=1e-5)


def test_without_chat_template(tmp_path):
    rm = RewardModelReward(_save(tmp_path, chat_template=False))
    assert rm.render("what is", " four") == "what is four"
    assert rm(["what is"], [" four"]) == pytest.approx([_manual(rm, "what is four", special=True)], abs=1e-5)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModelReward(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModelReward(_save(tmp_path / "two", num_labels=2))


def test_through_registry(rm_dir):
    rewards = RewardSet([RewardSpec(name="reward_model", kwargs={"path": str(rm_dir), "batch_size": 3})])
    scores = rewards(PROMPTS, COMPLETIONS, answer=[None] * 5)
    direct = RewardModelReward(rm_dir)(PROMPTS, COMPLETIONS)
    assert scores.per_reward["reward_model"] == pytest.approx(direct, abs=1e-5)
