import copy

import pytest

from data.chat import R1_TEMPLATE, encode_chat, encode_prompt, render_prompt
from data.tokenizer import CHAT_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\nThe answer is \\boxed{7}."},
    {"role": "user", "content": "And 2 * 5?"},
    {"role": "assistant", "content": "It is 10."},
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def masked_blocks(tokenizer, ids, mask):
    """Decoded runs of consecutive masked tokens."""
    blocks, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            blocks, run = blocks + [tokenizer.decode(run)], []
    return blocks + ([tokenizer.decode(run)] if run else [])


def test_mask_covers_exactly_assistant_content_and_end_token(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert masked_blocks(tokenizer, ids, mask) == [m["content"] + "<|end|>" for m in CONVERSATION
                                                   if m["role"] == "assistant"]
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == ("<|begin|><|system|>You are helpful.<|end|><|user|>What is 3 + 4?<|end|><|assistant|>"
                        "<|user|>And 2 * 5?<|end|><|assistant|>")
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_prefix_rendering_fallback_matches_generation_tags(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert encode_chat(plain, CONVERSATION) == encode_chat(tokenizer, CONVERSATION)


def test_fallback_with_a_chatml_template(tokenizer):
    chatml = copy.deepcopy(tokenizer)
    chatml.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML
    ids, mask = encode_chat(chatml, CONVERSATION)
    assert masked_blocks(chatml, ids, mask) == [m["content"] + "<|im_end|>" for m in CONVERSATION
                                                if m["role"] == "assistant"]
    assert chatml.decode(ids[-1:]) == "\n" and mask[-1] == 0


def test_fallback_refuses_templates_that_rewrite_history(tokenizer):
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                               "[old]{% else %}{{ m['content'] }}{% endif %}|{% endfor %}")
    with pytest.raises(ValueError, match="renders message 2 differently"):
        encode_chat(rewriting, CONVERSATION)


def test_max_len_truncates_both(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    short_ids, short_mask = encode_chat(tokenizer, CONVERSATION, max_len=12)
    assert (short_ids, short_mask) == (ids[:12], mask[:12])


def test_bad_messages_and_missing_template(tokenizer):
    with pytest.raises(ValueError, match="messages is empty"):
        encode_chat(tokenizer, [])
    with pytest.raises(ValueError, match="message 1 must be a dict with string 'role' and 'content'"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match="message 1 is an empty assistant turn"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}])
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render_prompt(bare, "hi")


def test_render_prompt_is_the_prefix_of_training_sequences(tokenizer):
    assert render_prompt(tokenizer, "What is 3 + 4?") == "<|begin|><|user|>What is 3 + 4?<|end|><|assistant|>"
    assert render_prompt(tokenizer, "Q", think=True).endswith("<|assistant|><think>\n")
    assert render_prompt(tokenizer, "Q", system=R1_TEMPLATE).startswith(f"<|begin|><|system|>{R1_TEMPLATE}<|end|>")
    prompt_ids = encode_prompt(tokenizer, CONVERSATION[1]["content"], system=CONVERSATION[0]["content"])
    ids, mask = encode_chat(tokenizer, CONVERSATION[:3])
    assert ids[:len(prompt_ids)] == prompt_ids
    assert mask.index(1) == len(prompt_ids)
    think_ids = encode_prompt(tokenizer, "What is 3 + 4?", think=True)
    assert encode_chat(tokenizer, CONVERSATION[1:3])[0][:len(think_ids)] == think_ids


def test_r1_template_names_the_format():
    assert "<think>" in R1_TEMPLATE and "</think>" in R1_TEMPLATE and "\\boxed{}" in R1_TEMPLATE
