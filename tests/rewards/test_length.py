import math

import pytest

from rewards.length import cosine_length, cosine_scale, overlong_penalty, repetition_penalty


def test_overlong_penalty_dapo():
    lengths = [0, 80, 81, 90, 100, 101, 500]
    got = overlong_penalty([""] * 7, [""] * 7, completion_lengths=lengths, max_len=100, cache_len=20)
    assert got == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0])


def test_overlong_penalty_contract():
    with pytest.raises(ValueError, match="completion_lengths"):
        overlong_penalty([""], ["x"])
    with pytest.raises(ValueError, match="2 values for 1"):
        overlong_penalty([""], ["x"], completion_lengths=[1, 2])
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty([""], ["x"], completion_lengths=[1], max_len=10, cache_len=20)


def test_cosine_scale_endpoints():
    assert cosine_scale(0, 10, 1.0, 2.0) == 2.0
    assert cosine_scale(10, 10, 1.0, 2.0) == pytest.approx(1.0)
    assert cosine_scale(5, 10, 1.0, 2.0) == pytest.approx(1.5)


def test_cosine_length_values():
    right, wrong = r"<think>t</think>\boxed{4}", r"<think>t</think>\boxed{5}"
    completions = [right, right, right, right, wrong, wrong, wrong, wrong, right]
    lengths = [0, 50, 99, 100, 0, 25, 50, 150, 10]
    answers = ["4"] * 8 + [None]
    got = cosine_length([""] * 9, completions, answer=answers, completion_lengths=lengths, max_len=100)
    expected = [2.0, 1.5, 1.0 + 0.5 * (1 + math.cos(0.99 * math.pi)), -10.0,
                -10.0, -5.0 * (1 + math.cos(math.pi / 4)), -5.0, -10.0, None]
    assert got[:8] == pytest.approx(expected[:8]) and got[8] is None


def test_cosine_length_custom_values_and_errors():
    got = cosine_length([""] * 2, [r"\boxed{1}", r"\boxed{2}"], answer=["1", "1"], completion_lengths=[0, 0],
                        max_len=10, correct_short=1.0, wrong_short=-1.0)
    assert got == [1.0, -1.0]
    with pytest.raises(ValueError, match="answer"):
        cosine_length([""], ["x"], completion_lengths=[1])
    with pytest.raises(ValueError, match="completion_lengths"):
        cosine_length([""], ["x"], answer=["1"])


@pytest.mark.parametrize("text,kwargs,expected", [
    ("a b c a b c", {}, -0.25),  # 4 trigrams, 3 distinct
    ("A b C a B c", {}, -0.25),  # lower-cased
    ("a b", {}, 0.0),  # fewer tokens than n
    ("the cat sat on the mat", {}, 0.0),
    ("x x x x x", {}, -2 / 3),
    ("x x x x x", {"max_penalty": -0.5}, -1 / 3),
    ("x x x x x", {"ngram_size": 1}, -0.8),
    ("好好好好", {}, -0.5),  # CJK characters are tokens
    ("", {}, 0.0),
])
def test_repetition_penalty(text, kwargs, expected):
    assert repetition_penalty([""], [text], **kwargs) == pytest.approx([expected])


def test_repetition_penalty_validation():
    with pytest.raises(ValueError, match="max_penalty"):
        repetition_penalty([""], ["x"], max_penalty=0.5)
    with pytest.raises(ValueError, match="ngram_size"):
        repetition_penalty([""], ["x"], ngram_size=0)
