"""Reward-model reward: the scalar head of a trained sequence classifier on (prompt, completion).

    r(x, y) = RM_theta(render(x, y))   (the single logit at the last non-padding token)

render(x, y) is the tokenizer's chat template over ``[{"role": "user", "content": x},
{"role": "assistant", "content": y}]`` when the tokenizer has one, else ``x + y``. Texts longer than
``max_length`` tokens are truncated on the left, so the end of the completion (where the score is read) is
always kept. Scoring is batched (``batch_size`` texts at a time, grouped by length to limit padding) under
``torch.no_grad`` with the model in eval mode.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def render(tokenizer, prompt: str, completion: str) -> str:
    """The text a reward model scores for one (prompt, completion) pair (training and scoring both use it)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt + completion


def encode(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> list[list[int]]:
    """Token ids of ``render`` for each pair, left-truncated to ``max_length`` (tokenizer.truncation_side must
    be "left"). A chat template writes its own special tokens; plain concatenation gets the tokenizer's (BOS)."""
    texts = [render(tokenizer, p, c) for p, c in zip(prompts, completions)]
    return tokenizer(texts, add_special_tokens=not tokenizer.chat_template, truncation=True,
                     max_length=max_length)["input_ids"]


class RewardModelReward:
    """Scores completions with a local ``AutoModelForSequenceClassification`` (``num_labels == 1``) checkpoint."""

    def __init__(self, path: str, batch_size: int = 16, device: str | None = None, max_length: int = 2048,
                 dtype: str | None = None):
        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"reward_model: no model at path={path!r} (expected a directory with config.json "
                                    "saved by save_pretrained, e.g. the output of the reward_model stage)")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"reward_model: need batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.batch_size, self.max_length = batch_size, max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"reward_model: the tokenizer at {path!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **kwargs)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward_model: {path!r} has num_labels={self.model.config.num_labels}; a reward model "
                             "needs a single scalar head (num_labels=1)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def render(self, prompt: str, completion: str) -> str:
        return render(self.tokenizer, prompt, completion)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"reward_model: {len(prompts)} prompts for {len(completions)} completions")
        ids = encode(self.tokenizer, prompts, completions, self.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits  # [b, 1]
            for i, value in zip(chunk, logits[:, 0].float().tolist()):
                scores[i] = value
        return scores
