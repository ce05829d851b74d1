import pytest

from rewards.language import language_consistency, reasoning_of, script_of, script_units, target_script

EN = "What is the sum of two and three?"
ZH = "计算 2+3 的值。"


@pytest.mark.parametrize("prompt,completion,expected", [
    (EN, r"<think>We add the two numbers to get $x=5$.</think>\boxed{5}", 1.0),
    (ZH, "<think>我们把 two numbers 相加</think>5", 5 / 7),  # 5 Han characters, 2 English words
    (EN, "<think>First 我们 add</think>", 2 / 4),
    (EN, "<think>Let x be 3</think>", 1.0),  # one-letter words are neutral
    (ZH, "<think>计算 ```python\nprint(1)\n``` 完成</think>", 1.0),  # code is neutral
    (ZH, r"<think>由 \frac{a}{b} 得 $a+b$ </think>", 1.0),  # LaTeX is neutral
    (EN, "<think>hello world", 1.0),  # truncated reasoning still counts
    (EN, "no tags at all 全部", 4 / 6),  # whole completion when there are no tags
    ("ما هو ناتج جمع اثنين وثلاثة", "<think>نجمع العددين then</think>", 2 / 3),
    ("次の値を計算してください", "<think>まず計算します OK</think>", 7 / 8),
    ("Что такое два плюс три?", "<think>Сначала add</think>", 1 / 2),
    ("บวกสองกับสาม", "<think>สองบวกสาม is five</think>", 9 / 11),  # 9 Thai characters, 2 words
    (EN, r"<think>$x^2 = 4$ \frac{1}{2} 42</think>", None),  # nothing to judge
    ("2 + 3 = ?", "<think>add them</think>", None),  # no language in the prompt
])
def test_scores(prompt, completion, expected):
    got = language_consistency([prompt], [completion])[0]
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_language_column_overrides_prompt():
    prompts, completions = [EN, EN, EN], ["<think>Сначала add</think>", "<think>Сначала add</think>", "<think>好 ok</think>"]
    assert language_consistency(prompts, completions, language=["ru", "latin", "zh-CN"]) == [0.5, 0.5, 0.5]
    assert language_consistency(prompts[:1], completions[:1], language=[None]) == [0.5]
    with pytest.raises(ValueError, match="klingon"):
        language_consistency(prompts[:1], completions[:1], language=["klingon"])


def test_units_and_detection():
    assert script_of("a") == "latin" and script_of("é") == "latin" and script_of("ж") == "cyrillic"
    assert script_of("中") == "cjk" and script_of("カ") == "cjk" and script_of("한") == "hangul"
    assert script_of("7") is None and script_of("×") is None and script_of("+") is None
    assert script_units("Hello, wörld! 你好 x 42 <think> \\alpha $y$") == {"latin": 2, "cjk": 2}
    assert script_units("안녕하세요 세계") == {"hangul": 2}
    assert target_script("<|user|> 请计算 <|assistant|>") == "cjk"
    assert target_script("请 calculate the value of this") == "latin"
    assert reasoning_of("<think>a</think>b") == "a" and reasoning_of("a</think>b") == "a"


def test_length_mismatch():
    with pytest.raises(ValueError, match="language"):
        language_consistency([EN, EN], ["a"], language=["en"])
