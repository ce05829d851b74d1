import math

import pytest

from grpo.config import ConfigError, load_config
from grpo.reward_types import RewardTags
from rewards.registry import BUILTINS, RewardError, RewardSet, RewardSpec, resolve


def length_reward(prompts, completions, scale=1.0, **_):
    return [scale * len(c) for c in completions]


def picky(prompts, completions, answer, **_):
    return [1.0 if c == a else (None if a == "-" else 0.0) for c, a in zip(completions, answer)]


def explodes_on_bad(prompts, completions, **_):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score")
    return [1.0] * len(completions)


class Counter:
    built = 0

    def __init__(self, offset=0.0):
        Counter.built += 1
        self.offset = offset

    def __call__(self, prompts, completions, **_):
        return [self.offset + i for i in range(len(completions))]


HERE = __name__


def test_weighted_total_and_none():
    rs = RewardSet([RewardSpec(name=f"{HERE}:length_reward", weight=0.5, kwargs={"scale": 2.0}),
                    RewardSpec(name=f"{HERE}:picky", weight=2.0)])
    s = rs(["p"] * 3, ["ab", "x", "y"], answer=["ab", "-", "z"])
    assert s.per_reward[f"{HERE}:length_reward"] == [4.0, 2.0, 2.0]
    assert s.per_reward[f"{HERE}:picky"] == [1.0, None, 0.0]
    assert s.total() == [0.5 * 4 + 2 * 1, 0.5 * 2, 0.5 * 2]


def test_class_reward_built_once():
    Counter.built = 0
    rs = RewardSet([RewardSpec(name=f"{HERE}:Counter", kwargs={"offset": 10.0})])
    assert rs(["a", "b"], ["c", "d"]).per_reward[f"{HERE}:Counter"] == [10.0, 11.0]
    rs(["a"], ["c"])
    assert Counter.built == 1


def test_raise_names_reward_and_sample():
    rs = RewardSet([RewardSpec(name=f"{HERE}:explodes_on_bad")])
    with pytest.raises(RewardError, match=r"explodes_on_bad.*ValueError.*sample 1.*completion='bad one'"):
        rs(["p0", "p1", "p2"], ["good", "bad one", "fine"])


def test_zero_on_error_counts_failures():
    rs = RewardSet([RewardSpec(name=f"{HERE}:explodes_on_bad")], on_error="zero")
    s = rs(["p"] * 3, ["good", "bad", "bad"])
    assert s.per_reward[f"{HERE}:explodes_on_bad"] == [1.0, 0.0, 0.0]
    assert s.failures[f"{HERE}:explodes_on_bad"] == 2


@pytest.mark.parametrize("ret, fragment", [([1.0], "list of 2"), ("ab", "list of 2"), ([1.0, "x"], "returned 'x'"), ([1.0, math.nan], "finite")])
def test_contract_violations(ret, fragment):
    rs = RewardSet([RewardSpec(name=f"{HERE}:length_reward")])
    rs.fns[f"{HERE}:length_reward"] = lambda p, c, **_: ret
    with pytest.raises(RewardError, match=fragment):
        rs(["a", "b"], ["c", "d"])


def test_resolve_errors():
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod'"):
        resolve("no_such_mod:fn")
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        resolve(f"{HERE}:nope")


def test_spec_validation_in_config():
    with pytest.raises(ConfigError, match="unknown reward 'acuracy'"):
        load_config(RewardSpec, None, ["name=acuracy"])
    assert load_config(RewardSpec, None, ["name=accuracy", "weight=2"]).weight == 2.0



def test_any_sequence_of_numbers_is_accepted():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    rs = RewardSet([RewardSpec(name=f"{HERE}:length_reward")])
    name = f"{HERE}:length_reward"
    for ret in (np.array([1.0, 2.0]), np.array([1, 2], dtype=np.int64), torch.tensor([1.0, 2.0]), (1, 2.0),
                np.array([1.0, None], dtype=object)):
        rs.fns[name] = lambda p, c, ret=ret, **_: ret
        got = rs(["a", "b"], ["c", "d"]).per_reward[name]
        assert got in ([1.0, 2.0], [1.0, None]) and all(v is None or type(v) is float for v in got)
    rs.fns[name] = lambda p, c, **_: np.array([1.0, 2.0, 3.0])
    with pytest.raises(RewardError, match=r"list of 2 float\|None \(or a tuple, array or tensor\), got ndarray of length 3"):
        rs(["a", "b"], ["c", "d"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_under_zero_score_0_and_count_as_failures(bad):
    np = pytest.importorskip("numpy")
    name = f"{HERE}:length_reward"
    rs = RewardSet([RewardSpec(name=name)], on_error="zero")
    rs.fns[name] = lambda p, c, **_: np.array([1.0, bad, 3.0])
    s = rs(["a", "b", "c"], ["x", "y", "z"])
    assert s.per_reward[name] == [1.0, 0.0, 3.0] and s.failures[name] == 1 and s.total() == [1.0, 0.0, 3.0]
    # per-sample fallback after a raise: a raise and a NaN both count
    rs.fns[name] = lambda p, c, **_: [bad if ci == "y" else 1.0 for ci in c] if "boom" not in c else 1 / 0
    s = rs(["a", "b", "c"], ["boom", "y", "z"])
    assert s.per_reward[name] == [0.0, 0.0, 1.0] and s.failures[name] == 2
    strict = RewardSet([RewardSpec(name=name)])
    strict.fns[name] = lambda p, c, **_: [1.0, bad]
    with pytest.raises(RewardError, match=r"returned .* for sample 1; rewards must be finite"):
        strict(["a", "b"], ["c", "d"])


def takes_options(prompts, completions, answer: list[str] | None = None, *, alpha: float = 1.0, **kwargs):
    return [alpha + kwargs.get("beta", 0.0)] * len(completions)


takes_options.reward_options = ["beta"]


def test_unknown_kwargs_are_refused_with_reward_key_and_allowed():
    with pytest.raises(ConfigError, match=r"^rewards\[1\]\.kwargs\.scal: reward '.*:length_reward' has no option 'scal'; "
                                          r"allowed keys: scale$"):
        RewardSet([RewardSpec(name=f"{HERE}:picky"), RewardSpec(name=f"{HERE}:length_reward", kwargs={"scal": 2.0})])
    with pytest.raises(ConfigError, match=r"reward '.*:Counter' has no option 'ofset'; allowed keys: offset$"):
        RewardSet([RewardSpec(name=f"{HERE}:Counter", kwargs={"ofset": 1.0})])
    with pytest.raises(ConfigError, match=r"has no option 'x'; allowed keys: none$"):  # only **_
        RewardSet([RewardSpec(name=f"{HERE}:explodes_on_bad", kwargs={"x": 1})])
    with pytest.raises(ConfigError, match=r"has no option 'answer'; allowed keys: alpha, beta$"):  # a column
        RewardSet([RewardSpec(name=f"{HERE}:takes_options", kwargs={"answer": "4"})])
    rs = RewardSet([RewardSpec(name=f"{HERE}:takes_options", kwargs={"alpha": 2.0, "beta": 1.0})])
    assert rs(["p"], ["c"]).per_reward[f"{HERE}:takes_options"] == [3.0]


@pytest.mark.parametrize("name, kwargs, allowed", [
    ("accuracy", {"timeout": 5.0, "rel_tol": 1e-3}, "approx_min_digits, assignment, multiple_answers, rel_tol, sets, timeout, units"),
    ("format", {"soft": True}, "soft, think_prefilled"),
    ("overlong", {"max_len": 10, "cache_len": 2}, "cache_len, max_len"),
    ("repetition", {"ngram_size": 2}, "max_penalty, ngram_size"),
])
def test_builtin_kwargs_checked_in_the_recipe(name, kwargs, allowed):
    assert RewardSet([RewardSpec(name=name, kwargs=kwargs)]).fns[name]
    with pytest.raises(ConfigError) as e:
        load_config(RewardSpec, None, [f"name={name}", "kwargs={bogus: 1}"])
    assert str(e.value) == f"kwargs.bogus: reward {name!r} has no option 'bogus'; allowed keys: {allowed}"


def verifier(prompts, completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer)]


verifier.reward_tags = {"verifiable": True}


def misdeclared(prompts, completions, **_):
    return [0.0] * len(completions)


misdeclared.reward_tags = {"verifyable": True}


def test_builtin_tags():
    names = [n for n in BUILTINS if n != "reward_model"]  # the reward model needs a trained model to build
    rs = RewardSet([RewardSpec(name=n) for n in names])
    assert {n for n in names if rs.tags[n].verifiable} == {"accuracy", "code"}
    assert getattr(resolve("reward_model"), "reward_tags", {}) == {}


def test_declared_tags_travel_with_the_scores_and_the_recipe_overrides_them():
    name = f"{HERE}:verifier"
    s = RewardSet([RewardSpec(name=name), RewardSpec(name=f"{HERE}:picky")])(["p", "p"], ["a", "b"], answer=["a", "c"])
    assert s.per_reward[name] == [1.0, 0.0]
    assert s.tags == {name: RewardTags(verifiable=True), f"{HERE}:picky": RewardTags(verifiable=False)}
    off = RewardSet([RewardSpec(name=name, tags={"verifiable": False})])(["p"], ["a"], answer=["a"])
    assert off.tags_of(name) == RewardTags(verifiable=False)
    spec = load_config(RewardSpec, None, [f"name={HERE}:picky", "tags={verifiable: true}"])
    assert RewardSet([spec]).tags[spec.name].verifiable


def test_bad_tags_are_refused_naming_the_tag_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load_config(RewardSpec, None, ["name=format", "tags={verifyable: true}"])
    assert str(e.value) == "tags.verifyable: unknown reward tag 'verifyable'; allowed tags: verifiable"
    with pytest.raises(ConfigError, match=r"^tags\.verifiable: expected true or false"):
        load_config(RewardSpec, None, ["name=format", "tags={verifiable: 1}"])
    with pytest.raises(ConfigError, match=r"^tags\.verifiable: expected true or false, got 'yes'$"):
        RewardSpec(name="format", tags={"verifiable": "yes"})
    with pytest.raises(ConfigError) as e:
        RewardSet([RewardSpec(name=f"{HERE}:misdeclared")])
    assert str(e.value) == (f"{HERE}:misdeclared.reward_tags.verifyable: unknown reward tag 'verifyable'; "
                            "allowed tags: verifiable")
