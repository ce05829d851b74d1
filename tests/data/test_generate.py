import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sympy as sp
from math_verify import parse
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

from data.generate import (MATH_KINDS, Sizes, answer_forms, assert_disjoint, build, canonical_latex, draw_unique,
                           g_greet, normalize_prompt, write_all)
from data.loaders import last_boxed

ROOT = Path(__file__).resolve().parents[2]

FILES = ("math_train", "math_test", "math_rl", "code_train", "code_test", "cot_train", "general_train", "general_test",
         "preferences_train", "preferences_test")


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def recompute(prompt: str) -> sp.Rational:
    """The gold answer solved again with sympy from the prompt text alone."""
    if m := re.search(r"price of (\d+) goes (up|down) by (\d+)%", prompt):
        n, way, p = m.groups()
        return int(n) * (1 + (1 if way == "up" else -1) * sp.Rational(int(p), 100))
    if m := re.search(r"(\d+)% of (\d+)", prompt):
        return sp.Rational(int(m[1]) * int(m[2]), 100)
    if m := re.search(r"(\d+) .*ratio (\d+):(\d+)\. .*(larger|smaller)", prompt):
        n, p, q, which = m.groups()
        return sp.Rational(int(n) * (max if which == "larger" else min)(int(p), int(q)), int(p) + int(q))
    if m := re.search(r"([\dx][\dx +\-]*)=\s*(-?\d+)", prompt):
        lhs = parse_expr(m[1], transformations=standard_transformations + (implicit_multiplication,))
        (root,) = sp.solve(sp.Eq(lhs, int(m[2])), sp.Symbol("x"))
        return root
    if m := re.search(r"(?:Simplify|Write|Reduce the fraction) (\d+)/(\d+)", prompt):
        return sp.Rational(int(m[1]), int(m[2]))
    return sp.sympify(re.search(r"[\d(][\d\s+\-*/()]*[\d)]", prompt).group())


def latex_value(text: str) -> sp.Rational:
    value = parse(f"${text}$")[0]
    return sp.nsimplify(value, rational=True)


def test_same_seed_identical_different_seed_differs(tmp_path, data_dir, sizes):
    again, other = tmp_path / "again", tmp_path / "other"
    subprocess.run([sys.executable, "-m", "data.generate", "--out", str(again), "--seed", "0",
                    *[f"--n-{k.replace('_', '-')}={v}" for k, v in vars(sizes).items()]],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)
    write_all(other, seed=1, sizes=sizes)
    for name in FILES:
        assert (again / f"{name}.jsonl").read_bytes() == (data_dir / f"{name}.jsonl").read_bytes(), name
        assert (other / f"{name}.jsonl").read_bytes() != (data_dir / f"{name}.jsonl").read_bytes(), name


def test_sizes_and_schemas(data_dir, sizes):
    rows = {name: read(data_dir / f"{name}.jsonl") for name in FILES}
    assert len(rows["math_train"]) == sizes.math and len(rows["math_test"]) == sizes.math_test
    assert len(rows["math_rl"]) == sizes.math_rl
    assert len(rows["cot_train"]) == sizes.cot + sizes.code
    assert len(rows["preferences_test"]) == sizes.pref_test
    keys = {"math_train": {"id", "prompt", "answer", "solution", "source", "difficulty", "kind"},
            "math_rl": {"id", "prompt", "answer", "solution", "source", "difficulty", "kind"},
            "code_train": {"id", "prompt", "tests", "entry_point", "reference", "source"},
            "cot_train": {"id", "messages", "source"}, "general_train": {"id", "prompt", "response", "source"},
            "preferences_train": {"id", "prompt", "chosen", "rejected", "source"}}
    for name, expected in keys.items():
        for split in {name, name.replace("_train", "_test")} & set(rows):
            assert all(set(r) == expected for r in rows[split]), split
    for r in rows["preferences_train"] + rows["preferences_test"]:
        assert r["chosen"] != r["rejected"]
    assert Counter(r["source"] for r in rows["cot_train"]) == {"math": sizes.cot, "code": sizes.code}


def test_splits_are_disjoint_and_deduplicated(data_dir):
    rows = {name: read(data_dir / f"{name}.jsonl") for name in FILES}

    def prompts(name):
        return [normalize_prompt(m["content"]) for r in rows[name] for m in r["messages"] if m["role"] == "user"] \
            if name == "cot_train" else [normalize_prompt(r["prompt"]) for r in rows[name]]

    held_out = {p for name in FILES if name.endswith("_test") for p in prompts(name)}
    for name in FILES:
        assert len(set(prompts(name))) == len(prompts(name)), f"duplicates in {name}"
        if not name.endswith("_test"):
            assert not held_out & set(prompts(name)), name
    # Content too: the same sum or product written another way ("3 * 4" / "Compute 4 * 3.") must not leak.
    def operands(name):
        return {(r["kind"], tuple(sorted(re.findall(r"\d+(?:/\d+)?", r["prompt"])))) for r in rows[name]
                if r["kind"] in ("add", "mul", "frac_mul")}

    assert operands("math_test") and not operands("math_test") & (operands("math_train") | operands("math_rl"))


def test_rl_pool_size_changes_no_other_file():
    small, large = (build(0, Sizes(math=20, math_test=5, math_rl=n, code=2, code_test=1, cot=5, general=5,
                                   general_test=2, pref=4, pref_test=4)) for n in (10, 50))
    assert (len(small["math_rl"]), len(large["math_rl"])) == (10, 50)
    assert {k: v for k, v in small.items() if k != "math_rl"} == {k: v for k, v in large.items() if k != "math_rl"}


def test_assert_disjoint_catches_leaks():
    files = build(0, Sizes(math=20, math_test=5, math_rl=5, code=2, code_test=1, cot=5, general=5, general_test=2, pref=4,
                           pref_test=4))
    files["general_train"].append({"prompt": files["math_test"][0]["prompt"].upper() + "  ", "response": "x"})
    with pytest.raises(AssertionError, match="held-out prompts"):
        assert_disjoint(files)


def test_gold_answers_recomputed_with_sympy(data_dir):
    rows = read(data_dir / "math_train.jsonl") + read(data_dir / "math_test.jsonl")
    for r in rows:
        value = recompute(r["prompt"])
        assert latex_value(r["answer"]) == value, r
        assert last_boxed(r["solution"]) == canonical_latex(value), r
        assert r["difficulty"] == MATH_KINDS[r["kind"]][0]
    assert {r["kind"] for r in rows} == set(MATH_KINDS)
    forms = {r["answer"] for r in rows}
    assert any("\\dfrac" in f for f in forms) and any("." in f for f in forms) and any("/" in f for f in forms)


@pytest.mark.parametrize("value", [sp.Integer(42), sp.Integer(-7), sp.Rational(3, 4), sp.Rational(-11, 8),
                                   sp.Rational(1, 3), sp.Rational(22, 7)])
def test_every_answer_form_is_equivalent(value):
    forms = set(answer_forms(value))
    assert len(forms) >= 2
    for form in forms:
        assert latex_value(form) == value, form


def test_easy_tier_dominates_held_out_math(data_dir):
    rows = read(data_dir / "math_test.jsonl")
    share = Counter(r["difficulty"] for r in rows)
    assert set(share) == {1, 2, 3} and share[1] >= 0.35 * len(rows)
    assert all(len(r["prompt"]) <= 80 for r in rows if r["difficulty"] == 1)


def test_cot_traces_are_well_formed_and_agree_with_gold(data_dir, tokenizer):
    traces = read(data_dir / "cot_train.jsonl")
    math_form = re.compile(r"<think>\n(?:.+\n)+</think>\nThe answer is \\boxed\{.+\}\.")
    code_form = re.compile(r"<think>\n(?:.+\n)+</think>\n```python\ndef \w+\(.*\):\n(?:    .+\n?)+```")
    for r in traces:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        form = math_form if r["source"] == "math" else code_form
        assert form.fullmatch(assistant["content"]), assistant["content"]
        assert len(tokenizer.apply_chat_template(r["messages"])["input_ids"]) < 200
        if r["source"] == "math":
            assert latex_value(last_boxed(assistant["content"])) == recompute(user["content"])


CHECKER = """
import json, sys
bad = []
for r in json.load(sys.stdin):
    ns = {}
    try:
        exec(r["solution"], ns)
        exec(r["tests"], ns)
    except Exception as e:
        bad.append(r["id"])
print(json.dumps(bad))
"""


def run_solutions(rows, solution_of):
    payload = json.dumps([{"id": r["id"], "tests": r["tests"], "solution": solution_of(r)} for r in rows])
    out = subprocess.run([sys.executable, "-I", "-c", CHECKER], input=payload, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_code_references_pass_and_wrong_solutions_fail(data_dir):
    rows = read(data_dir / "code_train.jsonl") + read(data_dir / "code_test.jsonl")
    assert run_solutions(rows, lambda r: r["reference"]) == []
    failed = run_solutions(rows, lambda r: f"def {r['entry_point']}(*args):\n    return None")
    assert failed == [r["id"] for r in rows]
    off_by_one = [r for r in rows if r["entry_point"].startswith("add_")]
    assert run_solutions(off_by_one, lambda r: r["reference"].replace("return x + ", "return x + 1 + ")) == \
        [r["id"] for r in off_by_one]
    for r in rows:
        assert f"{r['entry_point']}(" in r["prompt"] and r["tests"].count("assert ") >= 2


def test_bad_sizes_are_reported():
    with pytest.raises(ValueError, match="--n-math must be >= 0"):
        Sizes(math=-1)
    with pytest.raises(ValueError, match="only draw 9 of 10 distinct problems from g_greet: .* exhausted"):
        draw_unique(g_greet, 10, random.Random(0), set())


def test_terse_traces_keep_only_the_last_line_and_change_nothing_else():
    sizes = Sizes(math=20, math_test=5, math_rl=5, code=2, code_test=1, cot=400, general=5, general_test=2, pref=4,
                  pref_test=4)
    full, half, terse = (build(0, sizes, terse=t) for t in (0.0, 0.5, 1.0))
    assert {k: v for k, v in full.items() if k != "cot_train"} == {k: v for k, v in half.items() if k != "cot_train"}

    def think(rows):
        return [r["messages"][1]["content"].split("</think>")[0].removeprefix("<think>\n").strip().splitlines()
                for r in rows if r["source"] == "math"]
    lines_full, lines_half, lines_terse = think(full["cot_train"]), think(half["cot_train"]), think(terse["cot_train"])
    assert all(t == f[-1:] for f, t in zip(lines_full, lines_terse))
    shortened = sum(h != f for f, h in zip(lines_full, lines_half))
    multi = sum(len(f) > 1 for f in lines_full)
    assert 0.35 * multi < shortened < 0.65 * multi  # about half of the traces that have working to drop
    assert all(h in (f, f[-1:]) for f, h in zip(lines_full, lines_half))
    with pytest.raises(ValueError, match="--terse must be a fraction"):
        build(0, sizes, terse=1.5)
