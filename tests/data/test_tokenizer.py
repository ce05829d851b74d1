import json

import pytest

from data.tokenizer import BOS, EOS, PAD, ROLE_TOKENS, THINK_TOKENS, train_tokenizer

TEXTS = [
    "Compute 37 + 45.",
    "<think>\nones: 7 + 5 = 12, write 2 carry 1\n</think>\nThe answer is \\boxed{\\frac{3}{4}}.",
    "Janet’s ducks lay 16 eggs per day — she sells them for $2 each. ½ 😀 日本語",
    "def add_7(x):\n    return x + 7\n",
    "  leading and trailing spaces  \n\n",
]


def test_vocab_size_and_special_tokens_are_single_ids(tokenizer):
    assert len(tokenizer) == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    ids = set()
    for token in (BOS, EOS, PAD, *ROLE_TOKENS, *THINK_TOKENS):
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(encoded) == 1, token
        assert tokenizer.convert_ids_to_tokens(encoded[0]) == token
        ids.add(encoded[0])
    assert len(ids) == 8
    assert tokenizer("Hi")["input_ids"] == tokenizer("Hi", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_digits_are_one_token_each(tokenizer):
    text = "x = 1234567890 and 2,125 or 3.75 -42"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), digit_tokens
    assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())


def test_think_tokens_survive_skip_special_tokens(tokenizer):
    ids = tokenizer("<think>\nok\n</think>\nyes<|end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nok\n</think>\nyes"


def test_chat_template_renders(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"},
                {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\nThe answer is \\boxed{7}."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|begin|><|system|>Be brief.<|end|><|user|>What is 3 + 4?<|end|>"
        "<|assistant|><think>\n3 + 4 = 7\n</think>\nThe answer is \\boxed{7}.<|end|>")
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == \
        "<|begin|><|user|>What is 3 + 4?<|end|><|assistant|>"
    with pytest.raises(Exception, match="unknown chat role tool; allowed: system, user, assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_train_tokenizer_function_and_bad_input(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": "a", "prompt": f"What is {i} + {i}?"}) + "\n" for i in range(50)))
    tok = train_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    assert 264 < len(tok) <= 300 and (tmp_path / "tok" / "tokenizer.json").is_file()  # runs out of merges
    assert tok.decode(tok("What is 12 + 12?")["input_ids"]) == "What is 12 + 12?"
    with pytest.raises(ValueError, match="vocab_size must be >= 264"):
        train_tokenizer([corpus], None, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train_tokenizer([tmp_path / "missing.jsonl"], None)
